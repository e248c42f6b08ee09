"""Tasks and suites: the one vocabulary shared by the joint, merging and continual regimes.

Targets are float tensors in which NaN marks a missing label: a row with a NaN target is masked for
that task only and still serves every other task. A regression task may carry the standardisation its
targets were given (fitted on the training split): losses are computed on that scale, metrics in the
original units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from polytask.errors import DataError

Kind = Literal["classification", "regression"]


@dataclass(frozen=True)
class Metric:
    """A named score of predictions against labelled targets, with its direction."""

    name: str
    higher_is_better: bool
    fn: Callable[[Tensor, Tensor], Tensor]

    def __call__(self, output: Tensor, target: Tensor) -> float:
        return float(self.fn(output, target))


def _accuracy(output: Tensor, target: Tensor) -> Tensor:
    return (output.argmax(-1) == target.long()).float().mean()


def _mse(output: Tensor, target: Tensor) -> Tensor:
    return ((output.reshape(target.shape) - target) ** 2).mean()


def _mae(output: Tensor, target: Tensor) -> Tensor:
    return (output.reshape(target.shape) - target).abs().mean()


ACCURACY = Metric("accuracy", True, _accuracy)
MSE = Metric("mse", False, _mse)
MAE = Metric("mae", False, _mae)


def _auc(output: Tensor, target: Tensor) -> Tensor:
    """ROC AUC of a two-class output (the logit difference as score) against 0/1 labels: the Mann-Whitney U
    statistic with tied scores given their average rank, in float64; NaN when one class is absent."""
    score = (output[:, 1] - output[:, 0] if output.dim() == 2 else output.reshape(-1)).double()
    y = target.reshape(-1).long()
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    order = torch.argsort(score)
    _, counts = torch.unique_consecutive(score[order], return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average = torch.repeat_interleave(ends - (counts.double() - 1) / 2, counts)  # 1-based average rank of each tie
    ranks = torch.empty_like(average)
    ranks[order] = average
    return (ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


AUC = Metric("auc", True, _auc)  # two-class targets with rare labels, where accuracy says little


@dataclass(frozen=True)
class Standardizer:
    """Per-column affine map to zero mean and unit variance, fitted on a training split.

    ``encode`` gives the scale models are trained on; ``decode`` maps back to the original units. A
    constant column keeps std 1, so it is only centred.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not all(s > 0 for s in self.std):
            raise DataError(f"standardizer: need one positive std per mean, got mean={self.mean} std={self.std}")

    @classmethod
    def fit(cls, values: Tensor) -> Standardizer:
        """Mean and population std of each column (a 1-D tensor is one column) over the rows without NaN,
        in float64; no such row gives the identity map."""
        v = values.double().reshape(len(values), -1)
        v = v[~torch.isnan(v).any(1)]
        if not len(v):
            return cls((0.0,) * v.shape[1], (1.0,) * v.shape[1])
        std = v.std(0, correction=0)
        return cls(tuple(v.mean(0).tolist()), tuple(torch.where(std > 0, std, 1.0).tolist()))

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (torch.tensor(self.mean, dtype=torch.float64, device=x.device),
                torch.tensor(self.std, dtype=torch.float64, device=x.device))

    def encode(self, x: Tensor) -> Tensor:
        """(x - mean) / std over the last dimension, computed in float64, returned in ``x``'s dtype."""
        mean, std = self._params(x)
        return ((x.double() - mean) / std).to(x.dtype)

    def decode(self, z: Tensor) -> Tensor:
        """z * std + mean in float64: back to the original units (whose squares may overflow float32)."""
        mean, std = self._params(z)
        return z.double() * std + mean

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Standardizer:
        """The standardizer that ``to_json`` wrote (a run's ``preprocessing.json``)."""
        return cls(tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]))


@dataclass(frozen=True)
class HeadSpec:
    """The task-specific head: hidden widths before the output layer (empty: one linear layer)."""

    hidden: tuple[int, ...] = ()


@dataclass(frozen=True)
class Task:
    """One prediction problem: its target, head, loss and metrics.

    ``n_outputs`` is the number of classes (classification) or target dimensions (regression).
    ``target`` names where the labels come from (a column, an attribute); it defaults to ``name``.
    ``classes`` are the original labels of the class indices (classification, when known); ``scale`` is
    the standardisation the regression targets were given: the loss is on that scale, ``scores`` (the
    metrics) are in the original units.
    """

    name: str
    kind: Kind
    n_outputs: int
    metrics: tuple[Metric, ...] = ()
    head: HeadSpec = HeadSpec()
    target: str = ""
    classes: tuple[Any, ...] = ()
    scale: Standardizer | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("classification", "regression"):
            raise DataError(f"task {self.name!r}: kind must be classification or regression, got {self.kind!r}")
        if self.n_outputs < 1 or (self.kind == "classification" and self.n_outputs < 2):
            raise DataError(f"task {self.name!r}: n_outputs={self.n_outputs} is too small for {self.kind}")
        if not self.metrics:
            default = (ACCURACY,) if self.kind == "classification" else (MSE, MAE)
            object.__setattr__(self, "metrics", default)
        if not self.target:
            object.__setattr__(self, "target", self.name)
        if self.classes and (self.kind != "classification" or len(self.classes) != self.n_outputs):
            raise DataError(f"task {self.name!r}: {len(self.classes)} class labels for a {self.kind} task "
                            f"with {self.n_outputs} outputs")
        if self.scale is not None and (self.kind != "regression" or len(self.scale.mean) != self.n_outputs):
            raise DataError(f"task {self.name!r}: a target standardizer of {len(self.scale.mean)} column(s) "
                            f"for a {self.kind} task with {self.n_outputs} outputs")

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-sample loss on labelled rows (cross-entropy or squared error)."""
        if self.kind == "classification":
            return F.cross_entropy(output, target.long(), reduction="none")
        return ((output.reshape(target.shape) - target) ** 2).reshape(len(target), -1).mean(1)

    def labels(self, target: Tensor) -> Tensor:
        """Labelled targets as the loss takes them: class indices as int64 for a classification task (its targets
        hold floats, so that NaN can mark a missing label), else the targets themselves."""
        return target.long() if self.kind == "classification" else target

    def mean_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The mean of :meth:`loss` over the rows; a classification task's is one fused cross-entropy (a step's
        loss: per-row losses then their mean cost twice the autograd nodes of it)."""
        if self.kind == "classification":
            return F.cross_entropy(output, target.long())
        return self.loss(output, target).mean()

    def decode(self, values: Tensor) -> Tensor:
        """Regression outputs or targets in the original units (unchanged when the task is not scaled)."""
        return values if self.scale is None else self.scale.decode(values)

    def scores(self, output: Tensor, target: Tensor) -> dict[str, float]:
        """Every metric of labelled rows, in the target's original units."""
        if self.scale is not None:
            output, target = self.decode(output.reshape(target.shape)), self.decode(target)
        return {m.name: m(output, target) for m in self.metrics}

    def preprocessing(self) -> dict[str, Any]:
        """How raw labels map to this task's targets and outputs back: class labels in index order, the
        target standardisation (None: raw units)."""
        return {"kind": self.kind, "target": self.target, "n_outputs": self.n_outputs,
                "classes": list(self.classes) or None,
                "standardize": None if self.scale is None else self.scale.to_json(),
                "head": list(self.head.hidden)}

    @classmethod
    def from_preprocessing(cls, name: str, data: dict[str, Any]) -> Task:
        """The task ``preprocessing()`` described (kind, outputs, head, class labels, target scaling), to rebuild
        a trained model and read its outputs; the metrics are the kind's defaults (they are not saved)."""
        scale = data.get("standardize")
        return cls(name, data["kind"], int(data["n_outputs"]), head=HeadSpec(tuple(data.get("head") or ())),
                   target=data.get("target") or name, classes=tuple(data.get("classes") or ()),
                   scale=None if scale is None else Standardizer.from_json(scale))

    @staticmethod
    def mask(target: Tensor) -> Tensor:
        """True where the row is labelled for this task."""
        missing = torch.isnan(target)
        return ~(missing if missing.dim() == 1 else missing.any(-1))


@dataclass
class TaskData:
    """Inputs and the targets of the tasks labelled on them (NaN = missing label).

    ``index`` records where each row came from (e.g. the source image ids of a pair), so tests and
    users can check split hygiene.
    """

    x: Tensor
    y: dict[str, Tensor]
    index: Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.x)
        for name, t in self.y.items():
            if len(t) != n:
                raise DataError(f"task {name!r}: {len(t)} targets for {n} inputs")

    def __len__(self) -> int:
        return len(self.x)

    def complete(self, task: str) -> bool:
        """Whether every row is labelled for ``task`` (checked once per source and task, then remembered: a step
        on such a source needs no mask). The targets are not to be changed in place after the first call."""
        known = self.__dict__.setdefault("_complete", {})
        if task not in known:
            known[task] = bool(Task.mask(self.y[task]).all())
        return known[task]

    def labels(self, task: Task) -> Tensor:
        """``task``'s targets as its loss takes them (class indices as int64 for a classification task, where the
        targets hold floats so that NaN can mark a missing label), converted once per source and task: for a source
        where every row is labelled (``complete``). The same contract as ``complete``: targets are not changed in
        place after the first call."""
        known = self.__dict__.setdefault("_labels", {})
        y = known.get(task.name)
        if y is None:
            y = known[task.name] = task.labels(self.y[task.name])
        return y

    @classmethod
    def labelled(cls, x: Tensor, y: dict[str, Tensor], labels: dict[str, Tensor]) -> TaskData:
        """A source whose every row is labelled for the tasks of ``labels``, which holds their targets as the loss
        takes them (what ``labels`` would give; not checked): a batch joined from complete sources (replay's) without
        its mask and cast computed again."""
        data = cls(x, y)
        data.__dict__["_complete"] = dict.fromkeys(labels, True)
        data.__dict__["_labels"] = dict(labels)
        return data

    def to(self, device: torch.device | str) -> TaskData:
        """The same data on ``device``: this source itself when every tensor is already there (its remembered
        ``complete`` and ``labels`` with it), else a new one (tensors already there are not copied)."""
        where = torch.device(device)
        if self.x.device == where and all(v.device == where for v in self.y.values()):
            return self
        return TaskData(self.x.to(device), {k: v.to(device) for k, v in self.y.items()}, self.index)

    def take(self, rows: Tensor) -> TaskData:
        """The rows ``rows`` of this source (inputs, every task's targets and the row index): a split or a batch."""
        return TaskData(
            self.x[rows],
            {k: v[rows] for k, v in self.y.items()},
            None if self.index is None else self.index[rows],
        )

    def only(self, tasks: Sequence[str]) -> TaskData:
        """The same rows labelled for ``tasks`` only (the targets of other tasks dropped; inputs shared, not copied)."""
        return TaskData(self.x, {k: v for k, v in self.y.items() if k in tasks}, self.index)


SPLITS = ("train", "val", "test")


def check_categorical(categorical: dict[int, int], input_shape: Sequence[int], where: str) -> None:
    """A DataError naming ``where`` unless ``categorical`` (column -> codes, unknown included) marks columns of 1-D
    inputs of ``input_shape`` with at least one code each."""
    if len(input_shape) != 1:
        raise DataError(f"{where}: categorical columns need inputs of one dimension (rows x columns), got input "
                        f"shape {tuple(input_shape)}")
    for column, codes in categorical.items():
        if not 0 <= column < input_shape[0] or codes < 1:
            raise DataError(f"{where}: categorical column {column} with {codes} code(s) does not fit inputs of "
                            f"{input_shape[0]} column(s) (need 0 <= column < {input_shape[0]} and codes >= 1)")


def categorical_from_json(data: dict[str, Any] | None) -> dict[int, int]:
    """The ``categorical`` map that ``TaskSuite.preprocessing()`` wrote (JSON keys are text; None: none)."""
    return {int(k): int(v) for k, v in (data or {}).items()}


@dataclass
class TaskSuite:
    """Tasks over data with train/val/test splits.

    Each split is a tuple of sources. A multi-target suite has one source labelled for every task; a
    multi-input suite has one source per task (or per group of tasks). Every task needs at least one
    labelled row in every split (else its validation or test score is undefined). ``info`` holds what the
    suite knows about itself, e.g. the planted grouping of the synthetic suite; ``input_scale`` is the
    standardisation the inputs were given (None: raw). ``categorical`` marks the input columns (of 1-D inputs) that
    hold category codes rather than numbers: column index -> number of codes, the unknown code 0 included (a model
    embeds them, :class:`polytask.models.embedding.Embedded`; ``input_scale`` leaves them as they are).
    """

    name: str
    tasks: tuple[Task, ...]
    splits: dict[str, tuple[TaskData, ...]]
    info: dict[str, Any] = field(default_factory=dict)
    input_scale: Standardizer | None = None
    categorical: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise DataError(f"suite {self.name!r}: duplicate task names in {names}")
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise DataError(f"suite {self.name!r}: missing split(s) {missing}")
        for split, sources in self.splits.items():
            covered = [k for src in sources for k in src.y]
            for n in names:
                if covered.count(n) != 1:
                    raise DataError(
                        f"suite {self.name!r}, split {split!r}: task {n!r} is labelled in "
                        f"{covered.count(n)} sources (need exactly 1)"
                    )
        labelled = {n: {split: int(Task.mask(src.y[n]).sum()) for split, sources in self.splits.items()
                        for src in sources if n in src.y} for n in names}
        for n, counts in labelled.items():
            empty = [split for split, c in counts.items() if c == 0]
            if empty:
                raise DataError(
                    f"suite {self.name!r}: task {n!r} has no labelled rows in the {' and '.join(empty)} split"
                    f"{'s' if len(empty) > 1 else ''} (labelled rows: "
                    f"{', '.join(f'{s} {c}' for s, c in counts.items())}); every task needs labels in "
                    f"{', '.join(self.splits)}"
                )
        shapes = {tuple(src.x.shape[1:]) for sources in self.splits.values() for src in sources}
        if len(shapes) != 1:
            raise DataError(f"suite {self.name!r}: inputs have different shapes {sorted(shapes)}")
        if self.categorical:
            check_categorical(self.categorical, self.input_shape, f"suite {self.name!r}")

    @property
    def task_names(self) -> list[str]:
        """The tasks' names, in the suite's order (the order of every K-long vector polytask returns)."""
        return [t.name for t in self.tasks]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input row (what a backbone is built for)."""
        return tuple(self.splits["train"][0].x.shape[1:])

    @property
    def multi_input(self) -> bool:
        """Whether the tasks are labelled on several sources (one per task or group of tasks), not one shared source."""
        return len(self.splits["train"]) > 1

    def task(self, name: str) -> Task:
        """The task called ``name``; an unknown name is a DataError listing the suite's tasks."""
        for t in self.tasks:
            if t.name == name:
                return t
        raise DataError(f"suite {self.name!r} has no task {name!r}; tasks: {', '.join(self.task_names)}")

    def subset(self, names: Sequence[str]) -> TaskSuite:
        """The same suite restricted to ``names`` (sources left with no task are dropped)."""
        tasks = tuple(self.task(n) for n in names)
        splits = {
            split: tuple(s.only(names) for s in sources if any(k in names for k in s.y))
            for split, sources in self.splits.items()
        }
        return replace(self, tasks=tasks, splits=splits)

    def preprocessing(self) -> dict[str, Any]:
        """The fitted maps between raw data and this suite's tensors (input standardisation, how a text column
        is tokenized, per task its class labels and target standardisation), as JSON: saved with a run so
        predictions can be made on new raw rows and read in the original units."""
        return {
            "suite": self.name,
            "input_shape": list(self.input_shape),
            "features": self.info.get("features"),
            "text": self.info.get("text"),
            "input_standardize": None if self.input_scale is None else self.input_scale.to_json(),
            "categorical": {str(i): n for i, n in sorted(self.categorical.items())} or None,
            "categories": self.info.get("categories"),
            "tasks": {t.name: t.preprocessing() for t in self.tasks},
        }

    def describe(self) -> dict[str, Any]:
        """Sizes and tasks, for listings and summaries."""
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "tasks": [
                {"name": t.name, "kind": t.kind, "n_outputs": t.n_outputs,
                 "metrics": [m.name for m in t.metrics]}
                for t in self.tasks
            ],
            "sizes": {s: [len(src) for src in srcs] for s, srcs in self.splits.items()},
            "multi_input": self.multi_input,
            "categorical": {str(i): n for i, n in sorted(self.categorical.items())},
        }
