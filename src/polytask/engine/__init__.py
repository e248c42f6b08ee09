"""The one training loop: a typed :class:`TrainSpec` of resolved objects in, a job's result out, with exact
checkpoint/resume.

A Python user builds a spec from a model (or a function that builds it after the job's seed is set), an optimiser
factory (:func:`optimizer`, or any callable of the parameters), a method (:func:`build_method`), a batch source
(:class:`TensorBatches`, :class:`DatasetBatches`), a :class:`CheckpointPolicy` and any :class:`Hook`, then calls
:func:`train_job`. The flows resolve experiment configs into the same specs (``polytask.flows.jobs``). Under
torchrun a job trains data-parallel (:class:`Collective`, ``polytask.engine.distributed``).
"""

import typing

from polytask._lazy import lazy_exports as _lazy_exports

if typing.TYPE_CHECKING:
    from polytask.engine.data import Batch, BatchSource, DatasetBatches, TensorBatches
    from polytask.engine.distributed import Collective, init_from_env
    from polytask.engine.hooks import Hook, Run, StepView
    from polytask.engine.loop import train_job
    from polytask.engine.optim import OPTIMIZERS, SCHEDULERS, optimizer, scheduler
    from polytask.engine.progress import Reporter
    from polytask.engine.spec import CheckpointPolicy, TrainSpec
    from polytask.engine.state import LoopState
    from polytask.engine.step import Method, build_method

# Imported on first use: polytask.engine.progress is imported by the CLI before torch is, and runs this file.
_LAZY = {
    **{n: "polytask.engine.data" for n in ("Batch", "BatchSource", "DatasetBatches", "TensorBatches")},
    **{n: "polytask.engine.distributed" for n in ("Collective", "init_from_env")},
    **{n: "polytask.engine.hooks" for n in ("Hook", "Run", "StepView")},
    "train_job": "polytask.engine.loop",
    **{n: "polytask.engine.optim" for n in ("OPTIMIZERS", "SCHEDULERS", "optimizer", "scheduler")},
    "Reporter": "polytask.engine.progress",
    **{n: "polytask.engine.spec" for n in ("CheckpointPolicy", "TrainSpec")},
    "LoopState": "polytask.engine.state",
    **{n: "polytask.engine.step" for n in ("Method", "build_method")},
}
__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "Batch",
    "BatchSource",
    "CheckpointPolicy",
    "Collective",
    "DatasetBatches",
    "Hook",
    "LoopState",
    "Method",
    "Reporter",
    "Run",
    "StepView",
    "TensorBatches",
    "TrainSpec",
    "build_method",
    "init_from_env",
    "optimizer",
    "scheduler",
    "train_job",
]
__getattr__, __dir__ = _lazy_exports(__name__, _LAZY, globals())
