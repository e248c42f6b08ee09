"""Gradient aggregators, registered by name in ``polytask.methods.METHODS`` (kind "aggregator").

Importing this package registers every method; ``aggregate`` turns a K x P Jacobian into a direction with any
of them, and ``build_aggregator`` builds one for a training loop.
"""

from polytask.aggregators import (  # noqa: F401  (registers)
    aligned,
    bargaining,
    baselines,
    cagrad,
    conflict_free,
    dbmtl,
    dual_cone,
    graddrop,
    gradnorm,
    imtl,
    mgda,
    projection,
)
from polytask.aggregators._common import aggregate, build_aggregator
from polytask.aggregators.aligned import aligned_mtl_weights
from polytask.aggregators.bargaining import alpha_fair_weights, nash_mtl_weights
from polytask.aggregators.base import Aggregator
from polytask.aggregators.cagrad import cagrad_weights
from polytask.aggregators.conflict_free import config_weights
from polytask.aggregators.dbmtl import dbmtl_direction
from polytask.aggregators.dual_cone import dualproj_weights, upgrad_weights
from polytask.aggregators.graddrop import graddrop_direction
from polytask.aggregators.gradnorm import gradnorm_step
from polytask.aggregators.imtl import imtl_g_weights
from polytask.aggregators.mgda import mgda_weights
from polytask.aggregators.projection import gradvac_weights, pcgrad_weights

__all__ = [
    "Aggregator",
    "aggregate",
    "aligned_mtl_weights",
    "alpha_fair_weights",
    "build_aggregator",
    "cagrad_weights",
    "config_weights",
    "dbmtl_direction",
    "dualproj_weights",
    "graddrop_direction",
    "gradnorm_step",
    "gradvac_weights",
    "imtl_g_weights",
    "mgda_weights",
    "nash_mtl_weights",
    "pcgrad_weights",
    "upgrad_weights",
]
