"""Continual learning: streams of experiences, strategies as hooks on the one loop, the accuracy matrix."""

from polytask.continual import strategies  # noqa: F401  (registers the strategies of the package)
from polytask.continual.config import ContinualConfig, load_continual_config
from polytask.continual.strategy import STRATEGIES, Strategy, build_strategy
from polytask.continual.stream import SCENARIOS, STREAMS, Experience, Stream, build_stream, from_suite
from polytask.continual.streams import stream_from_datasets  # registers split-mnist, permuted-mnist, ..., table

__all__ = ["SCENARIOS", "STRATEGIES", "STREAMS", "ContinualConfig", "Experience", "Strategy", "Stream",
           "build_strategy", "build_stream", "from_suite", "load_continual_config", "stream_from_datasets"]
