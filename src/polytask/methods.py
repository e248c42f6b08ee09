"""The one registry of joint-training methods (loss weightings now; gradient aggregators plug in here).

Each entry carries ``kind`` in its extras: ``"weighting"`` entries build a
:class:`~polytask.weighting.base.Weighting` from ``(params, task_names)``. An entry with ``pareto=True``
(PaMaL, :mod:`polytask.models.pareto`) also trains a weight ensemble: a run wraps its job's model and sets its
loss function (``flows/jobs.py``); the entry itself builds the inner weighting.
"""

from __future__ import annotations

from typing import Any

from polytask.registry import Registry

METHODS: Registry[Any] = Registry("method")


def load_all() -> Registry[Any]:
    """Import the modules that register methods and return the registry."""
    import polytask.aggregators
    import polytask.models.pareto
    import polytask.weighting  # noqa: F401

    return METHODS
