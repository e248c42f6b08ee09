"""Backbones and multi-task architectures: modules that return one output per task."""

from polytask.models import adatt as adatt  # registers the adatt architecture
from polytask.models import cross_stitch as cross_stitch  # registers the cross_stitch architecture
from polytask.models import dselect_k as dselect_k  # registers the dselect_k architecture
from polytask.models import dsmtl as dsmtl  # registers the dsmtl architecture
from polytask.models import dtrn as dtrn  # registers the dtrn architecture
from polytask.models import hf as hf  # registers the hf backbone (transformers is imported only when one is built)
from polytask.models import mmoe as mmoe  # registers the mmoe architecture
from polytask.models import moore as moore  # registers the moore architecture
from polytask.models import mtan as mtan  # registers the mtan architecture
from polytask.models import ple as ple  # registers the cgc and ple architectures
from polytask.models import task_moe as task_moe  # registers the task_moe architecture
from polytask.models.backbones import BACKBONES, build_backbone
from polytask.models.sharing import ARCHITECTURES, HardSharing, MultiTaskModel, build_model
from polytask.models.user import UserModel

__all__ = ["ARCHITECTURES", "BACKBONES", "HardSharing", "MultiTaskModel", "UserModel", "build_backbone", "build_model"]
