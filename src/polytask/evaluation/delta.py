"""Multi-task summary scores, pure functions over per-task metric dicts."""

from __future__ import annotations

from collections.abc import Mapping

Scores = Mapping[str, Mapping[str, float]]  # task -> metric -> value


def delta_m(
    scores: Scores, reference: Scores, higher_is_better: Mapping[str, Mapping[str, bool]]
) -> tuple[float, dict[str, float]]:
    """Δm% of ``scores`` against ``reference`` (Maninis et al. 2019; as used by Nash-MTL and FAMO).

    Δm% = 1/K Σ_k 1/|M_k| Σ_{m in M_k} (-1)^{s_m} (M_{k,m} - M_{k,m}^{ref}) / M_{k,m}^{ref} x 100, with s_m = 1
    when higher is better: a drop in accuracy or a rise in error counts as positive, so lower is better.
    Metrics are the ones named in ``higher_is_better``; returns (Δm%, per-task Δ%).
    """
    per_task: dict[str, float] = {}
    for task, metrics in higher_is_better.items():
        terms = []
        for metric, higher in metrics.items():
            ref = reference[task][metric]
            if ref == 0:
                raise ValueError(f"Δm%: reference {metric} of task {task!r} is 0; the relative change is undefined")
            sign = -1.0 if higher else 1.0
            terms.append(sign * (scores[task][metric] - ref) / abs(ref) * 100.0)
        per_task[task] = sum(terms) / len(terms)
    return sum(per_task.values()) / len(per_task), per_task


def mean_rank(results: Mapping[str, Scores], higher_is_better: Mapping[str, Mapping[str, bool]]) -> dict[str, float]:
    """Mean rank of each method over every (task, metric); rank 1 is best, ties share the mean rank."""
    methods = list(results)
    totals = dict.fromkeys(methods, 0.0)
    n = 0
    for task, metrics in higher_is_better.items():
        for metric, higher in metrics.items():
            values = {m: results[m][task][metric] for m in methods}
            for m in methods:
                better = sum((v > values[m]) if higher else (v < values[m]) for v in values.values())
                ties = sum(v == values[m] for v in values.values())
                totals[m] += better + (ties + 1) / 2
            n += 1
    return {m: totals[m] / n for m in methods}
