"""Tasks, suites and the built-in suite registry."""

from polytask.tasks import suites  # noqa: F401  (registers the built-in suites)
from polytask.tasks.registry import SUITES, build_suite
from polytask.tasks.task import HeadSpec, Metric, Task, TaskData, TaskSuite

__all__ = ["SUITES", "HeadSpec", "Metric", "Task", "TaskData", "TaskSuite", "build_suite"]
