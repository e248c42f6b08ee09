"""The user's own ``nn.Module`` as a :class:`MultiTaskModel`: ``polytask.fit`` and ``model.factory`` wrap it.

The module returns a dict task -> output; which of its parameters are task-specific is said by the caller
(``heads``, ``encoder``), never read from the module's attributes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from polytask.errors import ConfigError, DataError
from polytask.models.sharing import MultiTaskModel
from polytask.tasks.task import Task


class UserModel(MultiTaskModel):
    """The engine's view of a user's module: ``forward(x, tasks)`` keeps the named outputs of ``model(x)``.

    Which parameters belong to which task is said, not guessed: ``heads`` (task -> module) are the task-specific
    parameters and everything else is shared (no heads: every parameter is shared, which is exact for every
    method). With an ``encoder`` too, the model is ``heads[t](encoder(x))`` and representation-mode aggregators
    get the encoder's output as the shared features."""

    def __init__(self, model: nn.Module, tasks: Sequence[Task], heads: Mapping[str, nn.Module] | None = None,
                 encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.model, self.names = model, [t.name for t in tasks]
        self.task_names = self.names
        # plain dict and tuple: the heads and encoder are parts of ``model``, not modules of their own
        self._heads, self._encoder = dict(heads or {}), (encoder,)
        unknown = sorted(set(self._heads) - set(self.names))
        if unknown:
            raise ConfigError(f"model heads: unknown task(s) {unknown}; tasks are {self.names}")
        own = {id(p) for p in model.parameters()}
        parts = [*(f"heads[{k!r}]" for k in self._heads), *(["encoder"] if encoder is not None else [])]
        for part, mod in zip(parts, [*self._heads.values(), *([encoder] if encoder is not None else [])],
                             strict=True):
            if any(id(p) not in own for p in mod.parameters()):
                raise ConfigError(f"model {part}: its parameters must be parameters of the model")

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return iter(self._heads[task].parameters()) if task in self._heads else iter(())

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        own = {id(p) for h in self._heads.values() for p in h.parameters()}
        return (p for p in self.model.parameters() if id(p) not in own)

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        out = self.model(x)
        if not isinstance(out, Mapping):
            raise DataError(f"model: the model must return a dict task -> output, got {type(out).__name__}")
        names = list(tasks or self.names)
        missing = [n for n in names if n not in out]
        if missing:
            raise DataError(f"model: the model's output has no entry for task(s) {missing} (has {sorted(out)})")
        return {n: out[n] for n in names}


class EncodedUserModel(UserModel):
    """A user's model that is ``heads[t](encoder(x))``: the encoder's output is the shared features that
    representation-mode aggregators differentiate against (``features``/``outputs``)."""

    def __init__(self, model: nn.Module, tasks: Sequence[Task], heads: Mapping[str, nn.Module],
                 encoder: nn.Module) -> None:
        super().__init__(model, tasks, heads, encoder)
        if set(self._heads) != set(self.names):
            raise ConfigError("model encoder: the shared features need a head for every task "
                              f"(heads {sorted(self._heads)}, tasks {self.names})")

    def features(self, x: Tensor) -> list[Tensor]:
        """The encoder's output, read by every head."""
        return [self._encoder[0](x)]

    def outputs(self, features: Sequence[Tensor], tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return {n: self._heads[n](features[0]) for n in (tasks or self.names)}


def as_multitask(module: Any, tasks: Sequence[Task], where: str = "model.factory") -> MultiTaskModel:
    """A factory's module as the engine's model: a MultiTaskModel as it is, any other ``nn.Module`` wrapped (every
    parameter shared)."""
    if isinstance(module, MultiTaskModel):
        return module
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{where}: returned {type(module).__name__}, not a torch nn.Module")
    return UserModel(module, tasks)
