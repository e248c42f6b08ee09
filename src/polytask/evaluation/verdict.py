"""The verdict of a grouping study: which plan to train, in one line a person can act on.

Pure over result dicts. A *plan* serves every task by one trained network: a grouping (chosen from affinity,
all-in-one, independent, random) trained with the relations method, or the chosen grouping with a joint method
picked per network. The recommended plan is the one with the lowest total validation loss: affinity scores alone
predict multi-task outcomes poorly (Standley et al. 2020; Fifty et al. 2021), so the verdict rests on trained
models, and test metrics only describe it (Δ% per task as in Δm%, against independent models).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from polytask.evaluation.delta import delta_m

Directions = Mapping[str, Mapping[str, bool]]  # task -> metric -> higher is better


@dataclass(frozen=True)
class Plan:
    """Networks (task groups) with the method each is trained with, and per task: the validation loss and test
    metrics of the network that serves it."""

    name: str
    groups: list[list[str]]
    methods: list[str]
    tasks: Mapping[str, Mapping[str, float]]  # task -> {"val_loss": ..., metric: ...}
    serve: Mapping[str, int] | None = None  # task -> index of the group serving it (default: its only group)

    def served(self) -> list[list[str]]:
        """The tasks each network serves (networks may overlap: a task may help in one and be served by another)."""
        if self.serve is None:
            return [[t for t in g if t in self.tasks] for g in self.groups]
        return [[t for t in self.tasks if self.serve[t] == i] for i in range(len(self.groups))]

    @property
    def total_val_loss(self) -> float:
        return float(sum(v["val_loss"] for v in self.tasks.values()))

    def test(self) -> dict[str, dict[str, float]]:
        return {t: {k: v for k, v in s.items() if k not in ("val_loss", "loss")} for t, s in self.tasks.items()}


def _pct(x: float) -> str:
    return f"{x:.1f}%" if abs(x) < 10 else f"{x:.0f}%"


def verdict(plans: Sequence[Plan], directions: Directions, independent: str = "independent",
            all_in_one: str = "all-in-one") -> dict[str, Any]:
    """The recommended plan (lowest total validation loss; fewer networks on a tie) and its sentence.

    Per multi-task network: Δ% of its tasks against independent models (negative: better, as in Δm%); per task
    kept alone: its Δ% when shared by all tasks (all-in-one), the cost of sharing it."""
    by_name = {p.name: p for p in plans}
    best = min(plans, key=lambda p: (p.total_val_loss, len(p.groups)))
    alone = by_name[independent].test()
    _, delta = delta_m(best.test(), alone, directions)
    shared = by_name.get(all_in_one)
    _, delta_shared = delta_m(shared.test(), alone, directions) if shared else (0.0, {})
    networks = [{"tasks": list(g), "serves": s, "method": m, "delta_vs_alone_pct": sum(delta[t] for t in s) / len(s)}
                for g, s, m in zip(best.groups, best.served(), best.methods, strict=True) if len(g) > 1 and s]
    kept = [{"task": g[0], "delta_when_shared_pct": delta_shared.get(g[0])} for g in best.groups if len(g) == 1]
    clauses = []
    for n in networks:
        d = n["delta_vs_alone_pct"]
        which = f"all {len(n['tasks'])} tasks" if len(n["tasks"]) == len(alone) else f"{{{', '.join(n['tasks'])}}}"
        used = "" if len(n["serves"]) == len(n["tasks"]) else f" for {', '.join(n['serves'])}"
        clauses.append(f"train {which} together with {n['method']}{used} "
                       f"({'gains' if d <= 0 else 'loses'} {_pct(abs(d))} vs alone)")
    for k in kept:
        d = k["delta_when_shared_pct"]
        why = "" if d is None else (f": it loses {_pct(d)} when shared" if d > 0 else
                                    f" (shared with all tasks it would change by {_pct(-d)})")
        clauses.append(f"keep {k['task']} alone{why}")
    if not networks:
        clauses.insert(0, "train every task alone: no grouping beat independent models")
    text = "; ".join(clauses)
    text = text[0].upper() + text[1:] + "."
    comparisons = []
    for other in (all_in_one, independent):
        if other in by_name and other != best.name:
            ref = by_name[other].total_val_loss
            change = (ref - best.total_val_loss) / abs(ref) * 100 if ref else 0.0
            comparisons.append(f"{_pct(abs(change))} {'below' if change >= 0 else 'above'} {other}")
    if comparisons:
        text += f" Validation loss of this plan ({best.name}): {' and '.join(comparisons)}."
    return {"plan": best.name, "text": text, "networks": networks, "alone": kept,
            "total_val_loss": {p.name: p.total_val_loss for p in plans}}
