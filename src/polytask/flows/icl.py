"""``polytask icl``: train a small GPT-2 on in-context task families with the engine, then evaluate and report.

Layout of the run directory::

    config.yaml     the resolved icl config
    job/            the engine's checkpoints (last.safetensors every epoch / checkpoint_every steps, best.safetensors
                    at the end: the last weights, as Garg et al. evaluate the final model)
    model/          token tasks: the language model as a local Hugging Face directory (config.json,
                    model.safetensors), what ``polytask.icl.representations`` probes read
    results.json    per family: error (function classes, normalised squared error) or accuracy (token tasks) against
                    the number of in-context examples, for the model and the baselines, in and out of distribution
    report.html     the curves as charts

A run killed anywhere resumes exactly from the job's checkpoint (``--resume DIR``); evaluation is a pure function of
the final weights and ``eval.seed``, so it is simply redone.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polytask
from polytask.icl.config import IclConfig, check_icl, dump_icl_config, family_kind, load_icl_config
from polytask.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    import torch

    from polytask.engine.progress import Reporter
    from polytask.icl.model import FunctionModel, TokenModel
    from polytask.icl.prompts import Prompts
    from polytask.icl.train import IclJob, Schedule

# torch and the engine are imported inside the functions: the CLI validates a config (load_icl_config) before
# anything heavy loads, so a typo is answered at once.
__all__ = ["icl", "load_icl_config", "summary_text"]

RESULTS, REPORT = "results.json", "report.html"


def build_families(config: IclConfig) -> list[Any]:
    """The configured families (function classes or token tasks), each named by its label."""
    from polytask.icl.discrete import build_token_task
    from polytask.icl.evaluate import TaskPool
    from polytask.icl.functions import build_function_class

    out: list[Any] = []
    for i, f in enumerate(config.families):
        build = build_function_class if family_kind(f.name, f"families.{i}.name") == "function_class" \
            else build_token_task
        family = replace(build(f.name, f.params, where=f"families.{i}.params"), name=f.label)
        if f.pool:
            pool = TaskPool(family, f.pool, seed=config.seed * 1009 + i)
            pool.name = f.label
            family = pool
        out.append(family)
    return out


def _schedule(s: Any) -> Schedule:
    from polytask.icl.train import Schedule

    return Schedule(s.start if s.start is not None else s.end, s.end, s.inc, s.interval)


def job_of(config: IclConfig, families: list[Any], job_dir: Path) -> IclJob:
    """The engine job that ``config`` describes (checkpoints in ``job_dir``)."""
    from polytask.engine.loop import resolve_device
    from polytask.engine.optim import optimizer, scheduler
    from polytask.engine.step import build_method
    from polytask.icl.train import IclJob

    tc, mc, cc = config.train, config.model, config.curriculum
    o, s = tc.optimizer, tc.scheduler
    return IclJob(
        name="icl", method=build_method(config.method, [f.name for f in families]),
        optimizer=optimizer(o.name, o.model_dump(exclude={"name"}), "train.optimizer", ignore_unknown=True),
        scheduler=scheduler(s.name, s.model_dump(exclude={"name"}), "train.scheduler", ignore_unknown=True),
        epochs=tc.epochs, steps=tc.steps, batch_size=tc.batch_size, points=_schedule(cc.points),
        dims=None if cc.dims is None else _schedule(cc.dims),
        enter_every=config.regime.enter_every if config.regime.kind == "task_curriculum" else 0,
        n_embd=mc.n_embd, n_layer=mc.n_layer, n_head=mc.n_head, seed=config.seed,
        checkpoint_every=tc.checkpoint_every, checkpoint=job_dir, eval_prompts=min(config.eval.prompts, 256),
        device=str(resolve_device(tc.device)))


# ---------------------------------------------------------------- evaluation


def model_predictor(model: FunctionModel, family: str) -> Any:
    """The trained model as an :mod:`polytask.icl.evaluate` predictor (Prompts -> B x n, column i from the points
    before i)."""
    import torch

    from polytask.icl.model import pack

    device = next(model.parameters()).device

    def predict(prompts: Prompts) -> torch.Tensor:
        with torch.no_grad():
            return model(pack(prompts.xs, prompts.ys, model.dim).to(device), [family])[family].cpu()
    return predict


def function_curves(model: FunctionModel, family: Any, config: IclConfig, k: int) -> dict[str, Any]:
    """Error vs number of examples of the model and the baselines, in distribution and under each shift. A family
    trained on a task pool (Raventós et al. 2023) is scored on its pool (``standard``, the seen tasks) and on fresh
    functions (``unseen``), with the pool's posterior mean (the memorising learner) among the baselines of linear
    classes (its noise std: the class's, 1 for a noiseless one); shifted inputs draw fresh functions."""
    from polytask.icl.baselines import PoolPosterior, baselines_for, build_baseline
    from polytask.icl.evaluate import TaskPool, error_curves, normaliser
    from polytask.icl.functions import SHIFTS, noisy_labels
    from polytask.icl.train import generator

    ec = config.eval
    n = config.curriculum.points.end
    pool = family if isinstance(family, TaskPool) else None
    fresh = pool.family if pool is not None else family  # shifted prompts draw fresh functions of the class
    base = baselines_for(fresh) if ec.baselines is None else {b: build_baseline(b) for b in ec.baselines}
    if pool is not None and pool.ws is not None:
        base["pool_posterior"] = PoolPosterior(pool.ws, noise_std=getattr(fresh, "noise_std", 0.0) or 1.0)
    predictors = {"model": model_predictor(model, family.name), **base}
    scale = normaliser(fresh)
    out: dict[str, Any] = {"normaliser": scale}
    shifts = [("standard", None), *((s.label, s) for s in ec.ood if s.label != "standard")]
    if pool is not None:
        shifts.insert(1, ("unseen", None))
    for j, (label, shift) in enumerate(shifts):
        g = generator(ec.seed, k, j)
        if label == "unseen":
            prompts: Any = fresh.sample(g, ec.prompts, n)
        elif shift is None or shift.name == "standard":
            prompts = family.sample(g, ec.prompts, n)
        elif shift.name == "noisy_labels":
            prompts = noisy_labels(family.sample(g, ec.prompts, n), g, shift.std)
        else:
            make = SHIFTS[shift.name]
            prompts = fresh.sample_split(g, ec.prompts, n, make(shift.factor) if shift.name == "scaled" else make())
        curves = error_curves(predictors, prompts, scale, seed=ec.seed, trials=200)
        out[label] = {name: c.as_dict() for name, c in curves.items()}
    return out


def token_curves(model: TokenModel, family: Any, config: IclConfig, k: int) -> dict[str, Any]:
    """Exact-match accuracy of the model's greedy answer vs number of demonstrations (0 .. the curriculum's end)."""
    from polytask.icl.model import predict_answers
    from polytask.icl.train import generator

    model.eval()
    device = next(model.parameters()).device
    ec, acc = config.eval, []
    for n in range(config.curriculum.points.end + 1):
        p = family.sample(generator(ec.seed, k, n), ec.prompts, n)
        pred = predict_answers(model, p.tokens.to(device), p.answers.shape[1]).cpu()
        acc.append(float((pred == p.answers).all(1).float().mean()))
    return {"standard": {"model": {"examples": list(range(len(acc))), "accuracy": acc, "prompts": ec.prompts}}}


# ---------------------------------------------------------------- report


def render_report(results: dict[str, Any]) -> str:
    """A self-contained HTML page: per family and evaluation, the error (or accuracy) curves of the model and the
    baselines against the number of in-context examples."""
    from polytask.report.svg import line_chart

    parts = [f"<h1>polytask icl: {escape(results['run_id'])}</h1>",
             f"<p>families: {escape(', '.join(results['families']))}; regime {escape(results['regime'])}; "
             f"method {escape(results['method'])}; {results['steps']} steps in {results['wall_time_s']:.0f} s</p>"]
    for fam, evals in results["eval"].items():
        parts.append(f"<h2>{escape(fam)}</h2>")
        for label, curves in evals.items():
            if not isinstance(curves, dict):
                continue
            key = "accuracy" if any("accuracy" in c for c in curves.values()) else "mean"
            series = {name: list(zip(c["examples"], c[key], strict=True)) for name, c in curves.items()}
            ylabel = "accuracy" if key == "accuracy" else "normalised squared error"
            parts.append(line_chart(series, f"{fam}: {label}", "in-context examples", ylabel))
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>polytask icl</title></head><body>"
            f"<main>{''.join(parts)}<footer>Generated by polytask {escape(polytask.__version__)}.</footer></main>"
            "</body></html>\n")


# ---------------------------------------------------------------- the flow


def _open(config: IclConfig | None, resume: str | Path | None) -> tuple[Path, IclConfig]:
    from polytask.flows.runner import open_regime_run

    name = ""
    if resume is None and config is not None:
        check_icl(config)
        name = f"icl-{'-'.join(f.label for f in config.families[:3])}-{time.strftime('%Y%m%d-%H%M%S')}"
    return open_regime_run(config, resume, name, load_icl_config, dump_icl_config,
                           "polytask icl needs a config (families, model, train); see examples/icl-linear.yaml")


def icl(config: IclConfig | None, resume: str | Path | None = None,
        reporter: Reporter | None = None) -> tuple[Path, dict[str, Any]]:
    """Train (or resume) and evaluate an in-context learning study; returns the run directory and its results (also
    in results.json, with report.html beside it). The run directory's lock is given up when it returns or fails."""
    from polytask.flows.runner import releases_run_locks

    return releases_run_locks(_icl)(config, resume, reporter)


def _icl(config: IclConfig | None, resume: str | Path | None,
         reporter: Reporter | None) -> tuple[Path, dict[str, Any]]:
    import torch
    from safetensors.torch import load_file

    from polytask.engine.loop import train_job
    from polytask.engine.progress import Reporter
    from polytask.flows.runner import versions
    from polytask.icl.model import FunctionModel, TokenModel
    from polytask.icl.train import icl_spec, is_token

    reporter = reporter or Reporter(quiet=True)
    run_dir, config = _open(config, resume)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    from polytask.engine import faults

    faults.hit("start")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    families = build_families(config)
    spec = icl_spec(families, job_of(config, families, run_dir / "job"))
    result = train_job(spec, reporter)
    with torch.random.fork_rng(devices=[]):
        model = spec.model() if callable(spec.model) else spec.model
    model.load_state_dict(load_file(spec.checkpoint.best))
    model.to(torch.device(spec.device)).eval()
    evals: dict[str, Any] = {}
    for k, fam in enumerate(families):
        if is_token(fam):
            assert isinstance(model, TokenModel)
            evals[fam.name] = token_curves(model, fam, config, k)
        else:
            assert isinstance(model, FunctionModel)
            evals[fam.name] = function_curves(model, fam, config, k)
    if isinstance(model, TokenModel):
        model.save_pretrained(run_dir / "model")
    results = {"kind": "icl", "polytask_version": polytask.__version__, "run_id": run_dir.name, "started": started,
               "versions": versions(), "families": [f.name for f in families], "regime": config.regime.kind,
               "method": config.method.name, "steps": result["steps"], "wall_time_s": result["wall_time_s"],
               "history": result["history"], "eval": evals}
    atomic_write_json(run_dir / RESULTS, results)
    atomic_write_text(run_dir / REPORT, render_report(results))
    reporter.log(f"[icl] results in {run_dir / RESULTS}")
    return run_dir, results


def final_errors(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per family, each predictor's in-distribution error (or accuracy) at the most examples: a one-line summary."""
    out: dict[str, dict[str, float]] = {}
    for fam, evals in results["eval"].items():
        out[fam] = {name: c.get("accuracy", c.get("mean"))[-1] for name, c in evals["standard"].items()}
    return out


def summary_text(results: dict[str, Any]) -> str:
    """What the CLI prints: per family, the model's and the baselines' final error or accuracy."""
    return json.dumps(final_errors(results), indent=1)
