"""polytask: learn many tasks with one model: relate, group, train jointly, merge, learn continually."""

__version__ = "0.1.0"
