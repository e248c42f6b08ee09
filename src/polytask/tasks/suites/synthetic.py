"""``synthetic``: tasks with a planted grouping, to check that task-relation estimators find it.

Inputs are x ~ N(0, I_d). Each group shares a random two-layer tanh teacher (d -> hidden -> 1),
perturbed slightly per task; unrelated tasks have their own teacher; a conflicting pair is one
teacher and its negation. The planted structure is stored in ``info`` so tests and benchmarks can
score a grouping against it (in the spirit of the synthetic studies of Standley et al., 2020,
"Which Tasks Should Be Learned Together in Multi-task Learning?").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from polytask.registry import suggest
from polytask.tasks.registry import SUITES
from polytask.tasks.task import SPLITS, Task, TaskData, TaskSuite


def _pairs(n: int) -> list[tuple[str, str]]:
    """Names of the ``n`` conflicting pairs."""
    return [(f"c{i}_a", f"c{i}_b") for i in range(n)]


class SyntheticParams(BaseModel):
    """Parameters of the ``synthetic`` suite."""

    model_config = ConfigDict(extra="forbid")

    d: int = Field(16, ge=1, le=4096, description="input dimension")
    hidden: int = Field(32, ge=1, le=4096, description="hidden width of each teacher")
    groups: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [3, 3, 2], description="sizes of the groups of related tasks"
    )
    unrelated: int = Field(1, ge=0, le=1000, description="singleton tasks with their own teacher")
    conflicting_pairs: int = Field(
        1, ge=0, le=1000, description="pairs of tasks whose teachers are opposed (y_b = -y_a)"
    )
    kind: Literal["regression", "classification"] = Field(
        "regression", description="regression targets, or 2-class labels (f(x) + noise > 0)"
    )
    noise: float = Field(0.1, ge=0, le=100, description="std of the target noise")
    task_jitter: float = Field(
        0.1, ge=0, le=10, description="relative per-task perturbation of the group teacher"
    )
    n_train: int = Field(2000, ge=2, description="number of training rows")
    n_val: int = Field(500, ge=1, description="number of validation rows")
    n_test: int = Field(500, ge=1, description="number of test rows")
    missing: dict[str, Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=dict,
        description="task name -> fraction of its targets set to NaN in every split",
    )

    @model_validator(mode="after")
    def _check(self) -> SyntheticParams:
        names = [n for group in self.planted_groups() for n in group]
        if not names:
            raise ValueError("the suite has no tasks: give groups, unrelated or conflicting_pairs")
        for name in self.missing:
            if name not in names:
                raise ValueError(
                    f"missing: unknown task {name!r}{suggest(name, names)}; "
                    f"tasks: {', '.join(names)}"
                )
        return self

    def planted_groups(self) -> list[list[str]]:
        """Task names by planted group: each group, then each unrelated and conflicting task."""
        groups = [[f"g{g}_t{t}" for t in range(size)] for g, size in enumerate(self.groups)]
        groups += [[f"u{i}"] for i in range(self.unrelated)]
        groups += [[name] for pair in _pairs(self.conflicting_pairs) for name in pair]
        return groups


@dataclass(frozen=True)
class Teacher:
    """A two-layer tanh network x -> tanh(x w1 + b1) w2 with fixed random weights."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray

    @classmethod
    def random(cls, d: int, hidden: int, rng: np.random.Generator) -> Teacher:
        """Weights scaled so pre-activations and outputs have roughly unit variance."""
        return cls(
            rng.standard_normal((d, hidden)) / np.sqrt(d),
            0.5 * rng.standard_normal(hidden),
            rng.standard_normal(hidden) / np.sqrt(hidden),
        )

    def jittered(self, scale: float, rng: np.random.Generator) -> Teacher:
        """This teacher plus a random teacher times ``scale``."""
        other = Teacher.random(*self.w1.shape, rng)
        return Teacher(self.w1 + scale * other.w1, self.b1 + scale * other.b1,
                       self.w2 + scale * other.w2)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.tanh(x @ self.w1 + self.b1) @ self.w2


def _teachers(params: SyntheticParams, rng: np.random.Generator) -> dict[str, tuple[Teacher, int]]:
    """Each task's teacher and sign (-1 for the second task of a conflicting pair)."""
    out: dict[str, tuple[Teacher, int]] = {}
    for g, size in enumerate(params.groups):
        base = Teacher.random(params.d, params.hidden, rng)
        for t in range(size):
            out[f"g{g}_t{t}"] = (base.jittered(params.task_jitter, rng), 1)
    for i in range(params.unrelated):
        out[f"u{i}"] = (Teacher.random(params.d, params.hidden, rng), 1)
    for a, b in _pairs(params.conflicting_pairs):
        teacher = Teacher.random(params.d, params.hidden, rng)
        out[a] = (teacher, 1)
        out[b] = (teacher, -1)
    return out


@SUITES.register(
    "synthetic",
    params=SyntheticParams,
    summary="tasks from random tanh teachers with planted groups, unrelated and conflicting tasks",
)
def build(params: SyntheticParams, seed: int) -> TaskSuite:
    """Teacher outputs standardised on the train split (unit variance), plus Gaussian noise."""
    x_rng, teacher_rng, noise_rng, missing_rng = np.random.default_rng(seed).spawn(4)
    sizes = {"train": params.n_train, "val": params.n_val, "test": params.n_test}
    total = sum(sizes.values())
    x = x_rng.standard_normal((total, params.d))
    train = slice(0, params.n_train)
    targets: dict[str, np.ndarray] = {}
    for name, (teacher, sign) in _teachers(params, teacher_rng).items():
        f = teacher(x)
        f = (f - f[train].mean()) / max(float(f[train].std()), 1e-12)
        noisy = f + params.noise * noise_rng.standard_normal(total)
        if params.kind == "regression":
            targets[name] = sign * noisy  # an opposed task: y_b = -f(x) + its own noise
        else:
            targets[name] = (noisy > 0).astype(np.float64)
    if params.kind == "classification":  # an opposed task's label is the exact complement
        for a, b in _pairs(params.conflicting_pairs):
            targets[b] = 1 - targets[a]
    splits: dict[str, tuple[TaskData, ...]] = {}
    start = 0
    for split in SPLITS:
        rows = slice(start, start + sizes[split])
        y = {name: t[rows].astype(np.float32) for name, t in targets.items()}
        for name, fraction in params.missing.items():
            n = len(y[name])
            y[name][missing_rng.choice(n, round(fraction * n), replace=False)] = np.nan
        splits[split] = (TaskData(
            torch.from_numpy(x[rows].astype(np.float32)),
            {name: torch.from_numpy(t) for name, t in y.items()},
            torch.arange(start, start + sizes[split], dtype=torch.int64),
        ),)
        start += sizes[split]
    n_outputs = 1 if params.kind == "regression" else 2
    tasks = tuple(Task(name, params.kind, n_outputs) for name in targets)
    info = {
        "params": params.model_dump(mode="json"),
        "planted_groups": params.planted_groups(),
        "conflicting_pairs": [list(p) for p in _pairs(params.conflicting_pairs)],
    }
    return TaskSuite("synthetic", tasks, splits, info)
