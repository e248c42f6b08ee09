"""Deterministic crash points for the kill-and-resume tests.

``POLYTASK_KILL_AT="step:37"`` makes the process SIGKILL itself right after optimiser step 37 (counted
over the whole run, across jobs); ``"write:last.safetensors:3"`` kills it on the 3rd write of that file,
after the temporary file is complete and before it is renamed into place; ``"start:1"`` kills it right after
the run directory and its config are written, before any data is read. Unset, these are no-ops.
``POLYTASK_KILL_RANK=1`` limits the kill to that torchrun rank (``RANK``); the others run on.

A kill on the training thread (any kind but ``write``) first waits for the checkpoints queued before it to land
(:func:`track` registers each background writer while a kill is armed): the crash point is then a fixed state of
the disk, not a race with the writer thread (a loaded machine otherwise kills "after the checkpoint of step 2"
before that checkpoint has landed). A crash in the middle of a write is the ``write`` kind's.
"""

from __future__ import annotations

import os
import signal
import weakref
from collections import Counter
from typing import Any

_counts: Counter[str] = Counter()
_writers: weakref.WeakSet[Any] = weakref.WeakSet()


def _spec() -> str:
    return os.environ.get("POLYTASK_KILL_AT", "")


def armed(kind: str) -> bool:
    """Whether ``POLYTASK_KILL_AT`` names an event of ``kind`` (a loop asks once, then counts only when it does)."""
    return _spec().startswith(kind + ":")


def track(writer: Any) -> None:
    """Register a background writer (anything with ``wait()``) whose queued writes land before a kill."""
    if _spec():
        _writers.add(writer)


def hit(kind: str, name: str = "") -> None:
    """Count an event; SIGKILL this process if ``POLYTASK_KILL_AT`` names this occurrence."""
    spec = _spec()
    if not spec or not spec.startswith(kind + ":"):
        return
    only = os.environ.get("POLYTASK_KILL_RANK")
    if only is not None and only != os.environ.get("RANK", "0"):
        return
    key = f"{kind}:{name}" if name else kind
    _counts[key] += 1
    want = spec.rsplit(":", 1)
    if want[0] == key and _counts[key] == int(want[1]):
        if kind != "write":  # the writer thread's own kill must not wait for itself
            for writer in list(_writers):
                writer.wait()
        os.kill(os.getpid(), signal.SIGKILL)
