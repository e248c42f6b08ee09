"""The run flow's former home, kept so that ``from polytask.experiment import run`` keeps working: the flow is
:func:`polytask.flows.run.run`, its job runner :mod:`polytask.flows.runner` (patch names there, not here)."""

from polytask.flows.run import plan, run, summarize
from polytask.flows.runner import (
    STL,
    EpochCallback,
    cache_dir,
    close_run,
    code_version,
    data_fingerprint,
    execute,
    job_dir_of,
    never_trained,
    open_run,
    releases_run_locks,
    result_cache_key,
    run_suite,
    single_task_job,
    summary_header,
    versions,
)

__all__ = [
    "STL",
    "EpochCallback",
    "cache_dir",
    "close_run",
    "code_version",
    "data_fingerprint",
    "execute",
    "job_dir_of",
    "never_trained",
    "open_run",
    "plan",
    "releases_run_locks",
    "result_cache_key",
    "run",
    "run_suite",
    "single_task_job",
    "summarize",
    "summary_header",
    "versions",
]
