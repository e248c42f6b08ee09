"""The built-in suite registry: ``build(params, seed) -> TaskSuite`` found by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from polytask.errors import ConfigError
from polytask.registry import Registry
from polytask.tasks.task import TaskSuite

SuiteBuilder = Callable[[Any, int], TaskSuite]
SUITES: Registry[SuiteBuilder] = Registry("suite")


def build_suite(name: str, params: dict[str, Any] | BaseModel | None, seed: int) -> TaskSuite:
    """Build suite ``name`` from its (validated) parameters; same seed, same suite. A name ``package.module:function``
    is the user's own suite factory (``suite.factory``): called with the params as keywords, and ``seed=`` when it
    takes one."""
    from polytask.config import import_factory, is_import_path

    if not is_import_path(name):
        return SUITES.build(name, params, seed, where="suite.params")
    factory = import_factory(name, "suite.factory")
    kwargs = dict(params.model_dump() if isinstance(params, BaseModel) else params or {})
    try:
        takes_seed = "seed" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_seed = False
    suite = factory(**kwargs, **({"seed": seed} if takes_seed else {}))
    if not isinstance(suite, TaskSuite):
        raise ConfigError(f"suite.factory: {name!r} returned {type(suite).__name__}, not a polytask TaskSuite")
    return suite
