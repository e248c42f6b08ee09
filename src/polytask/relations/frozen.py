"""Transferability from frozen features (LogME, LEEP, H-score, NCE), scored from what the transfer flow
(:mod:`polytask.flows.transfer`) reads out of the single-task models: source = the single-task model of task i,
target = task j's labels on the same training inputs."""

from __future__ import annotations

import time

import numpy as np
import torch

from polytask.config import Config
from polytask.errors import DataError
from polytask.relations.affinity import AffinityMatrix
from polytask.relations.transferability import logme, transferability_matrix
from polytask.tasks.task import TaskSuite

TRANSFER_ESTIMATORS = ("logme", "leep", "hscore", "nce")


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

def transferability_scores(config: Config, suite: TaskSuite, features: dict[str, torch.Tensor],
                           probs: dict[str, torch.Tensor], forward_s: float,
                           methods: list[str]) -> dict[str, AffinityMatrix]:
    """The transferability matrices ``methods`` from the single-task models' frozen ``features`` and softmax
    ``probs`` on the training inputs, each with its own cost: its own scoring time, plus the ``forward_s`` seconds
    of forward passes all of them share (what it would cost alone, its single-task models aside: those are shared
    with the baselines and pairwise transfer)."""
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
