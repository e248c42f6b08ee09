"""Training a model on in-context task families with polytask's engine: prompts drawn fresh every step.

Every family is one polytask :class:`~polytask.tasks.task.Task` (its loss: the mean squared error over every
prefix of a prompt for a function class, as Garg et al. 2022 train; cross-entropy of the answer after the final
ARROW for a token task), so the engine's ``train_job`` trains the model with any joint method (weighting or
aggregator) over the per-family losses, checkpoints it, and resumes it exactly: :class:`PromptBatches` draws step
``s`` of epoch ``e`` as a pure function of (seed, e, s) (one ``torch.Generator`` per family and step).

Regimes (Garg et al. 2022 Sec. 3 and their ``curriculum.py``; Raventós et al. 2023 for the mixture):

- **single**: one family; **mixture**: every family in every step, one loss per family;
- **difficulty curriculum** (:class:`Schedule`): the prompts' dimension and number of points start small and grow
  by ``inc`` every ``interval`` steps up to the full size (Garg et al.: +1 dimension and +2 points every 2000 steps);
  the coordinates beyond the current dimension are zero (the samplers' ``dim`` argument);
- **task curriculum**: families enter in their listed order, one every ``every`` steps; a family that has not
  entered yet contributes a zero loss (a one-prompt source with no labels: ``engine.step.masked_loss``).

Deliberate differences: Garg et al. count curriculum steps from 1 and update after each step; here the value at
global step s is ``min(start + inc * (s // interval), end)`` (the same sequence). With a task curriculum, a
gradient aggregator sees zero rows for the families that have not entered; min-norm aggregators (MGDA) then
return a zero direction, so use a loss weighting or UPGrad-style aggregator there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polytask.engine.data import Batch, _Lazy, key_seed, validation_batch
from polytask.engine.optim import OptimizerFactory, SchedulerFactory
from polytask.engine.spec import CheckpointPolicy, TrainSpec
from polytask.engine.step import Method
from polytask.errors import ConfigError, DataError
from polytask.icl.model import FunctionModel, TokenModel, pack
from polytask.icl.prompts import Prompts, TokenPrompts
from polytask.tasks.task import Metric, Task, TaskData

_VAL, _TEST = 104729, 1299709  # keys of the validation and test prompts (training steps use (seed, epoch, step))


def generator(*key: int) -> torch.Generator:
    """A torch generator whose state depends only on the integers of ``key`` (each taken modulo 2**63)."""
    return torch.Generator().manual_seed(key_seed([int(k) % 2**63 for k in key]))


@dataclass(frozen=True)
class Schedule:
    """One curriculum variable (Garg et al.'s ``curriculum.py``): ``start``, raised by ``inc`` every ``interval``
    steps, capped at ``end``; ``interval`` 0: always ``end``."""

    start: int
    end: int
    inc: int = 1
    interval: int = 0

    def at(self, step: int) -> int:
        """The value at global step ``step`` (0-based)."""
        if not self.interval:
            return self.end
        return min(self.start + self.inc * (step // self.interval), self.end)


def _answer_accuracy(output: Tensor, target: Tensor) -> Tensor:
    """The fraction of prompts whose every answer token is the argmax (``output`` B x V or B x V x m)."""
    pred = output.argmax(1)
    hit = pred == target.long()
    return (hit if hit.dim() == 1 else hit.all(-1)).float().mean()


ANSWER_ACCURACY = Metric("accuracy", True, _answer_accuracy)


def family_task(family: Any) -> Task:
    """The polytask Task of a family: regression over every prefix (function class, mse/mae per point) or
    classification of the answer tokens (token task, exact-match accuracy)."""
    if hasattr(family, "vocab_size"):
        return Task(family.name, "classification", int(family.vocab_size), metrics=(ANSWER_ACCURACY,))
    return Task(family.name, "regression", 1)


def is_token(family: Any) -> bool:
    """Whether ``family`` is a token task (``TokenTask``) rather than a function class."""
    return hasattr(family, "vocab_size")


def function_data(prompts: Prompts, name: str, dim: int) -> TaskData:
    """Function-class prompts as an engine source: inputs :func:`~polytask.icl.model.pack`, targets ``B x n``."""
    return TaskData(pack(prompts.xs, prompts.ys, dim), {name: prompts.ys.float()})


def token_data(prompts: TokenPrompts, name: str) -> TaskData:
    """Token prompts as an engine source: the tokens then the first m - 1 answer tokens (teacher forcing);
    targets the answer (``B`` for one token, ``B x m`` else). Every prompt's final ARROW must be its last token."""
    tokens, answers = prompts.tokens.long(), prompts.answers.long()
    if bool((prompts.query != tokens.shape[1] - 1).any()):
        raise DataError(f"family {name!r}: every prompt's final ARROW must be its last token to train on it "
                        f"(query {prompts.query.tolist()[:4]}..., length {tokens.shape[1]})")
    x = torch.cat([tokens, answers[:, :-1]], dim=1)
    y = answers[:, 0] if answers.shape[1] == 1 else answers
    return TaskData(x, {name: y.float()})


def _unlabelled(data: TaskData) -> TaskData:
    """One prompt of ``data`` with its labels removed (NaN): a family that has not entered a task curriculum."""
    return TaskData(data.x[:1], {k: torch.full_like(v[:1], float("nan")) for k, v in data.y.items()})


@dataclass(frozen=True)
class PromptBatches:
    """The engine's batch source of in-context training (``engine.data.BatchSource``): every step draws
    ``batch_size`` fresh prompts per family, a pure function of (seed, epoch, step, family).

    ``dim``: the model's input dimension (function classes); ``points``/``dims``: the difficulty curriculum over
    global steps (number of points or demonstrations; the dimension); ``enter_every`` > 0: a task curriculum, family
    k trains from global step ``k * enter_every`` on. ``eval_prompts`` validation and test prompts per family, drawn
    at full difficulty from ``data_seed`` once."""

    families: Sequence[Any]
    batch_size: int
    steps: int
    points: Schedule
    dims: Schedule | None = None
    dim: int = 0
    enter_every: int = 0
    eval_prompts: int = 256
    data_seed: int = 0
    device: str = "cpu"
    _splits: dict[str, list[TaskData]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"train: steps per epoch ({self.steps}) and batch_size ({self.batch_size}) must be >= 1")

    def sample(self, family: Any, g: torch.Generator, batch: int, n: int, dim: int | None) -> TaskData:
        """``batch`` prompts of ``family`` with ``n`` points (demonstrations), as an engine source."""
        if is_token(family):
            return token_data(family.sample(g, batch, n), family.name)
        prompts = family.sample(g, batch, n, dim=dim if dim is not None and dim < family.dim else None)
        return function_data(prompts, family.name, self.dim or family.dim)

    def batch(self, seed: int, epoch: int, step: int) -> Batch:
        """Step ``step`` of epoch ``epoch``: each family's prompts at the curriculum's difficulty of that global step
        (one unlabelled prompt for a family that has not entered)."""
        gs = epoch * self.steps + step
        n = self.points.at(gs)
        d = self.dims.at(gs) if self.dims is not None else None
        sources = []
        for k, f in enumerate(self.families):
            entered = not self.enter_every or gs >= k * self.enter_every
            data = self.sample(f, generator(seed, epoch, step, k), self.batch_size if entered else 1, n, d)
            sources.append((data if entered else _unlabelled(data)).to(self.device))
        return Batch(sources, [torch.arange(len(s), device=self.device) for s in sources])

    def to(self, device: torch.device) -> PromptBatches:
        """The same source, drawing onto ``device``."""
        return PromptBatches(self.families, self.batch_size, self.steps, self.points, self.dims, self.dim,
                             self.enter_every, self.eval_prompts, self.data_seed, str(device))

    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch (an epoch is a checkpoint and validation period; prompts never repeat)."""
        return self.steps

    def epoch(self, seed: int, epoch: int) -> Sequence[Batch]:
        """The steps of ``epoch``, drawn when the loop asks for them."""
        return _Lazy(self.steps, lambda step: self.batch(seed, epoch, step))

    def split(self, name: str) -> Sequence[TaskData]:
        """Validation or test prompts per family at full difficulty (the most points), drawn once."""
        if name not in self._splits:
            key = _TEST if name == "test" else _VAL
            self._splits[name] = [self.sample(f, generator(self.data_seed, key, k), self.eval_prompts,
                                              self.points.end, None).to(self.device)
                                  for k, f in enumerate(self.families)]
        return self._splits[name]

    def val_batch(self, seed: int, global_step: int) -> Batch:
        """``batch_size`` validation prompts per family drawn by (seed, step), for methods that watch validation."""
        return validation_batch(self.split("val"), self.batch_size, seed, global_step, self.device)


def build_model(families: Sequence[Any], dim: int, max_points: int, n_embd: int, n_layer: int, n_head: int,
                token_positions: int = 0) -> FunctionModel | TokenModel:
    """The model of ``families``: all function classes (:class:`FunctionModel`, dimension ``dim``, prompts up to
    ``max_points``) or all token tasks (:class:`TokenModel` over the largest vocabulary, ``token_positions`` long)."""
    kinds = {is_token(f) for f in families}
    if len(kinds) != 1:
        raise ConfigError("families: mix function classes and token tasks in separate runs (one model reads "
                          "vectors, the other tokens)")
    names = [f.name for f in families]
    if kinds == {True}:
        vocab = max(int(f.vocab_size) for f in families)
        answers = {answer_tokens(f) for f in families}
        if len(answers) != 1:
            raise ConfigError(f"families: token tasks with different answer lengths {sorted(answers)} in one model")
        return TokenModel(names, vocab, token_positions, answers.pop(), n_embd, n_layer, n_head)
    return FunctionModel(names, dim, max_points, n_embd, n_layer, n_head)


def token_length(family: Any, n_examples: int) -> int:
    """Tokens a prompt of ``family`` with ``n_examples`` demonstrations takes, answer included (one draw)."""
    p = family.sample(torch.Generator().manual_seed(0), 1, n_examples)
    return p.tokens.shape[1] + p.answers.shape[1]


def answer_tokens(family: Any) -> int:
    """Tokens of a token task's answer (one draw)."""
    return int(family.sample(torch.Generator().manual_seed(0), 1, 1).answers.shape[1])


@dataclass(frozen=True)
class IclJob:
    """What :func:`icl_spec` needs besides the families: model size, schedules, optimisation and where it goes."""

    name: str
    method: Method
    optimizer: OptimizerFactory
    epochs: int
    steps: int
    batch_size: int
    points: Schedule
    checkpoint: Path
    dims: Schedule | None = None
    enter_every: int = 0
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    seed: int = 0
    checkpoint_every: int = 0
    scheduler: SchedulerFactory | None = None
    eval_prompts: int = 256
    device: str = "cpu"


def icl_spec(families: Sequence[Any], job: IclJob) -> TrainSpec:
    """The engine's TrainSpec of ``job`` on ``families`` (the model built after the job's seed is set; the last
    weights kept, as Garg et al. evaluate the final model)."""
    if not families:
        raise ConfigError("families: at least one family is needed")
    names = [f.name for f in families]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"families: {dup[0]!r} is used twice; give each family a distinct name")
    dim = max((int(f.dim) for f in families if not is_token(f)), default=0)
    positions = max((token_length(f, job.points.end) for f in families if is_token(f)), default=0)

    def build() -> torch.nn.Module:
        return build_model(families, dim, job.points.end, job.n_embd, job.n_layer, job.n_head, positions)

    data = PromptBatches(families, job.batch_size, job.steps, job.points, job.dims, dim, job.enter_every,
                         job.eval_prompts, job.seed)
    return TrainSpec(name=job.name, tasks=[family_task(f) for f in families], model=build, optimizer=job.optimizer,
                     method=job.method, data=data, epochs=job.epochs,
                     checkpoint=CheckpointPolicy(Path(job.checkpoint), job.checkpoint_every), seed=job.seed,
                     device=job.device, scheduler=job.scheduler, eval_batch_size=max(job.eval_prompts, 1),
                     select="last")


