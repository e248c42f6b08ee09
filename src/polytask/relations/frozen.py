"""Transferability from frozen features (LogME, LEEP, H-score, NCE): source = the single-task model of
task i, target = task j's labels on the same training inputs. The single-task models are the cached
baselines, so this costs K trainings shared with pairwise transfer and ``polytask run``, plus K forward
passes over the training set."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from polytask.config import Config
from polytask.engine.progress import Reporter
from polytask.errors import DataError
from polytask.experiment import execute, job_dir_of, single_task_job
from polytask.models import build_model
from polytask.relations.affinity import AffinityMatrix
from polytask.relations.transferability import logme, transferability_matrix
from polytask.tasks.task import TaskSuite


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
                            config.model.architecture, config.model.architecture_params)
        model.load_state_dict(load_file(job_dir_of(run_dir, job) / "best.safetensors"))
        model.eval()
        with torch.no_grad():
            z = torch.cat([model.encode(x[i:i + 2048]) for i in range(0, len(x), 2048)])
            features[task.name] = z
            if task.kind == "classification":
                probs[task.name] = model.decode(z, [task.name])[task.name].softmax(-1)
        seconds += time.perf_counter() - t0
    return features, probs, seconds


def _logme_mixed(features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                 suite: TaskSuite, evidence: str = "final") -> AffinityMatrix:
    """LogME with each target in its own form: class evidence for classification, regression evidence for
    real-valued targets (You et al. 2021 define both), on the rows labelled for the target."""
    t0 = time.perf_counter()
    names = suite.task_names
    m = np.zeros((len(names), len(names)))
    for j, target in enumerate(suite.tasks):
        y = labels[target.name].cpu().numpy().astype(np.float64)
        ok = ~np.isnan(y)
        for i, source in enumerate(names):
            m[i, j] = logme(features[source].cpu().numpy().astype(np.float64)[ok], y[ok], target.kind == "regression",
                            evidence)
    return AffinityMatrix(m, names, "logme", {"pairs": len(names) ** 2, "wall_time_s": time.perf_counter() - t0},
                          meta={"paper": "You et al. 2021, LogME", "params": {"evidence": evidence}})


def transferability(config: Config, suite: TaskSuite, run_dir: Path, reporter: Reporter,
                    methods: list[str]) -> dict[str, AffinityMatrix]:
    """The transferability matrices ``methods``, each with its own cost: its own scoring time, plus the forward
    passes over the training set that all of them share (what it would cost alone, its single-task models
    aside: those are shared with the baselines and pairwise transfer)."""
    features, probs, forward_s = source_outputs(config, suite, run_dir, reporter)
    labels = {t: suite.splits["train"][0].y[t] for t in suite.task_names}
    out = {}
    regression = [t.name for t in suite.tasks if t.kind == "regression"]
    evidence = config.relate.logme_evidence
    for m in methods:
        if m != "logme" and regression:
            raise DataError(f"{m} scores class labels; task(s) {regression} are regression (LogME handles both)")
        if m == "logme" and regression:
            aff = _logme_mixed(features, labels, suite, evidence)
        else:
            params = {"evidence": evidence} if m == "logme" else None
            aff = transferability_matrix(probs if m == "leep" else features, labels, m, params, tasks=suite.task_names)
        own = float(aff.cost.get("wall_time_s", 0.0))
        aff.cost |= {"training_runs": len(suite.tasks), "shared_with": ["pairwise", "single-task baselines"],
                     "forward_passes": len(suite.tasks), "own_time_s": own, "feature_time_s": forward_s,
                     "wall_time_s": own + forward_s}
        out[m] = aff
    return out
