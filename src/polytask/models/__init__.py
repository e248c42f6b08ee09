"""Backbones and multi-task architectures: modules that return one output per task."""

from polytask.models import hf as hf  # registers the hf backbone (transformers is imported only when one is built)
from polytask.models.backbones import BACKBONES, build_backbone
from polytask.models.sharing import ARCHITECTURES, HardSharing, MultiTaskModel, build_model
from polytask.models.user import UserModel

__all__ = ["ARCHITECTURES", "BACKBONES", "HardSharing", "MultiTaskModel", "UserModel", "build_backbone", "build_model"]
