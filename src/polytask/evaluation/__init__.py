"""Scores of multi-task results: Δm%, mean rank, Pareto fronts and hypervolume."""

from polytask.evaluation.delta import delta_m, mean_rank
from polytask.evaluation.pareto import dominates, hypervolume, non_dominated, reference_point

__all__ = ["delta_m", "dominates", "hypervolume", "mean_rank", "non_dominated", "reference_point"]
