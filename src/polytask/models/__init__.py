"""Backbones and multi-task architectures: modules that return one output per task."""

from polytask.models.backbones import BACKBONES, build_backbone
from polytask.models.sharing import ARCHITECTURES, HardSharing, MultiTaskModel, build_model
from polytask.models.user import UserModel

__all__ = ["ARCHITECTURES", "BACKBONES", "HardSharing", "MultiTaskModel", "UserModel", "build_backbone", "build_model"]
