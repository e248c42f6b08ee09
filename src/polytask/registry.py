"""A small name -> entry registry shared by suites, models and methods."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from polytask.errors import ConfigError

T = TypeVar("T")


class NoParams(BaseModel, extra="forbid"):
    """Parameters of an entry that takes none."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered item: its builder, its typed parameters and where it comes from."""

    name: str
    build: T
    params: type[BaseModel] = NoParams
    summary: str = ""
    paper: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Items found by name; an unknown name is an error that suggests the closest one."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self,
        name: str,
        *,
        params: type[BaseModel] = NoParams,
        summary: str = "",
        paper: str = "",
        **extra: Any,
    ) -> Callable[[T], T]:
        """A decorator that registers its argument as entry ``name``, with its typed ``params``, a one-line
        ``summary`` and the ``paper`` it comes from (what the listings print); extra keywords land in ``Entry.extra``.
        A name registered twice is an error."""

        def deco(build: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, build, params, summary, paper, extra)
            return build

        return deco

    def get(self, name: str) -> Entry[T]:
        """The entry called ``name``; an unknown name raises a ConfigError that suggests the closest one."""
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}{suggest(name, self._entries)}; "
                f"known: {', '.join(sorted(self._entries))}"
            ) from None

    def params_for(self, name: str, params: dict[str, Any] | BaseModel | None, where: str = "") -> BaseModel:
        """The validated parameters of entry ``name`` (errors name the key under ``where``)."""
        model = self.get(name).params
        return params if isinstance(params, model) else validate_model(model, params or {}, where)

    def build(self, name: str, params: dict[str, Any] | BaseModel | None, *args: Any, where: str = "") -> Any:
        """Call entry ``name``'s builder with its validated parameters and ``args``."""
        return self.get(name).build(self.params_for(name, params, where), *args)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __repr__(self) -> str:
        return f"<{self.kind} registry: {', '.join(self.names())}>"


def describe_params(params: type[BaseModel]) -> list[str]:
    """One line per parameter of ``params`` for listings: the config key, its default or 'required', and its
    description."""
    lines = []
    for name, info in params.model_fields.items():
        default = "required" if info.is_required() else f"default {info.get_default(call_default_factory=True)!r}"
        lines.append(f"{info.alias or name} ({default})" + (f": {info.description}" if info.description else ""))
    return lines


def suggest(word: str, candidates: Any) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys of the (nested) model at ``loc``, for suggestions."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        inner = getattr(ann, "__args__", None)
        ann = inner[0] if inner and isinstance(inner[0], type) else ann
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def validate_model(model: type[BaseModel], data: Any, where: str = "") -> BaseModel:
    """Validate ``data`` against ``model``; raise one ConfigError listing every problem by key."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = tuple(err["loc"])
            key = ".".join(str(p) for p in (where.split(".") if where else []) + list(loc))
            if err["type"] == "extra_forbidden":
                hint = suggest(loc[-1], _fields_at(model, loc[:-1]))
                lines.append(f"unknown key {key!r}{hint}")
            else:
                got = err.get("input")
                shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
                lines.append(f"{key or '<config>'}: {err['msg']}{shown}")
        raise ConfigError("; ".join(lines)) from None
