"""Loss weightings, registered by name."""

from polytask.weighting import static  # noqa: F401  (registers)
from polytask.weighting.base import StepContext, Weighting, build_weighting

__all__ = ["StepContext", "Weighting", "build_weighting"]
