"""Scores of multi-task results: Δm%, mean rank."""

from polytask.evaluation.delta import delta_m, mean_rank

__all__ = ["delta_m", "mean_rank"]
