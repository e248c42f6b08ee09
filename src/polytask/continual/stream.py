"""Streams: experiences that arrive one after another, in one of four scenarios (van de Ven, Tuytelaars & Tolias
2022, "Three types of incremental learning"; plus a multi-task suite shown one task at a time).

- ``task``: each experience is its own task with its own head; the task id is given at test time.
- ``class``: one task whose classes arrive a few at a time; one head over every class, no task id.
- ``domain``: one task with the same labels in every experience; the inputs shift.
- ``multitask``: the tasks of a multi-task suite, one per experience (a task-incremental stream of any suite).

An :class:`Experience` is a :class:`~polytask.tasks.task.TaskSuite` (train/val/test of the tasks it trains), so the
engine trains it like any job; a :class:`Stream` checks what must hold across experiences (one input shape; in the
class scenario every test class is trained by some experience).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from polytask.errors import ConfigError, DataError
from polytask.registry import Registry
from polytask.tasks.task import SPLITS, Task, TaskData, TaskSuite

Scenario = Literal["task", "class", "domain", "multitask"]
SCENARIOS: tuple[str, ...] = ("task", "class", "domain", "multitask")


@dataclass(frozen=True)
class Experience:
    """One step of a stream: a name and the suite it trains (its tasks and its train/val/test data)."""

    name: str
    suite: TaskSuite

    @property
    def tasks(self) -> tuple[Task, ...]:
        """The tasks this experience labels (its suite's)."""
        return self.suite.tasks


@dataclass(frozen=True)
class Stream:
    """Experiences in the order they arrive, their scenario, and what the stream records of itself (class order,
    permutation seeds, ...) in ``info``."""

    name: str
    scenario: str
    experiences: tuple[Experience, ...]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ConfigError(f"stream {self.name!r}: scenario {self.scenario!r} is not one of {list(SCENARIOS)}")
        if not self.experiences:
            raise DataError(f"stream {self.name!r} has no experiences")
        names = [e.name for e in self.experiences]
        if len(set(names)) != len(names):
            raise DataError(f"stream {self.name!r}: experience names repeat: {names}")
        shapes = {e.name: e.suite.input_shape for e in self.experiences}
        if len(set(shapes.values())) > 1:
            first = self.experiences[0]
            odd = next(n for n, s in shapes.items() if s != shapes[first.name])
            raise DataError(f"stream {self.name!r}: experience {odd!r} has inputs of shape {shapes[odd]}, "
                            f"experience {first.name!r} {shapes[first.name]}; a stream needs one input shape")
        kinds: dict[str, Task] = {}
        for e in self.experiences:
            for t in e.tasks:
                if t.name in kinds and kinds[t.name] != t:
                    raise DataError(f"stream {self.name!r}: task {t.name!r} of experience {e.name!r} differs from "
                                    "the task of that name in an earlier experience")
                kinds[t.name] = t
        if self.scenario in ("class", "domain") and len(kinds) != 1:
            raise DataError(f"stream {self.name!r}: a {self.scenario}-incremental stream has one task in every "
                            f"experience; found {sorted(kinds)}")
        if self.scenario == "class":
            self._check_classes()

    def _check_classes(self) -> None:
        (task,) = self.tasks
        trained: set[int] = set()
        for e in self.experiences:
            trained |= labelled_classes(e, "train", task)
        for e in self.experiences:
            unseen = sorted(labelled_classes(e, "test", task) - trained)
            if unseen:
                raise DataError(f"stream {self.name!r}: experience {e.name!r} tests class(es) "
                                f"{[task.classes[c] if task.classes else c for c in unseen]} that no experience "
                                "trains; a class-incremental model cannot predict a class it never saw")

    @property
    def tasks(self) -> tuple[Task, ...]:
        """Every task of the stream, in order of first arrival (the model has one head per task)."""
        seen: dict[str, Task] = {}
        for e in self.experiences:
            for t in e.tasks:
                seen.setdefault(t.name, t)
        return tuple(seen.values())

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input row (every experience shares it)."""
        return self.experiences[0].suite.input_shape

    def describe(self) -> dict[str, Any]:
        """Scenario, tasks and per-experience sizes, for summaries."""
        return {"name": self.name, "scenario": self.scenario, "input_shape": list(self.input_shape),
                "tasks": [t.name for t in self.tasks], "info": self.info,
                "experiences": [{"name": e.name, "tasks": [t.name for t in e.tasks],
                                 "sizes": {s: sum(len(d) for d in e.suite.splits[s]) for s in SPLITS}}
                                for e in self.experiences]}


def labelled_classes(e: Experience, split: str, task: Task) -> set[int]:
    """The class ids of ``task`` labelled in ``split`` of experience ``e``."""
    out: set[int] = set()
    for src in e.suite.splits[split]:
        if task.name in src.y:
            y = src.y[task.name]
            out |= {int(v) for v in y[Task.mask(y)].unique().tolist()}
    return out


# ---------------------------------------------------------------- building streams

StreamBuilder = Callable[[Any, int], Stream]
STREAMS: Registry[StreamBuilder] = Registry("stream")


def build_stream(name: str, params: dict[str, Any] | BaseModel | None, seed: int) -> Stream:
    """Build stream ``name`` from its parameters; the same seed gives the same stream (class order included)."""
    return STREAMS.build(name, params, seed, where="stream.params")


def class_splits(name: str, x: torch.Tensor, labels: np.ndarray, rows: dict[str, np.ndarray],
                 groups: Sequence[Sequence[int]], scenario: str, info: dict[str, Any],
                 names: Sequence[Any] | None = None) -> Stream:
    """A split stream (split-MNIST style): experience i holds the rows whose label is in ``groups[i]``.

    ``rows[split]`` are the row ids of each split. ``task``: experience i trains its own task ``e{i}`` whose classes
    are ``groups[i]`` (labels 0..len-1 in that order); ``class``: one task ``class`` over every class in the order
    of the groups (label = position in that order; ``Task.classes`` maps back to the original labels);
    ``domain``: one task ``position`` whose label is the position within the group (every group has the same
    size). ``names[c]``: how class ``c`` is written in ``Task.classes`` (default: ``c``)."""
    if scenario not in ("task", "class", "domain"):
        raise ConfigError(f"stream {name!r}: scenario must be task, class or domain, got {scenario!r}")
    order = [c for g in groups for c in g]
    if len(set(order)) != len(order):
        raise ConfigError(f"stream {name!r}: a class is in two experiences: {list(map(list, groups))}")
    sizes = {len(g) for g in groups}
    if scenario == "domain" and len(sizes) != 1:
        raise ConfigError(f"stream {name!r}: domain-incremental needs groups of one size, got {sorted(sizes)}")
    if min(sizes) < 2 and scenario != "class":
        raise ConfigError(f"stream {name!r}: each experience needs at least 2 classes for a {scenario} task")
    rank = {c: i for i, c in enumerate(order)}

    def written(cs: Sequence[int]) -> tuple[Any, ...]:
        return tuple(cs) if names is None else tuple(names[c] for c in cs)

    shared = Task("class", "classification", len(order), classes=written(order)) if scenario == "class" else \
        Task("position", "classification", len(groups[0])) if scenario == "domain" else None
    experiences = []
    for i, group in enumerate(groups):
        task = shared or Task(f"e{i}", "classification", len(group), classes=written(group))
        data = {}
        position = {c: j for j, c in enumerate(group)}
        for split in SPLITS:
            r = rows[split][np.isin(labels[rows[split]], group)]
            y = np.array([(rank if scenario == "class" else position)[int(c)] for c in labels[r]], dtype=np.int64)
            data[split] = (TaskData(x[torch.from_numpy(r)], {task.name: torch.from_numpy(y).float()},
                                    torch.from_numpy(r)),)
        experiences.append(Experience(f"e{i}", TaskSuite(f"{name}/e{i}", (task,), data)))
    return Stream(name, scenario, tuple(experiences), {**info, "groups": [list(map(int, g)) for g in groups]})


def seeded_groups(classes: Sequence[int], per_experience: int, order: Sequence[int] | None,
                  seed: int, shuffle: bool) -> list[list[int]]:
    """Classes cut into consecutive groups of ``per_experience``: in ``order`` if given, else shuffled by the seed
    (``shuffle``) or ascending. The order is part of the stream (recorded in its ``info``)."""
    classes = sorted(int(c) for c in classes)
    if order is not None:
        if sorted(order) != classes:
            raise ConfigError(f"stream.params.class_order: must be a permutation of {classes}, got {list(order)}")
        seq = [int(c) for c in order]
    elif shuffle:
        seq = [classes[i] for i in np.random.default_rng(seed).permutation(len(classes))]
    else:
        seq = classes
    if len(seq) % per_experience:
        raise ConfigError(f"stream.params.classes_per_experience: {per_experience} does not divide the "
                          f"{len(seq)} classes")
    return [seq[i:i + per_experience] for i in range(0, len(seq), per_experience)]


class SplitDigitsParams(BaseModel):
    """Parameters of ``split-digits``."""

    model_config = ConfigDict(extra="forbid")
    scenario: Literal["task", "class", "domain"] = Field("class", description="task, class or domain incremental")
    classes_per_experience: int = Field(2, ge=1, le=10)
    class_order: list[int] | None = Field(None, description="the classes in arrival order (default: by the seed "
                                          "when shuffle, else 0..9)")
    shuffle: bool = Field(False, description="draw the class order from the seed")
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.25, gt=0, lt=0.5)


@STREAMS.register("split-digits", params=SplitDigitsParams,
                  summary="scikit-learn's 8x8 digits in 5 experiences of 2 classes (task, class or domain)",
                  paper="split-MNIST protocol: Zenke et al. 2017; van de Ven et al. 2022")
def split_digits(params: SplitDigitsParams, seed: int) -> Stream:
    """The 1,797 scikit-learn digits (flattened to 64 values in [0, 1]), split into stratified train/val/test with
    the seed, then into experiences by class."""
    from polytask.tasks.suites._digits import sklearn_digits, stratified_split

    images, labels = sklearn_digits()
    x = torch.from_numpy(images.reshape(len(images), -1).copy())
    train_f = 1 - params.val_fraction - params.test_fraction
    parts = stratified_split(labels, [train_f, params.val_fraction, params.test_fraction],
                             np.random.default_rng(seed))
    groups = seeded_groups(range(10), params.classes_per_experience, params.class_order, seed, params.shuffle)
    return class_splits("split-digits", x, labels, dict(zip(SPLITS, parts, strict=True)), groups, params.scenario,
                        {"source": "sklearn.datasets.load_digits", "seed": seed})


def from_suite(name: str, suite: TaskSuite, order: Sequence[str] | None = None) -> Stream:
    """A multi-task suite as a task-incremental stream: one experience per task, in ``order`` (default: the suite's)."""
    order = list(order or suite.task_names)
    unknown = [t for t in order if t not in suite.task_names]
    if unknown:
        raise ConfigError(f"stream {name!r}: task(s) {unknown} are not in suite {suite.name!r} "
                          f"(tasks: {suite.task_names})")
    return Stream(name, "multitask", tuple(Experience(t, suite.subset([t])) for t in order),
                  {"suite": suite.name, "order": order})


class SuiteStreamParams(BaseModel):
    """Parameters of ``suite``: any built-in suite's tasks, one per experience."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="a built-in suite (see `polytask suites`)")
    params: dict[str, Any] = Field(default_factory=dict, description="the suite's parameters")
    order: list[str] | None = Field(None, description="the tasks in arrival order (default: the suite's)")


@STREAMS.register("suite", params=SuiteStreamParams,
                  summary="a multi-task suite shown one task at a time (task-incremental, one head per task)")
def suite_stream(params: SuiteStreamParams, seed: int) -> Stream:
    from polytask.tasks import build_suite

    suite = build_suite(params.name, params.params, seed)
    return from_suite(f"suite:{params.name}", suite, params.order)
