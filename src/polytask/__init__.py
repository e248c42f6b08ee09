"""polytask: learn many tasks with one model: relate, group, train jointly, merge.

The names here are what a user reaches for first; each sub-package holds the rest of its area:

- **in your own loop**: :class:`JointStep` (any joint method in place of ``loss.backward()``), :func:`aggregate`
  (a K x P Jacobian to one direction);
- **a trainer over your model**: :func:`fit` (returns a :class:`FitResult`), :func:`load` a trained run as a
  :class:`Predictor`; :func:`train_job` runs one :class:`TrainSpec` (with any :class:`Hook`);
- **experiments from a config** (what the CLI runs): :func:`load_config` gives a :class:`Config`; :func:`run`,
  :func:`relate`, :func:`group`; :func:`load_merge_config` and :func:`merge`;
- **tasks and registries**: :class:`Task`, :class:`TaskData`, :class:`TaskSuite`, :class:`Metric`,
  :func:`build_suite`; ``SUITES``, ``METHODS`` (joint methods) and ``MERGE_METHODS`` list what is registered by
  name (``.names()``; each entry has its summary, paper and typed parameters);
- **errors**: every error raised on purpose is a :class:`PolytaskError`.
"""

import typing

from polytask._lazy import lazy_exports as _lazy_exports

__version__ = "0.1.0"

if typing.TYPE_CHECKING:
    from polytask.aggregators import aggregate
    from polytask.config import Config, load_config
    from polytask.engine.hooks import Hook
    from polytask.engine.loop import train_job
    from polytask.engine.spec import TrainSpec
    from polytask.errors import (
        CheckpointError,
        ConfigError,
        DataError,
        DivergenceError,
        PolytaskError,
        RunLockedError,
        StorageError,
    )
    from polytask.flows.fit import FitResult, fit
    from polytask.flows.group import group
    from polytask.flows.merge import merge
    from polytask.flows.relate import relate
    from polytask.flows.run import run
    from polytask.joint_step import JointStep
    from polytask.merging import METHODS as MERGE_METHODS
    from polytask.merging.config import MergeConfig, load_merge_config
    from polytask.methods import METHODS
    from polytask.predict import Predictor, load
    from polytask.tasks import SUITES, Metric, Task, TaskData, TaskSuite, build_suite

# Public names imported on first use, so that `import polytask` (and the CLI's config check) stays free of torch.
_LAZY = {
    "JointStep": "polytask.joint_step",
    "aggregate": "polytask.aggregators",
    "fit": "polytask.flows.fit",
    "FitResult": "polytask.flows.fit",
    "load": "polytask.predict",
    "Predictor": "polytask.predict",
    "TrainSpec": "polytask.engine.spec",
    "train_job": "polytask.engine.loop",
    "Hook": "polytask.engine.hooks",
    "Config": "polytask.config",
    "load_config": "polytask.config",
    "run": "polytask.flows.run",
    "relate": "polytask.flows.relate",
    "group": "polytask.flows.group",
    "MergeConfig": "polytask.merging.config",
    "load_merge_config": "polytask.merging.config",
    "merge": "polytask.flows.merge",
    "Task": "polytask.tasks",
    "TaskData": "polytask.tasks",
    "TaskSuite": "polytask.tasks",
    "Metric": "polytask.tasks",
    "build_suite": "polytask.tasks",
    "SUITES": "polytask.tasks",
    "METHODS": "polytask.methods:load_all()",  # the joint methods register when their packages load
    "MERGE_METHODS": "polytask.merging:METHODS",
    **{e: "polytask.errors" for e in ("PolytaskError", "ConfigError", "DataError", "CheckpointError",
                                      "RunLockedError", "DivergenceError", "StorageError")},
}
__all__ = [
    "MERGE_METHODS",
    "METHODS",
    "SUITES",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "DivergenceError",
    "FitResult",
    "Hook",
    "JointStep",
    "MergeConfig",
    "Metric",
    "PolytaskError",
    "Predictor",
    "RunLockedError",
    "StorageError",
    "Task",
    "TaskData",
    "TaskSuite",
    "TrainSpec",
    "__version__",
    "aggregate",
    "build_suite",
    "fit",
    "group",
    "load",
    "load_config",
    "load_merge_config",
    "merge",
    "relate",
    "run",
    "train_job",
]
__getattr__, __dir__ = _lazy_exports(__name__, _LAZY, globals())
