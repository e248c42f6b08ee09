"""The rehearsal memory shared by every rehearsal strategy (replay, DER, ER-ACE, A-GEM, GDumb).

A :class:`Buffer` holds at most ``size`` training rows: their inputs, every task's label (NaN where a row has none:
in the task scenario a row is labelled for its own experience's task only), the experience each came from, its
class-balancing group and, for DER, the model's outputs when it was stored. It is filled by offering it rows one
after another (a stream); what it keeps is decided by its policy:

- ``reservoir``: Vitter's algorithm R (1985, "Random sampling with a reservoir"). The p-th row offered (0-based,
  over the whole stream) goes to slot p while the buffer is not full; after that a draw j uniform in [0, p] replaces
  slot j when j < size. Every row offered so far is held with the same probability size / rows offered.
- ``class_balanced``: an equal share per group (a class; for a regression task, the task within one experience):
  while the buffer is not full every row enters; once full, a row of a group that is not among the largest enters
  in place of a random row of a largest group (ties broken at random), and a row of a largest group replaces a
  random row of its own group with probability held/offered of that group (algorithm R within the group: class-
  balanced reservoir sampling, Chrysakis & Moens 2020, "Online continual learning from imbalanced data"). With
  ``greedy`` (GDumb's sampler, Prabhu et al. 2020) such a row is dropped instead: the first rows of a class are
  the ones kept. When full, the group counts differ by at most one, except for groups that hold every row they
  were offered.

Every draw is a pure function of (seed, position of the row in the stream): a splitmix64 hash, no generator
state, so the buffer's tensors and counters are its whole state (``state_dict``) and a resumed run draws the same.
A buffer at least as large as the rows offered keeps every row, in arrival order, and draws nothing. Rows with no
label for any task teach nothing and are not offered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from polytask.engine.data import step_rows
from polytask.errors import ConfigError
from polytask.tasks.task import Task, TaskData

POLICIES = ("reservoir", "class_balanced")
_MASK = (1 << 64) - 1
_RESERVOIR, _BALANCE = 1, 2  # salts of the two policies' draws


def _mix(z: int) -> int:
    """splitmix64's finaliser (Steele, Lea & Flood 2014): a well-mixed 64-bit hash of a 64-bit integer."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def draw(*key: int) -> int:
    """A 64-bit integer, uniform and a pure function of the integers in ``key``."""
    h = 0
    for k in key:
        h = _mix(h ^ (k & _MASK))
    return h


def draws(last: np.ndarray, *key: int) -> np.ndarray:
    """``draw(*key, p)`` for every ``p`` of the uint64 array ``last`` at once (numpy's uint64 arithmetic wraps as
    ``_mix``'s masks do)."""
    z = (np.uint64(draw(*key)) ^ last) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@dataclass
class Sample:
    """Rows drawn from a buffer: the inputs and every task's labels (``data``; NaN where absent), the experience each
    came from, and the outputs stored with them (task -> rows x outputs; NaN rows where none was stored)."""

    data: TaskData
    experience: Tensor
    outputs: dict[str, Tensor]

    def to(self, device: torch.device) -> Sample:
        """The sample on ``device`` (itself when it is there)."""
        if self.data.x.device == torch.device(device):
            return self
        return Sample(self.data.to(device), self.experience.to(device),
                      {k: v.to(device) for k, v in self.outputs.items()})


OutputFn = Callable[[Tensor, Sequence[str]], dict[str, Tensor]]


class Buffer:
    """A fixed-capacity memory of training rows (module docstring). ``size`` 0 holds nothing."""

    def __init__(self, size: int, policy: str = "reservoir", greedy: bool = False) -> None:
        if size < 0:
            raise ConfigError(f"buffer size must be at least 0, got {size}")
        if policy not in POLICIES:
            raise ConfigError(f"buffer policy {policy!r} is not one of {list(POLICIES)}")
        self.size, self.policy, self.greedy = size, policy, greedy
        self.seen = 0  # rows offered so far
        self.x: Tensor | None = None
        self.y: dict[str, Tensor] = {}
        self.experience: Tensor | None = None
        self.group: Tensor | None = None  # each slot's group id, an index into ``groups``
        self.groups: list[str] = []
        self.offered: list[int] = []  # rows offered per group
        self.outputs: dict[str, Tensor] = {}
        self.version = 0  # changes whenever the rows held may change (what a reader caches per buffer state)

    def __len__(self) -> int:
        return 0 if self.x is None else len(self.x)

    def counts(self) -> dict[str, int]:
        """Rows held per group."""
        if self.group is None:
            return {}
        held = torch.bincount(self.group.cpu(), minlength=len(self.groups)).tolist()
        return {g: c for g, c in zip(self.groups, held, strict=True) if c}

    # ------------------------------------------------------------ filling

    def _group_ids(self, data: TaskData, experience: int, tasks: Sequence[Task]) -> tuple[Tensor, list[int]]:
        """The rows that are labelled for some task and each one's group id, registering groups not seen before in
        the order of their first row. A row's group: (task, class) for its first labelled task when that is a
        classification task, (task, experience) for a regression task."""
        n = len(data)
        owner = torch.full((n,), -1)  # index of the row's first labelled task in ``tasks``
        value = torch.zeros(n, dtype=torch.int64)  # its class
        for i, t in enumerate(tasks):
            if t.name in data.y:
                y = data.y[t.name].cpu()
                free = Task.mask(y) & (owner < 0)
                owner[free] = i
                if t.kind == "classification":
                    value[free] = y.reshape(n, -1)[:, 0][free].long()
        rows = (owner >= 0).nonzero().flatten()
        if not len(rows):
            return rows, []
        value = value[rows]
        low, span = int(value.min()), int(value.max() - value.min()) + 1
        codes, inverse = torch.unique(owner[rows] * span + (value - low), return_inverse=True)  # (task, class) pairs
        first = torch.full((len(codes),), len(rows)).scatter_reduce(0, inverse, torch.arange(len(rows)), "amin")
        gid = [0] * len(codes)
        for u in first.argsort().tolist():  # new groups are numbered in the order of their first row
            t, v = tasks[int(codes[u]) // span], int(codes[u]) % span + low
            key = f"{t.name}:{v}" if t.kind == "classification" else f"{t.name}@e{experience}"
            if key not in self.groups:
                self.groups.append(key)
                self.offered.append(0)
            gid[u] = self.groups.index(key)
        return rows, torch.tensor(gid)[inverse].tolist()

    def _decide(self, gids: Sequence[int], seed: int) -> list[tuple[int, int]]:
        """(row, slot) for every row that enters, in order, advancing the counters; a slot equal to the number of
        rows held so far appends."""
        held = len(self)
        if self.policy == "reservoir":
            return self._reservoir(gids, seed, held)
        out: list[tuple[int, int]] = []
        counts = [0] * len(self.groups)
        slots_of: dict[int, list[int]] = {g: [] for g in range(len(self.groups))}
        if self.policy == "class_balanced" and self.group is not None:
            for s, g in enumerate(self.group.tolist()):
                counts[g] += 1
                slots_of[g].append(s)
        for i, g in enumerate(gids):
            p = self.seen
            self.seen += 1
            self.offered[g] += 1
            if held < self.size:
                slot = held
                held += 1
            elif counts[g] < max(counts):  # a random row of a random largest group makes room
                largest = max(counts)
                victims = [h for h, c in enumerate(counts) if c == largest]
                old = victims[draw(seed, _BALANCE, p, 0) % len(victims)]
                pool = slots_of[old]
                k = draw(seed, _BALANCE, p, 1) % len(pool)
                slot = pool[k]
                pool[k] = pool[-1]
                pool.pop()
                counts[old] -= 1
            elif self.greedy:
                continue
            else:  # algorithm R within the group
                j = draw(seed, _BALANCE, p, 2) % self.offered[g]
                if j < counts[g]:
                    out.append((i, slots_of[g][j]))
                continue
            counts[g] += 1
            slots_of[g].append(slot)
            out.append((i, slot))
        return out

    def _reservoir(self, gids: Sequence[int], seed: int, held: int) -> list[tuple[int, int]]:
        """``_decide`` of the reservoir policy, whose draws do not depend on the decisions: the rows that find the
        buffer not full append, the p-th row offered after it draws j = ``draw(seed, _RESERVOIR, p) % (p + 1)``
        (all at once: :func:`draws`) and replaces slot j when j < size."""
        first = max(0, min(len(gids), self.size - held))
        out = [(i, held + i) for i in range(first)]
        p = np.arange(self.seen + first, self.seen + len(gids), dtype=np.uint64)
        j = draws(p, seed, _RESERVOIR) % (p + np.uint64(1))
        kept = np.flatnonzero(j < self.size)
        out += zip((kept + first).tolist(), j[kept].tolist(), strict=True)
        self.seen += len(gids)
        for g, c in enumerate(np.bincount(np.asarray(gids, dtype=np.int64), minlength=len(self.offered)).tolist()):
            self.offered[g] += c
        return out

    def offer(self, data: TaskData, experience: int, tasks: Sequence[Task], seed: int,
              outputs: OutputFn | None = None) -> int:
        """Offer the rows of ``data`` (in order) from experience ``experience``; ``tasks`` name the stream's tasks
        (their kinds decide the groups); ``outputs(x, tasks)``, when given, is called on the rows that enter and
        its outputs are stored with them (DER). Returns the number of rows written."""
        if self.size == 0 or len(data) == 0:
            return 0
        self.version += 1
        rows, gids = self._group_ids(data, experience, tasks)
        decided = self._decide(gids, seed)
        last: dict[int, int] = {}
        for i, slot in decided:  # a slot written twice in one offer keeps its last row
            last[slot] = i
        if not last:
            return 0
        order = sorted(last)
        slots = torch.tensor(order)
        picked = rows[torch.tensor([last[s] for s in order])]
        group = torch.tensor([gids[last[s]] for s in order])
        self._write(slots, data.take(picked.to(data.x.device)), experience, group, outputs)
        return len(slots)

    def _write(self, slots: Tensor, data: TaskData, experience: int, group: Tensor,
               outputs: OutputFn | None) -> None:
        device = data.x.device if self.x is None else self.x.device
        new = int(slots.max()) + 1 - len(self)
        if new > 0:
            self._grow(new, data, device)
        assert self.x is not None and self.experience is not None and self.group is not None
        slots = slots.to(device)
        self.x[slots] = data.x.to(device)
        for name in set(self.y) | set(data.y):
            if name not in self.y:
                tail = data.y[name].shape[1:]
                self.y[name] = torch.full((len(self), *tail), float("nan"), dtype=data.y[name].dtype, device=device)
            self.y[name][slots] = data.y[name].to(device) if name in data.y else float("nan")
        self.experience[slots] = experience
        self.group[slots] = group.to(device)
        if outputs is not None:
            labelled = [n for n in data.y if bool(Task.mask(data.y[n]).any())]
            out = outputs(data.x, labelled)
            for name in set(self.outputs) | set(out):
                value = out.get(name)
                if name not in self.outputs:
                    assert value is not None
                    self.outputs[name] = torch.full((len(self), *value.shape[1:]), float("nan"),
                                                    dtype=value.dtype, device=device)
                if value is None:
                    self.outputs[name][slots] = float("nan")
                    continue
                keep = Task.mask(data.y[name]).to(device)
                value = value.detach().to(device, self.outputs[name].dtype)
                self.outputs[name][slots] = torch.where(keep.reshape(-1, *[1] * (value.dim() - 1)), value,
                                                        torch.full_like(value, float("nan")))
        else:
            for name in self.outputs:
                self.outputs[name][slots] = float("nan")

    def _grow(self, n: int, data: TaskData, device: torch.device) -> None:
        def more(t: Tensor | None, like: Tensor, fill: float) -> Tensor:
            extra = torch.full((n, *like.shape[1:]), fill, dtype=like.dtype, device=device)
            return extra if t is None else torch.cat([t, extra])

        self.x = more(self.x, data.x, 0)
        self.y = {k: more(v, v, float("nan")) for k, v in self.y.items()}
        self.outputs = {k: more(v, v, float("nan")) for k, v in self.outputs.items()}
        self.experience = more(self.experience, torch.zeros(0, dtype=torch.int64), -1)
        self.group = more(self.group, torch.zeros(0, dtype=torch.int64), -1)

    # ------------------------------------------------------------ reading

    def slots(self, n: int, step: int, *key: int) -> Tensor | None:
        """The slots of ``n`` rows drawn without replacement (all of them when it holds fewer) for step ``step``, a
        pure function of (rows held, ``n``, ``step``, ``key``) (:func:`~polytask.engine.data.step_rows`); None when
        empty."""
        held = len(self)
        return step_rows(held, n, step, *key) if held else None

    def sample(self, n: int, step: int, *key: int) -> Sample | None:
        """The rows of :meth:`slots` as a :class:`Sample`; None when empty."""
        slots = self.slots(n, step, *key)
        return None if slots is None else self.take(slots)

    def take(self, rows: Tensor) -> Sample:
        """The rows ``rows`` (slot indices) as a :class:`Sample`."""
        assert self.x is not None and self.experience is not None
        rows = rows.to(self.x.device)
        return Sample(TaskData(self.x[rows], {k: v[rows] for k, v in self.y.items()}), self.experience[rows],
                      {k: v[rows] for k, v in self.outputs.items()})

    def everything(self) -> Sample | None:
        """Every row held, in slot order; None when empty."""
        return self.take(torch.arange(len(self))) if len(self) else None

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "x": self.x, "y": dict(self.y), "experience": self.experience,
                "group": self.group, "groups": list(self.groups), "offered": list(self.offered),
                "outputs": dict(self.outputs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.version += 1
        self.seen = int(state["seen"])
        self.x, self.experience, self.group = state["x"], state["experience"], state["group"]
        self.y, self.outputs = dict(state["y"]), dict(state["outputs"])
        self.groups, self.offered = list(state["groups"]), [int(c) for c in state["offered"]]
