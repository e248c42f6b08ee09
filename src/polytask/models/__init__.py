"""Backbones and multi-task architectures: modules that return one output per task."""

from polytask.models.backbones import BACKBONES, build_backbone
from polytask.models.sharing import ARCHITECTURES, HardSharing, MultiTaskModel, build_model

__all__ = ["ARCHITECTURES", "BACKBONES", "HardSharing", "MultiTaskModel", "build_backbone", "build_model"]
