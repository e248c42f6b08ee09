"""One labelled dataset seen through a different lens per experience (permuted, rotated or noisier inputs): the
experiences of a stream with the same classes each, in the task, class or domain scenario.

``domain`` (the usual protocol for permuted/rotated MNIST): one task over the classes, the same head in every
experience; ``task``: one head per experience (the experience is the task id); ``class``: experience i's classes
are new classes ``i * C + c`` of one growing head (van de Ven, Tuytelaars & Tolias 2022, "Three types of incremental
learning", permuted MNIST in all three scenarios).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from polytask.continual.stream import Experience, Stream
from polytask.errors import ConfigError
from polytask.tasks.task import SPLITS, Task, TaskData, TaskSuite

Split = tuple[torch.Tensor, np.ndarray, np.ndarray]
"""One split of one experience: inputs, integer labels in 0..C-1 and the source row ids."""


def domain_stream(name: str, scenario: str, experiences: Sequence[tuple[str, Mapping[str, Split]]],
                  classes: Sequence[Any], task: str, info: dict[str, Any]) -> Stream:
    """A stream whose experiences label the same ``classes`` (``task``: the shared task's name in the domain
    scenario). ``experiences``: (name, {split: (x, labels, index)}) in arrival order."""
    if scenario not in ("task", "class", "domain"):
        raise ConfigError(f"stream {name!r}: scenario must be task, class or domain, got {scenario!r}")
    n = len(classes)
    every = tuple(f"{e}:{c}" for e, _ in experiences for c in classes)
    shared = {"domain": Task(task, "classification", n, classes=tuple(classes)),
              "class": Task("class", "classification", n * len(experiences), classes=every)}.get(scenario)
    out = []
    for i, (ename, splits) in enumerate(experiences):
        t = shared or Task(f"e{i}", "classification", n, classes=tuple(classes))
        offset = i * n if scenario == "class" else 0
        data = {s: (TaskData(x, {t.name: torch.from_numpy(labels.astype(np.int64) + offset).float()},
                             torch.from_numpy(index.astype(np.int64))),)
                for s, (x, labels, index) in ((s, splits[s]) for s in SPLITS)}
        out.append(Experience(ename, TaskSuite(f"{name}/{ename}", (t,), data)))
    return Stream(name, scenario, tuple(out), info)
