"""STG-MTL's models and their serving (Sherif et al. 2023, "STG-MTL: Scalable Task Grouping for Multi-Task
Learning Using Data Maps"; official code ammarSherif/STG-MTL, ``train.py`` task weights and the metrics'
``ensemble_weights``).

The paper's form: one model per cluster c, trained on ALL tasks with task t's loss weighted by its soft membership
u_tc; task t is then served by the membership-weighted ensemble of the cluster models' predictions,
sum_c u_tc * p_c(t) (class probabilities for classification, values for regression). :func:`cluster_weights`
gives the per-model loss weights, :class:`MembershipEnsemble` the serving model.

``polytask group`` trains this form by default (``group.stg_form: soft``) because it is the method the paper
proposes and evaluates; with the default fuzziness m = 1.07 the memberships are nearly one-hot, so each cluster
model mostly trains its own tasks, with small weights on the rest. ``stg_form: hard`` (one model per cluster on
its member tasks only, each task served by one model) is the option when inference may run only one model per
task, and it compares with TAG/HOA groupings network for network.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from polytask.errors import DataError
from polytask.tasks.task import Task


def cluster_weights(membership: np.ndarray, tasks: Sequence[str]) -> list[dict[str, float]]:
    """Per cluster model c: the loss weight of each task, its membership u_tc (K x n, rows summing to 1)."""
    u = np.asarray(membership, dtype=np.float64)
    if u.ndim != 2 or u.shape[0] != len(tasks):
        raise DataError(f"stg-mtl: membership must be K x n for {len(tasks)} tasks, got shape {u.shape}")
    if not np.isfinite(u).all() or (u < 0).any():
        raise DataError("stg-mtl: memberships must be finite and >= 0")
    return [{t: float(u[i, c]) for i, t in enumerate(tasks)} for c in range(u.shape[1])]


class MembershipEnsemble(torch.nn.Module):
    """Serves each task by the membership-weighted mean of the cluster models' predictions (STG-MTL).

    Classification outputs are mixed as probabilities and returned as their logarithm, so a loss or metric that
    reads logits (cross-entropy, accuracy) sees the ensemble's distribution; regression outputs are mixed as
    values. Weights per task are renormalised to sum to 1 over the models."""

    def __init__(self, models: Sequence[torch.nn.Module], membership: np.ndarray, tasks: Sequence[Task]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(models)
        u = torch.as_tensor(np.asarray(membership, dtype=np.float64))
        if u.shape != (len(tasks), len(models)):
            raise DataError(f"stg-mtl ensemble: membership shape {tuple(u.shape)} for {len(tasks)} tasks and "
                            f"{len(models)} models")
        total = u.sum(1, keepdim=True)
        if (total <= 0).any():
            raise DataError("stg-mtl ensemble: every task needs a positive membership in some model")
        self.register_buffer("weights", u / total)
        self.kinds = {t.name: t.kind for t in tasks}
        self.index = {t.name: i for i, t in enumerate(tasks)}

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        names = list(tasks) if tasks is not None else list(self.index)
        outs = [m(x, names) for m in self.members]
        mixed: dict[str, Tensor] = {}
        for n in names:
            w = self.weights[self.index[n]]
            if self.kinds[n] == "classification":
                p = sum(w[c].to(o[n].dtype) * o[n].softmax(-1) for c, o in enumerate(outs))
                mixed[n] = torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))
            else:
                mixed[n] = sum(w[c].to(o[n].dtype) * o[n] for c, o in enumerate(outs))
        return mixed
