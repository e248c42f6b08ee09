"""``polytask merge`` on a suite: pretrain a shared backbone, fine-tune one model per task from it (jobs of the
shared runner, ``model.init_from``), merge the fine-tuned encoders with every listed method (each task keeps its own
head), and evaluate every task; a checkpoint merge config goes to :func:`polytask.merging.run_merge_config`. The
per-task fine-tunes are independent: ``executor`` runs them (one after another, or as Ray tasks:
:mod:`polytask.flows.executor`); the pretraining, the merges and the evaluation run in this process.

Layout of the run directory::

    config.yaml          the resolved experiment configuration
    jobs/pretrain/       the backbone (best.safetensors, result.json)
    jobs/finetune__<t>/  one fine-tuned model per task
    summary.json         per method: test metrics per task, normalised accuracy, chosen parameters, time
    report.html          the same as a self-contained table
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

import polytask
from polytask.config import BaselineConfig, Config, MethodConfig
from polytask.engine.loop import evaluate
from polytask.engine.progress import Reporter
from polytask.engine.state import seed_everything
from polytask.errors import ConfigError
from polytask.flows.executor import execute_all
from polytask.flows.jobs import Job
from polytask.flows.runner import execute, job_dir_of
from polytask.io import atomic_write_json, atomic_write_text
from polytask.merging import run_merge_config
from polytask.merging.config import ExperimentConfig, MergeConfig
from polytask.merging.data_driven import TaskModels, merge_encoders
from polytask.merging.experiment import (
    ENCODER,
    first_metric,
    grid,
    normalized,
    signed_score,
    split_train,
    strip_prefix,
    task_source,
)
from polytask.merging.methods import METHODS
from polytask.models import build_model
from polytask.report.merge import render_merge_report
from polytask.tasks import build_suite


def _engine_config(cfg: ExperimentConfig, epochs: int, lr: float | None, init_from: str) -> Config:
    train = cfg.train.model_copy(update={"epochs": epochs})
    if lr is not None:
        train = train.model_copy(update={"optimizer": train.optimizer.model_copy(update={"lr": lr})})
    model = cfg.model.model_copy(update={"init_from": init_from})
    # the fine-tuned models depend on the backbone file: no shared single-task cache
    return Config(seed=cfg.seed, suite=cfg.suite, model=model, train=train, baselines=BaselineConfig(cache=False),
                  executor=cfg.executor)

def _same_experiment(saved: str, text: str) -> bool:
    """Whether a run directory's saved config is this experiment's; the executor may differ (it never changes
    results, so a run started sequentially may be finished on Ray)."""
    a, b = yaml.safe_load(saved) or {}, yaml.safe_load(text)
    a.pop("executor", None)
    b.pop("executor", None)
    return a == b

def run_merge_experiment(cfg: ExperimentConfig, reporter: Reporter | None = None,
                         run_dir: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Run (or finish) a merging experiment; returns the run directory and its summary."""
    reporter = reporter or Reporter(quiet=True)
    t_start = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    full = build_suite(cfg.suite.name, cfg.suite.params, cfg.seed)
    names = cfg.tasks or full.task_names
    for t in [*names, *cfg.pretrain.tasks]:
        full.task(t)
    if len(names) < 2:
        raise ConfigError("tasks: a merge needs at least two tasks")
    pre_suite, ft_suite = split_train(full, cfg.pretrain.fraction, cfg.seed)
    pre_tasks = tuple(cfg.pretrain.tasks or names)
    if run_dir is None:
        name = cfg.output.name or f"merge-{cfg.suite.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(cfg.output.dir) / name
    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if saved.exists() and not _same_experiment(saved.read_text(), text):
        raise ConfigError(f"run directory {run_dir} holds another experiment; set output.name")
    atomic_write_text(saved, text)

    pre_cfg = _engine_config(cfg, cfg.pretrain.epochs, cfg.pretrain.lr, "")
    reporter.log(f"pretraining the backbone on {', '.join(pre_tasks)}")
    pretrain = Job("pretrain", pre_tasks, MethodConfig(name="equal"), "joint")
    execute(pretrain, pre_suite, pre_cfg, run_dir, reporter)
    pre_dir = job_dir_of(run_dir, pretrain)
    ft_cfg = _engine_config(cfg, cfg.finetune.epochs, cfg.finetune.lr, str(pre_dir / "best.safetensors"))
    finetunes = [Job(f"finetune/{t}", (t,), MethodConfig(name="equal"), "single_task") for t in names]
    execute_all(finetunes, ft_suite, ft_cfg, run_dir, reporter)  # independent of each other: cfg.executor runs them
    ft_states = [load_file(job_dir_of(run_dir, job) / "best.safetensors") for job in finetunes]

    tasks = [full.task(t) for t in names]
    seed_everything(cfg.seed)
    model = build_model(tasks, full.input_shape, cfg.model.backbone, cfg.model.backbone_params,
                        cfg.model.architecture, cfg.model.architecture_params, full.categorical,
                        cfg.model.embedding_dim)
    if not hasattr(model, "encoder") or not hasattr(model, "heads"):
        raise ConfigError("model.architecture: merging needs a shared encoder with one head per task (hard)")
    pretrained = strip_prefix(load_file(pre_dir / "best.safetensors"), ENCODER)
    encoders = [strip_prefix(s, ENCODER) for s in ft_states]
    heads = []
    for t, s in zip(names, ft_states, strict=True):
        head = build_model([full.task(t)], full.input_shape, cfg.model.backbone, cfg.model.backbone_params,
                           cfg.model.architecture, cfg.model.architecture_params, full.categorical,
                           cfg.model.embedding_dim).heads[t]
        head.load_state_dict(strip_prefix(s, f"heads.{t}."))
        heads.append(head)
    n = cfg.data.n_examples
    train_data = [task_source(ft_suite.splits["train"], t) for t in names]
    ctx = TaskModels(model.encoder, pretrained, encoders, heads, tasks,
                     inputs=[task_source(full.splits["test"], t)[0][:n] for t in names],
                     train_inputs=[x[:n] for x, _ in train_data], train_targets=[y[:n] for _, y in train_data])

    def scores(encoder_state: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]], split: str
               ) -> dict[str, dict[str, float]]:
        out = {}
        for k, t in enumerate(names):
            state = encoder_state[k] if isinstance(encoder_state, list) else encoder_state
            model.encoder.load_state_dict(state)
            model.heads[t].load_state_dict(heads[k].state_dict())
            out.update(evaluate(model, full.splits[split], [tasks[k]], cfg.train.eval_batch_size))
        return out

    reference = scores(encoders, "test")
    results: dict[str, dict[str, Any]] = {
        "finetuned": {"method": "finetuned", "params": {}, "tasks": reference, "seconds": 0.0},
        "pretrained": {"method": "pretrained", "params": {}, "tasks": scores(pretrained, "test"), "seconds": 0.0},
    }
    for spec in cfg.methods:
        entry = METHODS.get(spec.name)
        candidates = grid(spec.params, spec.grid)
        best, best_val, chosen_state, seconds, chosen_seconds = None, -float("inf"), None, 0.0, 0.0
        for params in candidates:
            t0 = time.perf_counter()
            state = merge_encoders(spec.name, params, ctx, seed=cfg.options.seed)
            seconds = time.perf_counter() - t0
            if len(candidates) == 1:
                best, chosen_state, chosen_seconds = params, state, seconds
                break
            val = scores(state, "val")
            mean = float(np.mean([signed_score(val, t) for t in tasks]))
            if mean > best_val:
                best, best_val, chosen_state, chosen_seconds = params, mean, state, seconds
        reporter.log(f"[{spec.label}] merged with {entry.name} {best}")
        results[spec.label] = {"method": spec.name, "params": best, "tasks": scores(chosen_state, "test"),
                               "seconds": chosen_seconds, "grid": spec.grid}
    for r in results.values():
        r["normalized"] = {t.name: normalized(r["tasks"], reference, t) for t in tasks}
        r["mean"] = float(np.mean([first_metric(r["tasks"], t)[1] for t in tasks]))
        r["mean_normalized"] = float(np.mean(list(r["normalized"].values())))
    summary = {
        "polytask_version": polytask.__version__, "kind": "merge", "suite": cfg.suite.name,
        "tasks": [{"name": t.name, "metric": t.metrics[0].name, "higher_is_better": t.metrics[0].higher_is_better}
                  for t in tasks],
        "pretrain_tasks": list(pre_tasks), "seed": cfg.seed, "reference": "finetuned", "results": results,
        "wall_time_s": time.perf_counter() - t_start,
    }
    atomic_write_json(run_dir / "summary.json", summary)
    atomic_write_text(run_dir / "report.html", render_merge_report(summary))
    return run_dir, summary

def merge(cfg: MergeConfig | ExperimentConfig, reporter: Reporter | None = None) -> tuple[Path, dict[str, Any]]:
    """Run a validated merge config: a merging experiment on a suite, or a checkpoint merge. Returns (output
    directory, summary)."""
    if isinstance(cfg, ExperimentConfig):
        return run_merge_experiment(cfg, reporter)
    return run_merge_config(cfg, log=reporter.log if reporter is not None else None)
