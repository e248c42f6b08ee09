"""What a command does end to end: open a run directory, train its jobs, write its results and report.

One module per flow (``run``, ``advise``, ``relate``, ``group``, ``transfer``, ``merge``, ``predict``, ``continual``,
``schedule_search``), all on one job runner (:mod:`polytask.flows.runner`: run directories, locks, the single-task
cache, ``execute``); configs become engine specs in :mod:`polytask.flows.jobs`; :mod:`polytask.flows.text` is what
the CLI prints. This ``__init__`` imports no torch, so the CLI can build a :class:`Reporter` before a flow loads.
"""

from polytask.engine.progress import Reporter

__all__ = ["Reporter"]
