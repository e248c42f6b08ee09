"""Continual-learning strategies: hooks on the one training loop, plus what they do between experiences.

A :class:`Strategy` rides on every experience's job as a :class:`~polytask.engine.hooks.Hook` (``extra_loss`` for
regularisers and replay, ``before_update`` for gradient projections, ``on_step`` to watch the data) and is told
where it is in the stream (``begin``) and when an experience ends (``end``: Fisher matrices, buffers). Everything
it must remember across steps and experiences is in ``state_dict``: it is checkpointed with each step's job and
with each finished experience, so a run killed anywhere resumes bit-identically. ``train_suite`` lets a strategy
change what an experience trains on (cumulative: everything so far).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from polytask.continual.stream import SCENARIOS, Stream
from polytask.engine.hooks import Hook
from polytask.errors import ConfigError, DataError
from polytask.registry import Registry
from polytask.tasks.task import SPLITS, TaskData, TaskSuite

StrategyBuilder = Callable[[Any], "Strategy"]
STRATEGIES: Registry[StrategyBuilder] = Registry("strategy")


class Strategy(Hook):
    """Base of the strategies: fine-tuning on each experience in turn (``naive``) unless a subclass adds more.

    ``scenarios``: where the strategy applies (a stream of another scenario is a ConfigError naming both).
    ``joint``: train once on every experience together (the upper bound), not one experience after another.
    ``seed``: the run's seed, set by the flow before the first experience; a strategy keys its random draws on it
    (and on where it is in the stream), so they are a pure function of both and a resumed run draws the same."""

    name = "strategy"
    scenarios: tuple[str, ...] = SCENARIOS
    joint = False
    seed = 0

    def __init__(self) -> None:
        self.stream: Stream | None = None
        self.index = 0

    def check(self, stream: Stream, label: str) -> None:
        """Refuse a stream whose scenario the strategy does not support."""
        if stream.scenario not in self.scenarios:
            raise ConfigError(f"strategy {label!r} does not apply to a {stream.scenario}-incremental stream "
                              f"({stream.name!r}); it supports: {', '.join(self.scenarios)}")

    def begin(self, stream: Stream, index: int) -> None:
        """Called before experience ``index`` trains (also when its job resumes)."""
        self.stream, self.index = stream, index

    def wrap(self, model: torch.nn.Module, stream: Stream) -> torch.nn.Module:
        """The model the stream trains and is evaluated on, built once from the architecture's ``model`` before the
        first experience (and again, the same way, when a run resumes): the model itself unless the strategy adds
        structure (a prompt pool, low-rank updates, experts) or its own inference (task-id prediction in eval mode).
        What it adds must have its final shapes from the start (one slot per experience, or a maximum, with a buffer
        saying how many are live), so every checkpoint of the run loads into it. It stays a ``MultiTaskModel``."""
        return model

    def train_suite(self, stream: Stream, index: int) -> TaskSuite:
        """What experience ``index`` trains on: its own suite."""
        return stream.experiences[index].suite

    def end(self, model: torch.nn.Module, stream: Stream, index: int, device: torch.device) -> None:
        """Called once experience ``index`` is trained (its weights are the model's), before the next begins."""


def union(name: str, suites: Sequence[TaskSuite]) -> TaskSuite:
    """The suites' data together: sources of the same tasks concatenated (one source per task set), so a task
    seen in several experiences is one source, and different tasks stay separate sources."""
    tasks: dict[str, Any] = {}
    groups: dict[tuple[str, ...], dict[str, list[TaskData]]] = {}
    for suite in suites:
        for t in suite.tasks:
            tasks.setdefault(t.name, t)
        for split in SPLITS:
            for src in suite.splits[split]:
                groups.setdefault(tuple(sorted(src.y)), {s: [] for s in SPLITS})[split].append(src)
    splits: dict[str, tuple[TaskData, ...]] = {s: () for s in SPLITS}
    for parts in groups.values():
        for split in SPLITS:
            if parts[split]:
                splits[split] += (_concat(parts[split]),)
    return TaskSuite(name, tuple(tasks.values()), splits)


def _concat(parts: Sequence[TaskData]) -> TaskData:
    if len(parts) == 1:
        return parts[0]
    index = None if any(p.index is None for p in parts) else torch.cat([p.index for p in parts])
    return TaskData(torch.cat([p.x for p in parts]), {k: torch.cat([p.y[k] for p in parts]) for k in parts[0].y},
                    index)


class Naive(Strategy):
    """Fine-tuning: each experience trains the model left by the previous one, with nothing against forgetting."""

    name = "naive"


@STRATEGIES.register("naive", summary="fine-tune on each experience in turn (the lower bound)")
def _naive(params: BaseModel) -> Strategy:
    return Naive()


class Cumulative(Strategy):
    """Train experience i on the data of experiences 0..i (an upper bound that keeps all past data)."""

    name = "cumulative"

    def train_suite(self, stream: Stream, index: int) -> TaskSuite:
        return union(f"{stream.name}/upto-{stream.experiences[index].name}",
                     [e.suite for e in stream.experiences[:index + 1]])


@STRATEGIES.register("cumulative", summary="each experience trains on all the data so far (upper bound)")
def _cumulative(params: BaseModel) -> Strategy:
    return Cumulative()


class Joint(Cumulative):
    """Every experience at once: one job on the union of the stream (the usual upper bound; no sequence)."""

    name = "joint"
    joint = True


@STRATEGIES.register("joint", summary="one model trained on every experience together (the upper bound)")
def _joint(params: BaseModel) -> Strategy:
    return Joint()


def build_strategy(name: str, params: dict[str, Any] | BaseModel | None, where: str) -> Strategy:
    """Strategy ``name`` built from its validated parameters."""
    strategy = STRATEGIES.build(name, params, where=where)
    if not isinstance(strategy, Strategy):
        raise DataError(f"strategy {name!r}: its builder returned {type(strategy).__name__}, not a Strategy")
    return strategy


class Composite(Strategy):
    """Several strategies on one run (e.g. replay + LwF), each called in order at every point; their extra losses
    add up, their gradient changes apply in order, and each keeps its own state under its own name. At most one
    may change what an experience trains on (``train_suite``); none may be joint."""

    name = "compose"

    def __init__(self, parts: Sequence[Strategy]) -> None:
        super().__init__()
        names = [p.name for p in parts]
        if len(parts) < 2 or len(set(names)) != len(names):
            raise ConfigError(f"strategy compose: give two or more different strategies, got {names}")
        if any(p.joint for p in parts):
            raise ConfigError("strategy compose: a joint strategy trains once on everything; it composes with nothing")
        own = [p for p in parts if type(p).train_suite is not Strategy.train_suite]
        if len(own) > 1:
            raise ConfigError(f"strategy compose: {[p.name for p in own]} each change the training data; compose at "
                              "most one of them")
        self.parts = list(parts)
        self.scenarios = tuple(s for s in SCENARIOS if all(s in p.scenarios for p in parts))
        self.name = "+".join(names)

    def begin(self, stream: Stream, index: int) -> None:
        super().begin(stream, index)
        for p in self.parts:
            p.seed = self.seed
            p.begin(stream, index)

    def wrap(self, model: torch.nn.Module, stream: Stream) -> torch.nn.Module:
        for p in self.parts:
            p.seed = self.seed  # wrap comes before begin: a part's added structure is drawn from the run's seed
            model = p.wrap(model, stream)
        return model

    def train_suite(self, stream: Stream, index: int) -> TaskSuite:
        own = [p for p in self.parts if type(p).train_suite is not Strategy.train_suite]
        return (own[0] if own else super()).train_suite(stream, index)

    def end(self, model: torch.nn.Module, stream: Stream, index: int, device: torch.device) -> None:
        for p in self.parts:
            p.end(model, stream, index, device)

    def init(self, run: Any) -> None:
        for p in self.parts:
            p.init(run)

    def on_step(self, run: Any, step: Any) -> None:
        for p in self.parts:
            p.on_step(run, step)

    def train_batch(self, run: Any, step: Any) -> Any:
        out = None
        for p in self.parts:
            b = p.train_batch(run, step)
            if b is not None:
                out = b
        return out

    def extra_loss(self, run: Any, step: Any) -> torch.Tensor | None:
        terms = [t for p in self.parts if (t := p.extra_loss(run, step)) is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def before_update(self, run: Any, step: Any) -> None:
        for p in self.parts:
            p.before_update(run, step)

    def on_epoch(self, run: Any, epoch: int) -> None:
        for p in self.parts:
            p.on_epoch(run, epoch)

    def state_dict(self) -> Any:
        return {p.name: p.state_dict() for p in self.parts}

    def load_state_dict(self, state: Any) -> None:
        for p in self.parts:
            p.load_state_dict(state[p.name])


class ComposeParams(BaseModel):
    """Parameters of ``compose``: the strategies to combine, each ``{name, params}`` or a bare name."""

    model_config = ConfigDict(extra="forbid")
    strategies: list[dict[str, Any] | str] = Field(min_length=2, description="e.g. [replay, {name: lwf, params: "
                                                   "{alpha: 1}}]")


@STRATEGIES.register("compose", params=ComposeParams, summary="several strategies together (e.g. replay + LwF)")
def _compose(params: ComposeParams) -> Strategy:
    parts = []
    for i, s in enumerate(params.strategies):
        entry = {"name": s} if isinstance(s, str) else s
        if entry.get("name") == "compose":
            raise ConfigError("strategy compose: list the strategies themselves, not another compose")
        parts.append(build_strategy(entry.get("name", ""), entry.get("params"), f"compose.strategies.{i}.params"))
    return Composite(parts)
