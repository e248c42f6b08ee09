"""``polytask front``: the Pareto front over every method of several finished runs (same tasks), written as a
self-contained HTML page and returned as data (non-dominated methods, hypervolume, reference point).

Reads ``summary.json`` files only (through :mod:`polytask.report`); never trains and imports no torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from polytask.report.html import write_front


def front(run_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str] | None = None,
          normalise: bool | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the front of ``run_dirs`` to ``out`` (default: the first run's ``front.html``) atomically; returns
    the page's path and the front's data with ``report`` set to that path.

    ``normalise``: None scores tasks relative to the first single-task row when there is one (as Δm% does),
    True requires one, False keeps raw scores."""
    path, data = write_front([Path(d) for d in run_dirs], None if out is None else Path(out), normalise)
    return path, {**data, "report": str(path)}
