"""The pure pieces of a merging experiment on a suite (the flow is :mod:`polytask.flows.merge`): the training
rows split between pretraining and fine-tuning, a method's parameter grid, and normalised accuracy.

Normalised accuracy is the merged model's score on a task divided by the individually fine-tuned model's
(for a lower-is-better metric, the inverse ratio), as in the task-arithmetic and TIES papers.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from polytask.errors import ConfigError
from polytask.tasks.task import Task, TaskData, TaskSuite

ENCODER = "encoder."


def split_train(suite: TaskSuite, fraction: float, seed: int) -> tuple[TaskSuite, TaskSuite]:
    """The suite twice: training rows split into a pretraining share and a fine-tuning share (same val/test)."""
    if fraction <= 0:
        return suite, suite
    pre, ft = [], []
    for i, src in enumerate(suite.splits["train"]):
        perm = torch.from_numpy(np.random.default_rng([seed, i]).permutation(len(src)))
        cut = max(1, round(fraction * len(src)))
        if cut >= len(src):
            raise ConfigError(f"pretrain.fraction {fraction} leaves no training rows to fine-tune on")
        pre.append(src.take(perm[:cut].sort().values))
        ft.append(src.take(perm[cut:].sort().values))
    return (replace(suite, splits={**suite.splits, "train": tuple(pre)}),
            replace(suite, splits={**suite.splits, "train": tuple(ft)}))

def task_source(sources: tuple[TaskData, ...], task: str) -> tuple[torch.Tensor, torch.Tensor]:
    for s in sources:
        if task in s.y:
            m = Task.mask(s.y[task])
            return s.x[m], s.y[task][m]
    raise ConfigError(f"task {task!r} has no data")

def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

def first_metric(scores: dict[str, dict[str, float]], task: Task) -> tuple[str, float, bool]:
    m = task.metrics[0]
    return m.name, scores[task.name][m.name], m.higher_is_better

def grid(spec_params: dict[str, Any], grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [{**spec_params, **dict(zip(keys, combo, strict=True))} for combo in itertools.product(*grid.values())] \
        if keys else [dict(spec_params)]

def signed_score(scores: dict[str, dict[str, float]], task: Task) -> float:
    _, v, hib = first_metric(scores, task)
    return v if hib else -v

def normalized(scores: dict[str, dict[str, float]], reference: dict[str, dict[str, float]], task: Task) -> float:
    _, v, hib = first_metric(scores, task)
    _, ref, _ = first_metric(reference, task)
    if hib:
        return v / ref if ref else float("nan")
    return ref / v if v else float("nan")
