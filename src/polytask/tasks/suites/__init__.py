"""The built-in suites; importing this package registers each of them in ``SUITES``."""

from polytask.tasks.suites import digit_attributes, multidigits, multimnist, synthetic, table, text

__all__ = ["digit_attributes", "multidigits", "multimnist", "synthetic", "table", "text"]
