"""The built-in suites; importing this package registers each of them in ``SUITES``."""

from polytask.tasks.suites import (
    correlated,
    digit_attributes,
    multidigits,
    multimnist,
    recommender,
    synthetic,
    table,
    text,
)

__all__ = ["correlated", "digit_attributes", "multidigits", "multimnist", "recommender", "synthetic", "table", "text"]
