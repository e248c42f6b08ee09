"""The continual-learning strategies beyond the core ones, one module per strategy or family (each registers its
names in :data:`polytask.continual.strategy.STRATEGIES` on import).

Regularisation (``regularization``: the shared quadratic penalty and per-example gradients): ``ewc`` (separate and
online), ``si``, ``mas``; distillation: ``lwf``.

Rehearsal (``buffer``: the one memory of rows; ``rehearsal``: filling it and reading it at every step): ``replay``,
``der`` (DER and DER++), ``er_ace``, ``agem``; ``gdumb`` trains from scratch on its memory alone; ``replay_schedule``
replays a memory composed over earlier experiences by a replay schedule (searched in
:mod:`polytask.flows.schedule_search`).

Task-id prediction: ``hat`` (hard attention masks on the hidden units per task, task-incremental); ``tpl`` (HAT task
learners with replay, the task predicted by a likelihood ratio, class-incremental).

Optimisers: ``tag`` (TAG-RMSProp: each experience's accumulated gradients scale the step).

Structure: ``rank_updates`` (each experience adds low-rank factors to every Linear layer; per-task selectors);
``tame`` (task-agnostic experts: a loss-shift test picks the expert that trains, a selector routes at inference).

Prompting: ``l2p`` (a pool of prompts selected by key-query matching on a frozen pretrained ``hf`` encoder).
"""

from polytask.continual.strategies import (
    agem,
    der,
    er_ace,
    ewc,
    gdumb,
    hat,
    l2p,
    lwf,
    mas,
    rank_updates,
    replay,
    replay_schedule,
    si,
    tag,
    tame,
    tpl,
)

__all__ = ["agem", "der", "er_ace", "ewc", "gdumb", "hat", "l2p", "lwf", "mas", "rank_updates", "replay",
           "replay_schedule", "si", "tag", "tame", "tpl"]
