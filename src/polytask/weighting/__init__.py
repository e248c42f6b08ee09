"""Loss weightings, registered by name."""

from polytask.weighting import coba, dwa, famo, gls, imtl_l, rlw, static, uw  # noqa: F401  (registers)
from polytask.weighting.base import StepContext, Weighting, build_weighting

__all__ = ["StepContext", "Weighting", "build_weighting"]
