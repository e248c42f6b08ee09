"""The built-in suite registry: ``build(params, seed) -> TaskSuite`` found by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from polytask.registry import Registry
from polytask.tasks.task import TaskSuite

SuiteBuilder = Callable[[Any, int], TaskSuite]
SUITES: Registry[SuiteBuilder] = Registry("suite")


def build_suite(name: str, params: dict[str, Any] | BaseModel | None, seed: int) -> TaskSuite:
    """Build suite ``name`` from its (validated) parameters; same seed, same suite."""
    return SUITES.build(name, params, seed, where="suite.params")
