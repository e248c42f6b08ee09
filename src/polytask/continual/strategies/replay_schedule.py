"""Replay scheduling: Klasson, Kjellström & Zhang 2023, "Learn the Time to Learn: Replay Scheduling in Continual
Learning" (TMLR; arXiv 2209.08660; official code github.com/marcusklasson/replay_scheduling).

Historical data is kept in a store (the paper assumes storing it is cheap), but only a small replay memory of ``M``
rows (``memory``) may be replayed while an experience trains. A *replay schedule* says, for every experience t ≥ 1,
which proportions ``p_t = (p_t,0, ..., p_t,t-1)`` of the memory come from each earlier experience (``Σ_j p_t,j = 1``);
the memory of experience t holds ``m_j ≈ p_t,j · M`` rows of experience j. Each step then trains on the current batch
concatenated with a batch drawn from that memory, as experience replay does (``replay``'s loss; with ``weight``
λ = 1 the mean over the concatenated batch, as the official ``train_batch``). The default schedule is the paper's
equal task schedule (ETS): ``p_t,j = 1/t``. The schedule that does best is searched for by Monte Carlo tree search
(:mod:`polytask.flows.schedule_search`).

How it maps to the code: the store is the rehearsal :class:`~polytask.continual.strategies.buffer.Buffer` (``size``
rows, ``policy`` class-balanced by default: the official code keeps the same number of rows per class), filled once
an experience is trained (``update: experience``, the paper's setting). At the start of experience t the memory is
composed from it (:func:`apportion` then :func:`balanced_order`), and each step's buffer batch (``batch_size`` rows,
default the training batch size, without replacement; all of them when the memory is smaller) is drawn from the
memory only (``Rehearsal.draw``), keyed by (seed, experience, step) like every rehearsal draw. The memory is a pure
function of the store and (seed, t), so it is not part of the state: a resumed run composes the same one.

The composition (``apportion``): ``floor`` rows of every earlier experience first (0 by default; the official code
gives each earlier task ``classes per task`` rows in the class scenario whatever its proportion), then the rest
``R = M − floors`` by largest remainders: ``⌊p_j R⌋`` each and one more to the largest fractional parts (ties: the
older experience), as the official ``_divide_memory_size_into_parts_based_on_partition``. Within an experience the
rows are taken class by class in turn (the official code also balances the classes of a task), in an order drawn
from (seed, experience, class), so a larger share is a superset of a smaller one.

Differences, documented:

- The official code stores ``examples_per_class`` rows of every class seen, so its store grows with the stream; here
  the store is a fixed-size buffer (``size``; class-balanced: once full, a new class takes its share from the largest
  ones). A store at least as large as the training rows keeps every row (the paper's setting: all historical data
  stored).
- When an experience holds fewer rows than its share, the official code caps it and gives the rows left over to any
  task, proportion zero included; here they go to the experiences whose proportion is positive (largest first, then
  the older), so a schedule that does not replay an experience never does. If none has room the memory is smaller
  than ``M``. Likewise, while everything stored fits in ``M`` rows, the official code replays all of it whatever
  the schedule; here the schedule applies from the start.
- The official code draws the rows of each class as the first ones stored, and each step's replay batch with a numpy
  generator seeded per task; here both are seeded draws keyed by position (resume is bit-identical).
- The schedule is given explicitly (``schedule``; one entry per experience after the first, each entry one
  proportion per earlier experience). The official code pads every entry with zeros to T − 1 values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from polytask.continual.strategies.replay import Replay, ReplayParams
from polytask.continual.strategy import STRATEGIES, Strategy
from polytask.continual.stream import Stream
from polytask.engine.data import permutation, step_rows
from polytask.errors import ConfigError

_ORDER = 0x5C4ED  # salt of the within-class order of the memory's rows
TOLERANCE = 1e-6  # how far from 1 a schedule entry may sum


def equal_task_schedule(n_experiences: int) -> list[list[float]]:
    """The paper's equal task schedule (ETS): experience t replays every earlier experience in the same proportion."""
    return [[1.0 / t] * t for t in range(1, n_experiences)]


def check_schedule(schedule: Sequence[Sequence[float]]) -> list[list[float]]:
    """The schedule as lists of floats, or a ValueError naming the first bad entry: entry k is experience k + 1's
    proportions over experiences 0..k (k + 1 values, each finite and ≥ 0, summing to 1)."""
    out = []
    for k, entry in enumerate(schedule):
        where = f"schedule[{k}] (experience {k + 1})"
        values = [float(v) for v in entry]
        if len(values) != k + 1:
            raise ValueError(f"{where} gives {len(values)} proportion(s); experience {k + 1} has {k + 1} earlier "
                             f"experience(s), one proportion each (experiences 0..{k})")
        bad = next((j for j, v in enumerate(values) if not math.isfinite(v) or v < 0), None)
        if bad is not None:
            raise ValueError(f"{where}: proportion {bad} (experience {bad}) is {values[bad]}; proportions are finite "
                             "and at least 0")
        if abs(sum(values) - 1) > TOLERANCE:
            raise ValueError(f"{where} sums to {sum(values):.6g}, not 1: {values}")
        out.append(values)
    return out


def apportion(proportions: Sequence[float], total: int, available: Sequence[int], floor: int = 0) -> list[int]:
    """Rows of each earlier experience in a memory of ``total`` rows (module docstring): ``floor`` each, the rest by
    largest remainders of ``proportions``, capped at ``available``, what the caps leave given to the experiences with
    a positive proportion that have room (largest proportion first, then the older)."""
    if len(proportions) != len(available):
        raise ValueError(f"{len(proportions)} proportions for {len(available)} experiences")
    p = [Fraction(v).limit_denominator(10**6) for v in proportions]  # exact shares: 2/3 * 9 is 6, not 5.999...
    n = [min(floor, a) for a in available]
    rest = max(0, total - sum(n))
    quota = [q * rest for q in p]
    n = [k + math.floor(q) for k, q in zip(n, quota, strict=True)]
    left = rest - sum(math.floor(q) for q in quota)
    by_remainder = sorted(range(len(p)), key=lambda j: (-(quota[j] - math.floor(quota[j])), j))
    for j in by_remainder[:left]:
        n[j] += 1
    over = sum(max(0, k - a) for k, a in zip(n, available, strict=True))
    n = [min(k, a) for k, a in zip(n, available, strict=True)]
    receivers = sorted((j for j in range(len(p)) if p[j] > 0), key=lambda j: (-p[j], j))
    while over > 0 and any(n[j] < available[j] for j in receivers):
        for j in receivers:
            if over and n[j] < available[j]:
                n[j] += 1
                over -= 1
    return n


def balanced_order(slots: Tensor, groups: Tensor, *key: int) -> Tensor:
    """``slots`` reordered class by class in turn (round robin over the groups, ascending group id), each group's
    slots in a random order drawn from (key, group): the first m of them are as class-balanced as m allows."""
    ranks = torch.empty(len(slots), dtype=torch.int64)
    for g in groups.unique().tolist():
        where = (groups == g).nonzero().flatten()
        ranks[where[permutation(len(where), *key, g)]] = torch.arange(len(where))
    order = sorted(range(len(slots)), key=lambda i: (int(ranks[i]), int(groups[i])))
    return slots[torch.tensor(order, dtype=torch.int64)] if order else slots


class ReplayScheduleParams(ReplayParams):
    """Parameters of ``replay_schedule``."""

    size: int = Field(1000, ge=0, description="rows of historical data the store keeps (a store larger than the "
                      "training rows keeps all of them)")
    policy: Literal["reservoir", "class_balanced"] = Field("class_balanced", description="how the store chooses its "
                                                           "rows: class_balanced (the official code) or reservoir")
    update: Literal["experience"] = Field("experience", description="rows enter the store once an experience is "
                                          "trained (the paper)")
    memory: int = Field(100, ge=0, description="M: rows of the replay memory each experience replays from, composed "
                        "from the store as the schedule says")
    schedule: list[list[float]] | None = Field(None, description="per experience after the first, the proportion of "
                                               "the memory from each earlier experience, e.g. [[1], [0.5, 0.5], [0, "
                                               "0.5, 0.5]] (default: the equal task schedule)")
    floor: int = Field(0, ge=0, description="rows of every earlier experience in the memory whatever its proportion")

    @field_validator("schedule")
    @classmethod
    def _valid(cls, v: list[list[float]] | None) -> list[list[float]] | None:
        return None if v is None else check_schedule(v)


class ReplaySchedule(Replay):
    """Replay from a memory whose composition over earlier experiences follows a schedule (module docstring)."""

    name = "replay_schedule"

    def __init__(self, params: ReplayScheduleParams) -> None:
        super().__init__(params)
        self.schedule = params.schedule
        self.memory_size, self.floor = params.memory, params.floor
        self.memory: Tensor | None = None  # store slots of the current experience's replay memory

    def check(self, stream: Stream, label: str) -> None:
        """The scenario (every one applies), the schedule's length and the floors' total against the stream."""
        super().check(stream, label)
        n = len(stream.experiences)
        if self.schedule is not None and len(self.schedule) != n - 1:
            raise ConfigError(f"strategy {label!r}: schedule has {len(self.schedule)} entries; stream {stream.name!r} "
                              f"has {n} experiences, so give {n - 1} (one per experience after the first)")
        if self.floor * (n - 1) > self.memory_size:
            raise ConfigError(f"strategy {label!r}: floor {self.floor} rows for each of the {n - 1} earlier "
                              f"experiences of the last one exceed memory {self.memory_size}")

    def proportions(self, index: int) -> list[float]:
        """The composition of experience ``index``'s memory over experiences 0..index-1 (ETS by default)."""
        if index == 0:
            return []
        if self.schedule is None:
            return [1.0 / index] * index
        if index > len(self.schedule):
            raise ConfigError(f"strategy {self.name!r}: the schedule has no entry for experience {index} (it has "
                              f"{len(self.schedule)}: experiences 1..{len(self.schedule)})")
        return self.schedule[index - 1]

    def begin(self, stream: Stream, index: int) -> None:
        super().begin(stream, index)
        self.memory = self.compose()

    def compose(self) -> Tensor:
        """The store slots of the current experience's replay memory: each earlier experience's rows in
        :func:`balanced_order`, as many as :func:`apportion` gives it."""
        empty = torch.zeros(0, dtype=torch.int64)
        if self.index == 0 or self.buffer.experience is None or self.memory_size == 0:
            return empty
        assert self.buffer.group is not None
        experience, group = self.buffer.experience.cpu(), self.buffer.group.cpu()
        slots = [(experience == j).nonzero().flatten() for j in range(self.index)]
        counts = apportion(self.proportions(self.index), self.memory_size, [len(s) for s in slots], self.floor)
        parts = [balanced_order(s, group[s], self.seed, _ORDER, j)[:m] for j, (s, m) in enumerate(zip(slots, counts,
                                                                                                      strict=True))]
        return torch.cat(parts) if parts else empty

    def draw_rows(self, n: int, global_step: int, k: int) -> Tensor | None:
        if self.memory is None or not len(self.memory):
            return None
        return self.memory[step_rows(len(self.memory), n, global_step, self.seed, self.index, k)]

    def load_state_dict(self, state: Any) -> None:
        super().load_state_dict(state)
        if self.stream is not None:
            self.memory = self.compose()


@STRATEGIES.register("replay_schedule", params=ReplayScheduleParams,
                     summary="replay from a fixed-size memory composed over earlier experiences by a replay schedule "
                     "(default: equal task schedule; search one with MCTS)",
                     paper="Klasson, Kjellström & Zhang 2023, Learn the Time to Learn: Replay Scheduling in Continual "
                     "Learning (TMLR)")
def _replay_schedule(params: ReplayScheduleParams) -> Strategy:
    return ReplaySchedule(params)
