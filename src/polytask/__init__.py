"""polytask: learn many tasks with one model: relate, group, train jointly, merge."""

__version__ = "0.1.0"
