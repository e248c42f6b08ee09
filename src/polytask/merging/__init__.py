"""Model merging: task vectors and their successors, streamed tensor by tensor, with evaluation.

Two ways in:

- **checkpoints on disk** (:func:`merge_checkpoints`, ``polytask merge CONFIG.yaml``): a base and N models
  (safetensors files, sharded Hugging Face directories, PEFT LoRA adapters, polytask job/run directories)
  merged one tensor name at a time by a data-free method into sharded safetensors, atomically;
- **a merging experiment on a suite** (:func:`polytask.flows.merge.run_merge_experiment`, a config with
  ``suite:``): pretrain a backbone, fine-tune one model per task, merge with every method (data-free or
  data-driven), evaluate. It trains, so it is a flow; this package holds its pure pieces
  (:mod:`polytask.merging.experiment`).

Methods (``METHODS``, each from its paper; ``polytask merge --list`` prints them):

==============  ==========  ===============================================================
name            kind        paper
==============  ==========  ===============================================================
average         data-free   Wortsman et al. 2022 (model soups)
task_arithmetic data-free   Ilharco et al. 2023
ties            data-free   Yadav et al. 2023
dare            data-free   Yu et al. 2024
dare_ties       data-free   Yu et al. 2024 + Yadav et al. 2023
breadcrumbs     data-free   Davari & Belilovsky 2024
generalized     data-free   any sparsify x consensus x sum/mean combination
metagpt         data-free   Zhou et al. 2024 (two passes: norms, then merge)
lwptv           data-free   Zhang et al. 2025 (two passes: layer saliency, then merge)
fisher          data        Matena & Raffel 2022
regmean         data        Jin et al. 2023
adamerging      data        Yang et al. 2024
divmerge        data        Touayouch et al. 2025
==============  ==========  ===============================================================

Parameters have one meaning across methods. Where mergekit uses the same name differently:

==============  ===========================================  =================================================
parameter       polytask                                     mergekit
==============  ===========================================  =================================================
weight          per model; multiplies its task vector        same (TIES/linear also normalise by the weights)
lambda          scales the merged task vector                same
density         fraction of each task-vector tensor kept     TIES/breadcrumbs: same; DARE: keep probability
                by magnitude (TIES, breadcrumbs, dare_ties)  (polytask's DARE uses drop_rate = 1 - density)
drop_rate       DARE's p: drop probability                   (no such name; density = 1 - p)
rescale         DARE: survivors x 1/(1-p) (the paper)        rescale the masked vector to the original L1 norm
gamma           breadcrumbs: fraction of largest dropped     same
normalize       TIES/dare_ties: disjoint mean (default on)   dare_ties defaults to off (sum of agreeing entries)
==============  ===========================================  =================================================

Trims (TIES, breadcrumbs, the magnitude step of dare_ties and generalized) keep exactly k entries:
``trim_ties: first`` (default) keeps, of the entries tied with the k-th magnitude, the first in index order
(mergekit also keeps exactly k, but breaks ties by an unstable sort: on bf16 task vectors, where ties are
common, a few tied positions differ); ``trim_ties: all`` keeps every tied entry, as the official TIES code.
``trim_scope: tensor`` (default, as mergekit) ranks each task-vector tensor on its own in one read;
``trim_scope: model`` ranks the whole task vector, as the TIES paper and FusionBench, at the cost of two more
reads of the inputs (exact thresholds from histograms of the magnitudes' bits; memory stays one tensor per
input).

Other differences from mergekit: DARE's random masks use our own per-tensor seeded streams (16 random bits per
entry, so the keep probability is 1-p rounded to a multiple of 2^-16; survivors are rescaled by its inverse,
mergekit rescales to the L1 norm), so DARE agrees with mergekit only at drop_rate 0; ``average`` excludes the
base unless it is listed as a model. mergekit's configuration files run unchanged (``polytask merge CONFIG
OUTPUT``; see :mod:`polytask.merging.mergekit`), and its method names ``linear``/``dare_linear`` are accepted.

By default every input tensor and every merged tensor is checked for NaN and inf (``options.check_finite``);
weights that sum to zero are refused by the methods that divide by their sum (``average``, ``fisher``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polytask.errors import ConfigError
from polytask.merging import data_driven  # noqa: F401  (registers the data-driven methods)
from polytask.merging.checkpoint import Checkpoint, open_checkpoint
from polytask.merging.config import ExperimentConfig, MergeConfig, load_merge_config
from polytask.merging.data_driven import TaskModels, merge_encoders
from polytask.merging.methods import METHODS, MergeInputs, merge_tensors
from polytask.merging.stream import MergeOptions, ModelInput, merge_checkpoints, merge_state_dicts
from polytask.merging.writer import ShardedWriter


def run_merge_config(cfg: MergeConfig, log: Any = None) -> tuple[Path, dict[str, Any]]:
    """Run a validated checkpoint-merge config. Returns (output dir, summary). An experiment config (``suite:``)
    trains, so it is run by the merge flow (:func:`polytask.flows.merge.merge`)."""
    if isinstance(cfg, ExperimentConfig):
        raise ConfigError("a merge config with 'suite:' is an experiment: run it with polytask.flows.merge.merge "
                          "(or `polytask merge`)")
    base = cfg.base
    if log is not None:
        for note in cfg._notes:
            log(f"note: {note}")
    summary = merge_checkpoints(
        base.path if base is not None else cfg.models[0].path,
        [ModelInput(m.path, m.weight, m.params, m.job) for m in cfg.models], cfg.method, cfg.output.path,
        cfg.params, options=cfg.options, shard_size=cfg.output.shard_size, out_dtype=cfg.output.dtype,
        copy_files=cfg.output.copy_files, overwrite=cfg.output.overwrite,
        base_job=base.job if base is not None else cfg.models[0].job, log=log)
    return Path(summary["output"]), summary


__all__ = [
    "METHODS",
    "Checkpoint",
    "ExperimentConfig",
    "MergeConfig",
    "MergeInputs",
    "MergeOptions",
    "ModelInput",
    "ShardedWriter",
    "TaskModels",
    "load_merge_config",
    "merge_checkpoints",
    "merge_encoders",
    "merge_state_dicts",
    "merge_tensors",
    "open_checkpoint",
    "run_merge_config",
]
