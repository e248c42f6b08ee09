"""GDumb: Prabhu, Torr & Dokania 2020, "GDumb: A Simple Approach that Questions Our Progress in Continual Learning"
(ECCV; Sec. 3).

A greedy class-balanced sampler fills a memory of ``size`` rows from the stream: a row enters while the memory has
room; once full, a row of a class that is not among the largest enters in place of a random row of a largest class,
and a row of a largest class is dropped (``Buffer(policy="class_balanced", greedy=True)``). Before each evaluation,
a model is trained from scratch on the memory alone: each experience's job starts from the run's initial weights
(those the run's seed gave the model before the first experience, kept in the strategy's state) and trains on the
memory's rows only (``train_suite``: its train split is the memory, with every seen task's labels; its validation
and test splits those of the experiences seen so far).

How it fits the flow: the memory is filled in ``begin`` (with experience i's training rows, offered in an order
drawn from (seed, i)), the job's data is the memory (``train_suite``), and ``init`` puts the initial weights back
at the start of the job (a resumed job then loads its checkpoint over them). The optimiser is fresh for every
experience already. No flow change was needed.

Differences, documented: the paper trains with SGDR (cosine annealing with warm restarts), cutmix and many epochs,
and masks the logits of classes absent from the memory at inference; here the job trains as ``train`` says (the
same epochs and optimiser as the other strategies) and predicts over every class. The paper's sampler adds a row
while its class holds fewer than size / (classes seen) rows; here while its class is not a largest one (the counts
end within one of each other the same way). The official code, knowing the classes in advance, keeps the first
size / (classes) rows of each.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.continual.strategies.buffer import Buffer
from polytask.continual.strategy import STRATEGIES, Strategy, union
from polytask.continual.stream import Stream
from polytask.engine.data import permutation
from polytask.errors import ConfigError
from polytask.tasks.task import Task, TaskData, TaskSuite


class GDumbParams(BaseModel):
    """Parameters of ``gdumb``."""

    model_config = ConfigDict(extra="forbid")
    size: int = Field(200, ge=1, description="rows the memory holds (a memory larger than the data holds every row)")


class GDumb(Strategy):
    """GDumb (module docstring)."""

    name = "gdumb"

    def __init__(self, params: GDumbParams) -> None:
        super().__init__()
        self.buffer = Buffer(params.size, "class_balanced", greedy=True)
        self.initial: dict[str, Tensor] | None = None

    def begin(self, stream: Stream, index: int) -> None:
        super().begin(stream, index)
        for s, src in enumerate(stream.experiences[index].suite.splits["train"]):
            self.buffer.offer(src.take(permutation(len(src), self.seed, index, s)), index, stream.tasks, self.seed)

    def train_suite(self, stream: Stream, index: int) -> TaskSuite:
        seen = [e.suite for e in stream.experiences[:index + 1]]
        rest = union(f"{stream.name}/upto-{stream.experiences[index].name}", seen)
        memory = self.buffer.everything()
        if memory is None:
            raise ConfigError(f"strategy gdumb: experience {stream.experiences[index].name!r} left the memory empty")
        y = {t.name: memory.data.y.get(t.name, torch.full((len(memory.data),), float("nan"))) for t in rest.tasks}
        empty = [n for n, v in y.items() if not bool(Task.mask(v).any())]
        if empty:
            raise ConfigError(f"strategy gdumb: a memory of {self.buffer.size} rows holds no row of task(s) {empty} "
                              f"after experience {stream.experiences[index].name!r}; raise params.size to at least "
                              "one row per class of every task")
        return TaskSuite(f"{stream.name}/gdumb-{stream.experiences[index].name}", rest.tasks,
                         {"train": (TaskData(memory.data.x, y),), "val": rest.splits["val"],
                          "test": rest.splits["test"]})

    def init(self, run: Any) -> None:
        if self.initial is None:
            self.initial = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        else:
            run.model.load_state_dict(self.initial)

    def state_dict(self) -> Any:
        return {"buffer": self.buffer.state_dict(), "initial": self.initial}

    def load_state_dict(self, state: Any) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.initial = state["initial"]


@STRATEGIES.register("gdumb", params=GDumbParams,
                     summary="greedy class-balanced memory; a model trained from scratch on it alone before each "
                     "evaluation",
                     paper="Prabhu, Torr & Dokania 2020, GDumb: A Simple Approach that Questions Our Progress in "
                     "Continual Learning (ECCV)")
def _gdumb(params: GDumbParams) -> Strategy:
    return GDumb(params)
