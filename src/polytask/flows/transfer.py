"""The transfer flow: the single-task models (the cached baselines, so K trainings shared with pairwise transfer
and ``polytask run``) trained or read back, K forward passes over the training set, and the transferability
scores of :mod:`polytask.relations.frozen` on their frozen features."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from polytask.config import Config
from polytask.engine.progress import Reporter
from polytask.errors import ConfigError, DataError
from polytask.flows.runner import execute, job_dir_of, single_task_job
from polytask.models import build_model
from polytask.relations.affinity import AffinityMatrix
from polytask.relations.frozen import TRANSFER_ESTIMATORS, transferability_scores
from polytask.tasks.task import TaskSuite

__all__ = ["TRANSFER_ESTIMATORS", "source_outputs", "transferability"]


def source_outputs(config: Config, suite: TaskSuite, run_dir: Path, reporter: Reporter
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """Per task: the frozen representation of its single-task model on the training inputs, and its
    softmax predictions (classification tasks only); and the seconds of these forward passes (the training of
    the single-task models, shared with the baselines and pairwise transfer, is not counted)."""
    if suite.multi_input:
        raise DataError("transferability needs one shared input for every task (a multi-target suite)")
    x = suite.splits["train"][0].x
    features, probs = {}, {}
    seconds = 0.0
    for task in suite.tasks:
        job = single_task_job(task.name)
        execute(job, suite, config, run_dir, reporter)
        t0 = time.perf_counter()
        model = build_model([task], suite.input_shape, config.model.backbone, config.model.backbone_params,
                            config.model.architecture, config.model.architecture_params, suite.categorical,
                            config.model.embedding_dim)
        model.load_state_dict(load_file(job_dir_of(run_dir, job) / "best.safetensors"))
        model.eval()
        with torch.no_grad():
            fs = [model.features(x[i:i + 2048]) for i in range(0, len(x), 2048)]
            if fs[0] is None:
                raise ConfigError(f"transferability needs an architecture with shared features; "
                                  f"{type(model).__name__} has none")
            features[task.name] = torch.cat([torch.cat([f.flatten(1) for f in part], 1) for part in fs])
            if task.kind == "classification":
                probs[task.name] = torch.cat([model.outputs(part, [task.name])[task.name] for part in fs]).softmax(-1)
        seconds += time.perf_counter() - t0
    return features, probs, seconds

def transferability(config: Config, suite: TaskSuite, run_dir: Path, reporter: Reporter,
                    methods: list[str]) -> dict[str, AffinityMatrix]:
    """The transferability matrices ``methods`` of the single-task models in ``run_dir`` (trained if missing),
    each with its own cost (:func:`polytask.relations.frozen.transferability_scores`)."""
    features, probs, forward_s = source_outputs(config, suite, run_dir, reporter)
    return transferability_scores(config, suite, features, probs, forward_s, methods)
