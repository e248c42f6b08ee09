"""A user's own torch Datasets as a stream, from Python (configs name registered streams instead)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from polytask.continual.stream import Experience, Stream
from polytask.errors import ConfigError, DataError
from polytask.tasks.task import SPLITS, Task, TaskSuite


def _experience_tasks(tasks: Task | Sequence[Task | Sequence[Task]], n: int, name: str) -> list[tuple[Task, ...]]:
    if isinstance(tasks, Task):
        return [(tasks,)] * n
    tasks = list(tasks)
    if len(tasks) != n:
        raise ConfigError(f"stream {name!r}: tasks has {len(tasks)} entries for {n} experiences; give one Task "
                          "(every experience trains it) or one Task or list of Tasks per experience")
    return [(t,) if isinstance(t, Task) else tuple(t) for t in tasks]


def stream_from_datasets(name: str, scenario: str,
                         experiences: Sequence[Sequence[Any]] | Mapping[str, Sequence[Any]],
                         tasks: Task | Sequence[Task | Sequence[Task]], batch_size: int = 256,
                         info: dict[str, Any] | None = None) -> Stream:
    """A stream of the user's map-style torch ``Dataset``s (or ``DataLoader``s), read into memory once.

    ``experiences``: per experience ``(train, val, test)`` (``(train, val)``: val is also the test split, as in
    ``polytask.fit``), in arrival order; a mapping names them (default names ``e0``, ``e1``, ...). Each source is
    read as ``polytask.fit`` reads it (:class:`polytask.engine.data.DatasetBatches`): items ``(x, {task: y})``, or
    ``(x, y)`` when the experience trains one task, or a dict task -> source of ``(x, y)``; a missing or NaN label
    masks the row. ``tasks``: one :class:`~polytask.tasks.task.Task` that every experience trains (the class and
    domain scenarios), or per experience its Task or list of Tasks (``task``/``multitask``: a head per task).
    Class-incremental labels are positions in one growing list of classes, as in the built-in streams. The
    :class:`~polytask.continual.stream.Stream` checks what must hold across experiences (one input shape, no class
    tested but never trained, ...); an empty split is an error naming its experience."""
    from polytask.engine.data import DatasetBatches

    named = list(experiences.items()) if isinstance(experiences, Mapping) else \
        [(f"e{i}", e) for i, e in enumerate(experiences)]
    if not named:
        raise DataError(f"stream {name!r} has no experiences")
    out = []
    for (ename, sources), ts in zip(named, _experience_tasks(tasks, len(named), name), strict=True):
        sources = list(sources)
        if len(sources) not in (2, 3):
            raise ConfigError(f"stream {name!r}, experience {ename!r}: give (train, val, test) or (train, val), "
                              f"got {len(sources)} sources")
        if len(ts) == 1:  # one task: plain (x, y) items are its labels
            sources = [s if s is None or isinstance(s, Mapping) else {ts[0].name: s} for s in sources]
        try:
            data = DatasetBatches(ts, *sources, batch_size=batch_size)
            splits = {s: tuple(data.split(s)) for s in SPLITS}
            suite = TaskSuite(f"{name}/{ename}", ts, splits)
        except DataError as e:
            raise DataError(f"stream {name!r}, experience {ename!r}: {e}") from None
        out.append(Experience(str(ename), suite))
    return Stream(name, scenario, tuple(out), dict(info or {}))
