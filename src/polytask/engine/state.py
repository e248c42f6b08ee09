"""The loop state of a job, typed (flax's ``TrainState`` is the model): its fields are what a checkpoint holds.

The model, optimiser and scheduler are held live and checkpointed by their state dicts; the method state,
data position, running epoch totals, best epoch, history and every hook's state are plain trees; the RNG
states are read when the checkpoint is written. ``tree()`` is the checkpoint (always the same keys in the same
order, so identical runs write identical bytes) and ``restore`` reads one back.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import add
from typing import Any

import numpy as np
import torch
from torch import Tensor

from polytask.engine.hooks import Hook
from polytask.errors import CheckpointError


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (torch's CPU one, and CUDA's where CUDA is available:
    ``torch.manual_seed`` would also queue a lazy seeding, with a formatted stack, for each accelerator that is not
    initialised, at every job)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch, CUDA if initialised, numpy, Python) as a checkpoint tree."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _python_state(),
    }


def _python_state() -> list[Any]:
    """Python's generator state with its 625 words as one int64 tensor: a checkpoint node, not 625 JSON numbers to
    encode at every save."""
    v, internal, gauss = random.getstate()
    return [v, torch.from_numpy(np.array(internal, dtype=np.int64)), gauss]  # 4x faster than torch.tensor(tuple)


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    v, internal, gauss = state["python"]  # internal: a tensor, or a list in checkpoints of older versions
    random.setstate((v, tuple(internal.tolist() if isinstance(internal, torch.Tensor) else internal), gauss))


@dataclass
class Position:
    """Where the loop is: 0-based epoch, step within it, and steps taken over the whole job."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


@dataclass
class EpochTotals:
    """Running sums over the current epoch: per-task loss and weight (Python floats: float64, each float32 value
    widened exactly), steps, steps with weights."""

    loss: list[float]
    weight: list[float]
    n: int = 0
    nw: int = 0

    def __post_init__(self) -> None:  # checkpoints of earlier versions hold the sums as float64 tensors
        if isinstance(self.loss, Tensor):
            self.loss = self.loss.tolist()
        if isinstance(self.weight, Tensor):
            self.weight = self.weight.tolist()

    @classmethod
    def zeros(cls, k: int) -> EpochTotals:
        return cls([0.0] * k, [0.0] * k)

    def add(self, losses: list[float], weights: list[float] | None) -> None:
        """Count one step's K losses (and weights, when the method has them)."""
        self.loss = list(map(add, self.loss, losses))  # K sums each (map: no comprehension frame a step)
        if weights is not None:
            self.weight = list(map(add, self.weight, weights))
            self.nw += 1
        self.n += 1


@dataclass
class Best:
    """The best-validation epoch so far: its score (lower is better), number, scores and weights."""

    score: float = float("inf")
    epoch: int = -1
    val: dict[str, dict[str, float]] = field(default_factory=dict)
    model: dict[str, Tensor] | None = None


@dataclass
class LoopState:
    """Everything a job needs to continue exactly where it stopped (with the RNG states, read at save time)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    method: Any
    position: Position
    totals: EpochTotals
    best: Best = field(default_factory=Best)
    history: list[dict[str, Any]] = field(default_factory=list)
    hooks: Sequence[Hook] = ()
    # saved states of hooks not riding on this resumption, written back unchanged (a hook riding on it that has no
    # saved state starts from its ``init``)
    carried: dict[str, Any] = field(default_factory=dict)

    def tree(self) -> dict[str, Any]:
        """The checkpoint: state dicts, RNG states and the loop's fields (hooks with no state are left out)."""
        hooks = dict(self.carried)
        for h in self.hooks:
            s = h.state_dict()
            if s is not None:
                hooks[h.name] = s
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": rng_state(),
            "position": vars(self.position),
            "method": self.method,
            "totals": vars(self.totals),
            "best": vars(self.best),
            "history": self.history,
            "hooks": hooks,
        }

    def restore(self, tree: dict[str, Any], where: str = "checkpoint") -> None:
        """Load a checkpoint written by :meth:`tree`."""
        if "epoch_acc" in tree:
            raise CheckpointError(f"{where} was written by an older polytask (untyped loop state); delete it to "
                                  "train the job again from the start")
        missing = [k for k in ("model", "optimizer", "rng", "position", "method", "totals", "best", "history",
                               "hooks") if k not in tree]
        if missing:
            raise CheckpointError(f"{where} lacks {missing}: not a polytask training checkpoint")
        self.model.load_state_dict(tree["model"])
        self.optimizer.load_state_dict(tree["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(tree["scheduler"])
        set_rng_state(tree["rng"])
        self.position = Position(**tree["position"])
        self.method = tree["method"]
        self.totals = EpochTotals(**tree["totals"])
        self.best = Best(**tree["best"])
        self.history = tree["history"]
        saved = dict(tree["hooks"])
        for h in self.hooks:
            if h.name in saved:
                h.load_state_dict(saved.pop(h.name))
        self.carried = saved
