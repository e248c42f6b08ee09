"""TAME, Task-Agnostic continual learning using Multiple Experts: Zhu, Majzoubi, Jain & Choromanska 2024 (CVPR 2024
Workshops; arXiv 2210.03869). The test, its thresholds and the buffer follow the first author's reference code
(github.com/HaoranZhuExplorer/TAME, ``utils_.py``: ``Expert``, ``train_all_experts``; ``train.py``'s split-MNIST
settings): the paper's abstract states the idea (a statistically significant deviation of the loss marks the onset
of a new task; a selector trained on a small random subset routes test inputs), its full text was not at hand.

TAME trains one expert network at a time and never reads the task boundary: it notices a new task from the loss of
the incoming batches. Before each training step, on its batch B_t:

1. the current expert c's loss l_t on B_t (eval mode, no gradient) gives the test statistic, its smoothed loss
   ``s_t = α l_t + (1 − α) s_c`` (``smoothing`` α = 0.2; s_c: the exponential average of the losses of the batches c
   trained on);
2. c's threshold ``τ_c = mean(W_c) + k · max(std(W_c), σ_min)`` over W_c, the losses of the last ``window`` (35)
   batches c trained on (population std; k = ``sigmas``, 3; σ_min = ``min_std``, 0.005). A new expert's window starts
   as [log C], the loss of a uniform guess over its head's C classes (empty for a regression head);
3. ``s_t > τ_c`` is a shift: c is deactivated with τ_c frozen, and the first expert j (in order of creation) whose
   smoothed loss with B_t, ``α l_j + (1 − α) s_j``, is below its own frozen τ_j becomes current (a task seen before;
   c itself never qualifies, its statistic being the one that just crossed τ_c); when none fits, a new expert is
   created (a task not seen before);
4. the current expert trains on B_t (the engine's step) and its loss l before the step enters W and s.

Each training row, when first seen, is offered to a class-balanced buffer (``buffer_size`` rows, the reference's
per-class priority queues with random priorities) with the expert that trained on it as its label. At inference a
selector network trained on the buffer (cross-entropy over the live experts) sends each input to one expert, whose
output is the prediction: the expert's index plays the role of the task id that was never given.

How it sits on polytask's flow. The strategy's :meth:`Tame.wrap` turns the architecture's model into
:class:`Experts`: ``max_experts`` copies of it (all with the model's initial weights, the first being the model itself)
and the selector, all preallocated; buffers say how many experts are live, which one is current and how many the
selector routes among. In train mode ``forward``, ``features``/``outputs``, ``shared_parameters`` and
``task_parameters`` are the current expert's (what the engine's step trains and differentiates); in eval mode
``forward`` routes each row through the selector's expert. The flow's experience boundaries still do three things:
each experience's job gets a fresh optimiser (over every expert; only the current one has gradients, so only it moves),
the buffer takes the rows of an experience's first epoch (every row is seen first there: the reference's "first time
a row is seen"), and ``end`` retrains the selector from its initial weights on the buffer so the accuracy matrix can
be evaluated after every experience. Which expert trains is decided by the test alone, also across boundaries.

Scenarios: ``class`` and ``domain`` (one task, no task id at test time: the setting TAME is for). A ``task`` or
``multitask`` stream gives the task id and trains one head per task, which TAME would ignore; it is refused.

Deliberate differences from the reference code:

- The reference runs every epoch of a task's data before the next task (``shuffle=False`` within a task); here the
  engine's seeded per-epoch shuffles. The statistic s of an expert averages the batches it trained on (the
  reference's ``smoothed_losses_when_active``); the reference tests the current expert with an average over every
  batch since its creation (also those it only watched, and starting at its second batch), which differs only in
  the first batches after a switch.
- New experts start from the architecture's initial weights (the reference draws a fresh random network); the
  selector is the architecture's features (a copy of the initial model; an MLP on the flattened input when the model
  has no ``features``) with a linear layer over ``max_experts`` outputs, trained with softmax cross-entropy over the
  live experts (the reference: a LeNet whose outputs pass a sigmoid before cross-entropy). The selector is trained
  from its initial weights at every experience's end (the reference trains it once, after the stream), ``selector_*``
  with the reference's optimiser (SGD 0.1, momentum 0.9, weight decay 5e-4) but fewer epochs (50, not 200).
- Experts share the flow's optimiser (the reference gives each its own SGD and LR schedule): an expert's momentum
  survives a switch within an experience's job and is dropped at the next experience.
- The buffer's class balance is polytask's class-balanced reservoir (an equal share of the classes seen so far; the
  reference fixes capacity / number of classes per class in advance; in the domain scenario the classes are the
  shared labels, the reference balances over the original digits).
- An expert is tested once it has trained on ``warmup`` batches (default 1, the reference for an expert created
  at a shift). The reference also tests the first expert on the stream's first batch, where an untrained network's
  loss a little above log C + 3 σ_min fires and wastes a slot. With ``warmup`` 1 the first test sees a window of
  two losses (log C and one batch), and relative batch-to-batch noise of 10% or more in a fresh expert's first
  losses can fire it (measured on synthetic decays, tests/continual/test_tame.py); 3 avoids that.
- No pruning: the paper prunes experts and selector to bound the model's size; here the size is bounded by
  ``max_experts``. When every slot is live and no expert fits a shift, the expert with the lowest loss on the batch
  becomes current (an ``overflow`` event).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from polytask.continual.strategies.buffer import Buffer, draw
from polytask.continual.strategy import STRATEGIES, Strategy
from polytask.continual.stream import Stream
from polytask.engine.data import permutation
from polytask.engine.loop import task_losses
from polytask.errors import ConfigError, DataError
from polytask.models import MultiTaskModel
from polytask.models.mode import evaluating
from polytask.tasks.task import Task

_SELECTOR_INIT, _SELECTOR_TRAIN = 11, 12  # salts of the strategy's draws


class TameParams(BaseModel):
    """Parameters of ``tame`` (defaults: the reference code's split-MNIST settings, except where noted)."""

    model_config = ConfigDict(extra="forbid")
    max_experts: int = Field(10, ge=1, description="expert slots preallocated (the model's size is this many copies)")
    window: int = Field(35, ge=2, description="W: losses of the last W trained batches that set the threshold")
    smoothing: float = Field(0.2, gt=0, le=1, description="α: weight of the newest loss in the smoothed loss")
    sigmas: float = Field(3.0, gt=0, description="k: a shift is a smoothed loss above mean + k std of the window")
    min_std: float = Field(0.005, ge=0, description="σ_min: the window's std is taken as at least this")
    warmup: int = Field(1, ge=1, description="batches an expert trains on before it is tested (1: the reference; "
                        "more keeps a fresh expert's first, noisy losses from firing)")
    buffer_size: int = Field(200, ge=1, description="rows kept for the selector (class-balanced; reference: 5000 of "
                             "MNIST's 60000)")
    selector_epochs: int = Field(50, ge=1, description="epochs of the selector over the buffer (reference: 200)")
    selector_batch_size: int = Field(32, ge=1, description="rows per selector step (reference: 128)")
    selector_lr: float = Field(0.1, gt=0, description="the selector's SGD learning rate")
    selector_momentum: float = Field(0.9, ge=0, lt=1, description="the selector's SGD momentum")
    selector_weight_decay: float = Field(5e-4, ge=0, description="the selector's SGD weight decay")


# ---------------------------------------------------------------- the shift test (pure functions)


def smoothed(previous: float | None, loss: float, alpha: float) -> float:
    """The exponential average ``α loss + (1 − α) previous`` (``loss`` itself when there is no previous value)."""
    return loss if previous is None else alpha * loss + (1 - alpha) * previous


def shift_threshold(window: Sequence[float], sigmas: float, min_std: float) -> float:
    """TAME's threshold over a window of losses: ``mean + sigmas · max(std, min_std)`` (population std, as numpy's
    ``np.std`` in the reference); +inf for an empty window (nothing to compare with: no shift)."""
    if not window:
        return math.inf
    mean = math.fsum(window) / len(window)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in window) / len(window))
    return mean + sigmas * max(std, min_std)


@dataclass
class Track:
    """One expert's loss statistics: the window of its last trained losses, their smoothed value, and its threshold
    (recomputed at each test while it is current, frozen when it is deactivated)."""

    window: list[float]
    average: float | None = None
    threshold: float | None = None
    batches: int = 0  # batches trained on

    def shifted(self, loss: float, alpha: float, sigmas: float, min_std: float, size: int, warmup: int = 1) -> bool:
        """The current expert's test on a batch with loss ``loss``: its smoothed loss with the batch exceeds the
        threshold of its window (which is kept, frozen, if this deactivates the expert). An expert that trained on
        fewer than ``warmup`` batches is not tested."""
        if self.batches < warmup or not self.window:
            return False
        self.threshold = shift_threshold(self.window[-size:], sigmas, min_std)
        return smoothed(self.average, loss, alpha) > self.threshold

    def fits(self, loss: float, alpha: float) -> bool:
        """An inactive expert's test: its smoothed loss with a batch of loss ``loss`` is below its frozen threshold."""
        return self.threshold is not None and smoothed(self.average, loss, alpha) < self.threshold

    def trained(self, loss: float, alpha: float, size: int) -> None:
        """The expert trained on a batch whose loss before the step was ``loss``."""
        self.window = [*self.window, loss][-size:]
        self.average = smoothed(self.average, loss, alpha)
        self.batches += 1

    def state(self) -> dict[str, Any]:
        """The statistics as a checkpointable tree."""
        return {"window": list(self.window), "average": self.average, "threshold": self.threshold,
                "batches": self.batches}


def first_shift(losses: Sequence[float], initial: float | None = None, window: int = 35, smoothing: float = 0.2,
                sigmas: float = 3.0, min_std: float = 0.005, warmup: int = 1) -> int | None:
    """The first batch at which TAME's test fires for one fresh expert that trains on every batch before it, given
    the batches' losses (None: it never fires). The detector alone, for tests and for choosing the thresholds on
    recorded losses."""
    track = Track([] if initial is None else [initial])
    for t, loss in enumerate(losses):
        if track.shifted(loss, smoothing, sigmas, min_std, window, warmup):
            return t
        track.trained(loss, smoothing, window)
    return None


def initial_loss(tasks: Sequence[Task]) -> float | None:
    """A fresh expert's first window entry: the loss of a uniform guess, log C averaged over classification heads
    (the reference's ``np.log(num_classes_per_task)``); None when a task is not a classification."""
    if not tasks or any(t.kind != "classification" for t in tasks):
        return None
    return sum(math.log(t.n_outputs) for t in tasks) / len(tasks)


@contextmanager
def seeded(*key: int) -> Iterator[None]:
    """Run with the global random state (CPU and every CUDA device) forked and seeded from ``key``: the strategy's
    draws are a pure function of the key, and the rest of training draws what it would have drawn without them."""
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(draw(*key) >> 1)
        yield


# ---------------------------------------------------------------- the model: experts and selector


class Selector(nn.Module):
    """The selector network: the initial model's shared features (flattened, concatenated) or, for a model without
    ``features``, an MLP on the flattened input; then one linear output per expert slot."""

    def __init__(self, body: nn.Module, width: int, slots: int, features: bool) -> None:
        super().__init__()
        self.body, self.head, self.use_features = body, nn.Linear(width, slots), features

    def forward(self, x: Tensor) -> Tensor:
        """One logit per expert slot for each row."""
        if not self.use_features:
            return self.head(self.body(x))
        return self.head(torch.cat([f.flatten(1) for f in self.body.features(x)], dim=1))  # type: ignore[operator]


def build_selector(model: MultiTaskModel, sample: Tensor, slots: int, hidden: int = 64) -> Selector:
    """The selector for ``model`` (its features measured on ``sample`` rows), built with the global random state
    (the caller seeds it)."""
    body = copy.deepcopy(model)
    with torch.no_grad():
        feats = body.features(sample)
    if feats is not None:
        return Selector(body, sum(int(f.flatten(1).shape[1]) for f in feats), slots, True)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(int(sample[0].numel()), hidden), nn.ReLU())
    return Selector(mlp, hidden, slots, False)


class Experts(MultiTaskModel):
    """TAME's model: ``max_experts`` expert slots (copies of the architecture's model), the selector, and buffers
    ``live`` (experts created), ``current`` (the one training) and ``known`` (experts the selector routes among).
    Train mode: the current expert. Eval mode: each row through the expert the selector picks."""

    def __init__(self, model: MultiTaskModel, slots: int, selector: Selector) -> None:
        super().__init__()
        self.experts = nn.ModuleList([model, *(copy.deepcopy(model) for _ in range(slots - 1))])
        self.selector = selector
        self.task_names = list(model.task_names)
        self.register_buffer("live", torch.tensor(1))
        self.register_buffer("current", torch.tensor(0))
        self.register_buffer("known", torch.tensor(1))

    @property
    def active(self) -> MultiTaskModel:
        """The current expert."""
        return self.experts[int(self.current)]  # type: ignore[return-value]

    def route(self, x: Tensor) -> Tensor:
        """Each row's expert: the selector's most likely among the ``known`` experts (expert 0 while it knows one)."""
        known = int(self.known)
        if known <= 1:
            return torch.zeros(len(x), dtype=torch.long, device=x.device)
        return self.selector(x)[:, :known].argmax(dim=1)

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Train mode: the current expert's outputs; eval mode: each row's from the expert the selector picks."""
        if self.training:
            return self.active(x, tasks)
        which = self.route(x)
        picked = torch.unique(which).tolist()
        if len(picked) == 1:
            return self.experts[picked[0]](x, tasks)
        out: dict[str, Tensor] = {}
        for j in picked:
            rows = (which == j).nonzero().flatten()
            for name, value in self.experts[j](x[rows], tasks).items():
                if name not in out:
                    out[name] = value.new_empty((len(x), *value.shape[1:]))
                out[name][rows] = value
        return out

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The current expert's shared parameters (the only ones a step trains)."""
        return self.active.shared_parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The current expert's parameters of ``task``."""
        return self.active.task_parameters(task)

    def features(self, x: Tensor) -> list[Tensor] | None:
        """The current expert's shared features (what representation-mode aggregators differentiate in training)."""
        return self.active.features(x)

    def reads(self, task: str) -> Sequence[int] | None:
        """Which of the current expert's features ``task`` reads."""
        return self.active.reads(task)

    def outputs(self, features: Sequence[Tensor], tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """The current expert's outputs from its features."""
        return self.active.outputs(features, tasks)


def batch_loss(expert: nn.Module, sources: Sequence[Any], rows: Sequence[Tensor], tasks: Sequence[Task]) -> float:
    """The expert's loss on a batch before the step (the reference's ``test``): eval mode (no dropout draw, no
    batch-norm update), no gradient, the mean of the task losses."""
    with evaluating(expert), torch.no_grad():
        return float(task_losses(expert, sources, rows, tasks).double().mean())  # type: ignore[arg-type]


# ---------------------------------------------------------------- the strategy


@dataclass
class Event:
    """A shift the test found: where (experience, epoch, step), from which expert to which, and whether the
    expert was created, an earlier one fitted, or every slot was taken (``overflow``)."""

    experience: int
    epoch: int
    step: int
    source: int
    target: int
    kind: str

    def state(self) -> list[Any]:
        """The event as a checkpointable list (also how tests and summaries read it)."""
        return [self.experience, self.epoch, self.step, self.source, self.target, self.kind]


@dataclass
class _Memory:
    tracks: list[Track] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


class Tame(Strategy):
    """TAME (module docstring): a shift test on the current expert's loss decides which expert trains; a selector
    trained on a buffer of (row, expert) routes at inference."""

    name = "tame"
    scenarios = ("class", "domain")

    def __init__(self, params: TameParams) -> None:
        super().__init__()
        self.params = params
        self.buffer = Buffer(params.buffer_size, "class_balanced")
        self.memory = _Memory()
        self.initial: float | None = None
        self.model: Experts | None = None
        self._selector_init: dict[str, Tensor] = {}

    def check(self, stream: Stream, label: str) -> None:
        if stream.scenario not in self.scenarios:
            raise ConfigError(f"strategy {label!r} (TAME) does not apply to a {stream.scenario}-incremental stream "
                              f"({stream.name!r}): TAME is task-agnostic, it infers which expert (task) an input "
                              f"belongs to, while a {stream.scenario} stream gives the task and trains a head per "
                              "task; it supports: class, domain")

    def wrap(self, model: nn.Module, stream: Stream) -> nn.Module:
        if not isinstance(model, MultiTaskModel):
            raise DataError(f"strategy tame: the model must be a MultiTaskModel, got {type(model).__name__}")
        sample = next((src.x[:2] for src in stream.experiences[0].suite.splits["train"] if len(src)), None)
        if sample is None:
            raise DataError(f"strategy tame: experience {stream.experiences[0].name!r} of stream {stream.name!r} has "
                            "no training rows to size the selector with")
        with seeded(self.seed, _SELECTOR_INIT):
            selector = build_selector(model, sample.to(next(model.parameters()).device), self.params.max_experts)
        self._selector_init = {k: v.detach().clone() for k, v in selector.state_dict().items()}
        self.model = Experts(model, self.params.max_experts, selector)
        self.initial = initial_loss(stream.tasks)
        self.memory = _Memory([Track(self._fresh_window())])
        return self.model

    def _fresh_window(self) -> list[float]:
        return [] if self.initial is None else [self.initial]

    def _experts(self, run: Any) -> Experts:
        if not isinstance(run.model, Experts) or (self.model is not None and run.model is not self.model):
            raise DataError(f"strategy tame: job {run.name!r} trains a {type(run.model).__name__}, not the model "
                            "tame wrapped; build the model with strategy.wrap(model, stream)")
        return run.model

    # ------------------------------------------------------------ training

    def on_step(self, run: Any, step: Any) -> None:
        model = self._experts(run)
        p = self.params
        sources, rows, tasks = step.batch.sources, step.batch.rows, run.tasks
        current = int(model.current)
        loss = batch_loss(model.experts[current], sources, rows, tasks)
        tracks = self.memory.tracks
        target = current
        if tracks[current].shifted(loss, p.smoothing, p.sigmas, p.min_std, p.window, p.warmup):
            live = int(model.live)
            losses = {j: (loss if j == current else batch_loss(model.experts[j], sources, rows, tasks))
                      for j in range(live)}
            fitting = [j for j in range(live) if j != current and tracks[j].fits(losses[j], p.smoothing)]
            if fitting:
                target, kind = fitting[0], "fit"
            elif live < p.max_experts:
                target, kind = live, "new"
                model.live.fill_(live + 1)
                tracks.append(Track(self._fresh_window()))
                losses[target] = batch_loss(model.experts[target], sources, rows, tasks)
            else:
                target, kind = min(losses, key=lambda j: (losses[j], j)), "overflow"
            model.current.fill_(target)
            self.memory.events.append(Event(self.index, step.epoch, step.step, current, target, kind))
            loss = losses[target]
        tracks[target].trained(loss, p.smoothing, p.window)
        if step.epoch == 0:
            assert self.stream is not None
            for src, r in zip(sources, rows, strict=True):
                self.buffer.offer(src.take(r), target, self.stream.tasks, self.seed)

    # ------------------------------------------------------------ the selector

    def end(self, model: nn.Module, stream: Stream, index: int, device: torch.device) -> None:
        if not isinstance(model, Experts):
            raise DataError("strategy tame: the flow's model is not the model tame wrapped")
        live = int(model.live)
        model.known.fill_(live)
        sample = self.buffer.everything()
        if live <= 1 or sample is None:
            return
        train_selector(model.selector, self._selector_init, sample.data.x.to(device), sample.experience.to(device),
                       live, self.params, (self.seed, index))

    # ------------------------------------------------------------ state

    def state_dict(self) -> Any:
        return {"buffer": self.buffer.state_dict(), "tracks": [t.state() for t in self.memory.tracks],
                "events": [e.state() for e in self.memory.events]}

    def load_state_dict(self, state: Any) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.memory = _Memory([Track([float(v) for v in t["window"]], t["average"], t["threshold"], int(t["batches"]))
                               for t in state["tracks"]],
                              [Event(*e) for e in state["events"]])

    @property
    def events(self) -> list[Event]:
        """The shifts found so far, in order."""
        return list(self.memory.events)


def train_selector(selector: Selector, init: dict[str, Tensor], x: Tensor, expert: Tensor, live: int,
                   params: TameParams, key: tuple[int, ...]) -> list[float]:
    """Train the selector from its initial weights ``init`` to predict each buffered row's expert (softmax cross-
    entropy over the first ``live`` outputs), by SGD over batches in orders drawn from ``key``; the global random
    state (dropout in the selector's body) is forked and seeded from ``key``. Returns the mean loss of each epoch."""
    selector.load_state_dict(init)
    was = selector.training
    selector.train()
    opt = torch.optim.SGD(selector.parameters(), lr=params.selector_lr, momentum=params.selector_momentum,
                          weight_decay=params.selector_weight_decay)
    history = []
    with seeded(*key, _SELECTOR_TRAIN), torch.enable_grad():
        for epoch in range(params.selector_epochs):
            order = permutation(len(x), *key, _SELECTOR_TRAIN, epoch).to(x.device)
            total = 0.0
            for i in range(0, len(x), params.selector_batch_size):
                rows = order[i:i + params.selector_batch_size]
                loss = nn.functional.cross_entropy(selector(x[rows])[:, :live], expert[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(rows)
            history.append(total / len(x))
    selector.train(was)
    return history


@STRATEGIES.register("tame", params=TameParams,
                     summary="task-agnostic experts: a loss-shift test picks or creates the expert that trains; a "
                     "selector trained on a small buffer routes each input to an expert",
                     paper="Zhu, Majzoubi, Jain & Choromanska 2024, TAME: Task Agnostic Continual Learning using "
                     "Multiple Experts (CVPR Workshops)")
def _tame(params: TameParams) -> Strategy:
    return Tame(params)
