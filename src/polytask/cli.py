"""The ``polytask`` command: thin wrappers that parse, validate and call the library."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from polytask.errors import PolytaskError
from polytask.registry import describe_params

# Nothing at import time here imports torch: a config is validated (well under a second) before a command imports
# the flow that trains; tests/e2e/test_cli_startup.py holds the CLI to that.

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Learn many tasks with one model: which tasks to group, and how to learn them.")
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        from polytask import __version__

        typer.echo(f"polytask {__version__}")
        raise typer.Exit()


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="show full tracebacks")] = False,
         version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="print the version and exit")] = False) -> None:
    _state["debug"] = debug


def _fail(e: BaseException) -> None:
    if _state["debug"]:
        traceback.print_exception(e)
    else:
        typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


def _flow(fn: Callable[..., Any] | str, config: Optional[Path], set_: list[str], resume: Optional[Path],
          quiet: bool, executor: Optional[str] = None) -> Any:
    """Run a run-directory flow (run, relate, group) with the shared config/override/resume handling.

    ``fn`` may be named as ``"module:function"``: it is imported only after the config is valid, so a typo is
    reported before torch loads. ``executor`` sets ``executor.name`` (of a resumed run too: it never changes
    results)."""
    from polytask.config import load_config
    from polytask.flows import Reporter

    try:
        if _world() > 1 and fn != "polytask.flows.run:run":
            raise PolytaskError("under torchrun only `polytask run` trains data-parallel (and polytask.fit); run this "
                                "command in one process")
        if resume is not None and (config is not None or set_):
            raise PolytaskError("--resume continues a run with its saved config; drop CONFIG and --set")
        overrides = [*set_, f"executor.name={executor}"] if executor is not None else set_
        cfg = None if resume is not None else load_config(config, overrides)
        if isinstance(fn, str):
            module, _, name = fn.partition(":")
            fn = getattr(importlib.import_module(module), name)
        extra = {"executor": executor} if resume is not None and executor is not None else {}
        return fn(cfg, resume=resume, reporter=Reporter(quiet=quiet or _rank() != 0), **extra)
    except (PolytaskError, OSError) as e:
        _fail(e)


def _rank() -> int:
    """This process's torchrun rank (0 alone): only rank 0 prints progress and results."""
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


ConfigArg = Annotated[Optional[Path], typer.Argument(help="experiment YAML (none: the default experiment)")]
SetOpt = Annotated[list[str], typer.Option("--set", help="override a key, e.g. --set relate.every=5")]
ResumeOpt = Annotated[Optional[Path], typer.Option(help="continue the run in this directory")]
QuietOpt = Annotated[bool, typer.Option(help="no progress output")]
ExecutorOpt = Annotated[Optional[str], typer.Option(
    "--executor", help="where independent jobs train: sequential (in this process) or ray (Ray tasks; pip install "
                       "'polytask[ray]'); sets executor.name")]


@app.command()
def run(config: ConfigArg = None, set_: SetOpt = [], resume: ResumeOpt = None,  # noqa: B006
        quiet: QuietOpt = False, executor: ExecutorOpt = None) -> None:
    """Train the single-task baselines and every configured method; write summary.json and report.html."""
    run_dir, summary = _flow("polytask.flows.run:run", config, set_, resume, quiet, executor)
    if _rank() != 0:
        return
    from polytask.flows.text import format_results

    typer.echo(format_results(summary, width=max(80, shutil.get_terminal_size((120, 24)).columns)))
    if "verdict" in summary:
        typer.echo(f"\nverdict: {summary['verdict']['text']}")
        typer.echo(f"report: {run_dir / 'report.html'}")
    else:
        typer.echo(f"run directory: {run_dir}  (summary.json, report.html)")


@app.command()
def suites() -> None:
    """List the built-in suites, their tasks and parameters."""
    from polytask.tasks import SUITES, build_suite

    for entry in SUITES:
        typer.echo(f"{entry.name}: {entry.summary}")
        required = [n for n, f in entry.params.model_fields.items() if f.is_required()]
        if required:
            typer.echo(f"  tasks: depend on the data ({', '.join(required)})")
        else:
            suite = build_suite(entry.name, {}, seed=0)
            typer.echo("  tasks: " + ", ".join(f"{t.name} ({t.kind}, {t.n_outputs})" for t in suite.tasks))
        typer.echo("  params:")
        for line in describe_params(entry.params):
            typer.echo(f"    {line}")


@app.command()
def methods() -> None:
    """List the registered joint-training methods, each with its paper and parameters."""
    from polytask.methods import load_all

    for entry in load_all():
        typer.echo(f"{entry.name:12s} [{entry.extra.get('kind', '')}] {entry.summary}")
        if entry.paper:
            typer.echo(f"{'':12s} paper: {entry.paper}")
        for line in describe_params(entry.params):
            typer.echo(f"{'':12s} {line}")


@app.command()
def architectures() -> None:
    """List the registered multi-task architectures, each with its paper and parameters."""
    from polytask.models import ARCHITECTURES

    for entry in ARCHITECTURES:
        typer.echo(f"{entry.name:12s} {entry.summary}")
        if entry.paper:
            typer.echo(f"{'':12s} paper: {entry.paper}")
        for line in describe_params(entry.params):
            typer.echo(f"{'':12s} {line}")


@app.command()
def relate(config: ConfigArg = None, set_: SetOpt = [], resume: ResumeOpt = None,  # noqa: B006
           quiet: QuietOpt = False, executor: ExecutorOpt = None) -> None:
    """Estimate task-affinity matrices (relate.estimators); write affinity_*.json, heatmaps and the report."""
    run_dir, affinities = _flow("polytask.flows.relate:relate", config, set_, resume, quiet, executor)
    for name, aff in affinities.items():
        typer.echo(f"{name} affinity (row i -> column j), cost {aff.cost}")
        width = max(len(t) for t in aff.tasks)
        typer.echo(" " * (width + 1) + " ".join(f"{t[:8]:>8s}" for t in aff.tasks))
        for t, row in zip(aff.tasks, aff.matrix, strict=True):
            typer.echo(f"{t:>{width}s} " + " ".join(f"{v:8.3f}" for v in row))
    typer.echo(f"run directory: {run_dir}")


@app.command()
def group(config: ConfigArg = None, set_: SetOpt = [], resume: ResumeOpt = None,  # noqa: B006
          quiet: QuietOpt = False, executor: ExecutorOpt = None) -> None:
    """Choose task groups under a budget (group.*) and prove them by training against the alternatives."""
    run_dir, summary = _flow("polytask.flows.group:group", config, set_, resume, quiet, executor)
    from polytask.flows.text import networks_text

    g = summary["grouping"]
    typer.echo(f"chosen groups ({summary['estimator']}, budget {summary['budget']:g}): {g['groups']}")
    if any(c != 1.0 for c in g.get("costs", [])) or any(g.get("labels", [])):
        typer.echo(f"chosen networks (total cost {g['total_cost']:g}): "
                   f"{networks_text(g['groups'], g['costs'], g['labels'])}")
    typer.echo(f"{'strategy':14s} {'models':>6s} {'cost':>6s} {'total val loss (mean ± std over seeds)':>40s}")
    for name, st in summary["strategies"].items():
        typer.echo(f"{name:14s} {st['models']:6d} {st.get('total_cost', st['models']):6g} "
                   f"{st['total_val_loss_mean']:28.4f} ± {st['total_val_loss_std']:.4f}")
    typer.echo(f"run directory: {run_dir}")


@app.command()
def report(run_dirs: Annotated[list[Path], typer.Argument(help="one or more run directories")],
           out: Annotated[Optional[Path], typer.Option(help="output HTML file")] = None) -> None:
    """Write a self-contained HTML report of one or more runs."""
    from polytask.flows.text import write_report

    try:
        path = write_report(run_dirs, out)
    except (PolytaskError, OSError) as e:
        _fail(e)
    typer.echo(f"report: {path}")


@app.command()
def front(run_dirs: Annotated[list[Path], typer.Argument(help="finished run directories with the same tasks")],
          out: Annotated[Optional[Path], typer.Option(help="output HTML file (default: the first run's "
                                                           "front.html)")] = None,
          normalise: Annotated[Optional[bool], typer.Option(
              "--normalise/--raw", help="score tasks relative to the single-task row, as Δm% does (default: when a "
                                        "run has one), or keep raw scores")] = None) -> None:
    """The Pareto front over every method of several runs: prints JSON (non-dominated methods, hypervolume,
    reference point) and writes an HTML page."""
    import json

    try:
        from polytask.flows.front import front as front_flow

        _, data = front_flow(run_dirs, out, normalise)
    except (PolytaskError, OSError) as e:
        _fail(e)
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    input_: Annotated[Path, typer.Option("--input", help="new rows: a CSV, TSV or Parquet file with exactly the "
                                                         "run's feature columns")],
    out: Annotated[Path, typer.Option(help="predictions file (.csv, .tsv, .parquet), written atomically")],
    job: Annotated[Optional[str], typer.Option(help="the job to predict with (default: the best joint job by "
                                                    "the run's summary)")] = None,
    proba: Annotated[bool, typer.Option(help="add each class's probability as <task>:proba:<label>")] = False,
) -> None:
    """Predict new rows with a trained job: labels and values in the units of the training data."""
    try:
        from polytask.flows.predict import predict_file

        path, predictor, n = predict_file(run_dir, job, input_, out, proba)
    except (PolytaskError, OSError) as e:
        _fail(e)
    chosen = "" if job is not None else " (best joint job of summary.json)"
    typer.echo(f"{n} rows predicted by job {predictor.job.id!r}{chosen}: {path}")


@app.command()
def merge(
    config: Annotated[Optional[Path], typer.Argument(
        help="merge YAML: base, models, method, output; or an experiment with 'suite:'; or a mergekit config "
             "(merge_method, base_model, models, parameters, dtype)")] = None,
    output: Annotated[Optional[Path], typer.Argument(
        help="output directory (sets output.path; needed for a mergekit config, as with mergekit-yaml)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override a key, e.g. --set params.density=0.3")] = [],  # noqa: B006
    list_methods: Annotated[bool, typer.Option("--list", help="list the merge methods and their parameters")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress output")] = False,
    executor: ExecutorOpt = None,
) -> None:
    """Merge models: checkpoints tensor by tensor, or pretrain / fine-tune / merge / evaluate on a suite."""
    from polytask.flows import Reporter
    from polytask.merging import METHODS, ExperimentConfig, load_merge_config

    if list_methods:
        for entry in METHODS:
            typer.echo(f"{entry.name:16s} [{entry.extra.get('kind', '')}] {entry.summary}")
            typer.echo(f"{'':16s} paper: {entry.paper}")
            for line in describe_params(entry.params):
                typer.echo(f"{'':16s} {line}")
        return
    try:
        if config is None:
            raise PolytaskError("give a merge config (see `polytask merge --list` for the methods)")
        cfg = load_merge_config(config, set_, output)
        if executor is not None:
            if not isinstance(cfg, ExperimentConfig):
                raise PolytaskError("--executor: a checkpoint merge trains no jobs; it applies to merge experiments "
                                    "(configs with 'suite:')")
            cfg = load_merge_config(config, [*set_, f"executor.name={executor}"], output)
        from polytask.flows.merge import merge as merge_flow

        out, summary = merge_flow(cfg, Reporter(quiet=quiet))
    except (PolytaskError, OSError) as e:
        _fail(e)
    if isinstance(cfg, ExperimentConfig):
        from polytask.flows.text import format_merge_table

        typer.echo(format_merge_table(summary))
        typer.echo(f"run directory: {out}  (summary.json, report.html)")
    else:
        typer.echo(f"merged {summary['tensors_merged']} tensors ({summary['tensors_copied']} copied from the base) "
                   f"with {summary['method']} in {summary['seconds']:.1f} s -> {out}")


@app.command()
def continual(
    config: Annotated[Optional[Path], typer.Argument(help="continual YAML: stream, strategies, seeds, model, train")]
    = None,
    set_: SetOpt = [],  # noqa: B006
    resume: ResumeOpt = None,
    list_: Annotated[bool, typer.Option("--list", help="list the streams and strategies with their parameters")]
    = False,
    quiet: QuietOpt = False,
    search_schedule: Annotated[Optional[int], typer.Option(
        "--search-schedule", metavar="N", help="search a replay schedule by MCTS with N rollouts on the validation "
        "splits (the config's replay_schedule entry, first seed) instead of running the study")] = None,
) -> None:
    """Learn a stream of experiences with every strategy and seed: accuracy matrix, BWT, FWT, forgetting."""
    if list_:
        from polytask.continual import STRATEGIES, STREAMS

        for title, registry in (("streams", STREAMS), ("strategies", STRATEGIES)):
            typer.echo(f"{title}:")
            for entry in registry:
                typer.echo(f"  {entry.name:16s} {entry.summary}")
                for line in describe_params(entry.params):
                    typer.echo(f"  {'':16s} {line}")
        return
    try:
        if resume is not None and (config is not None or set_):
            raise PolytaskError("--resume continues a run with its saved config; drop CONFIG and --set")
        if resume is None and config is None:
            raise PolytaskError("give a continual config (see `polytask continual --list` and examples/continual.yaml)")
        from polytask.continual.config import load_continual_config
        from polytask.flows import Reporter

        cfg = None if config is None else load_continual_config(config, set_)
        if search_schedule is not None:
            if cfg is None:
                raise PolytaskError("--search-schedule searches for a config; give CONFIG, not --resume")
            import json

            from polytask.flows.schedule_search import search_schedule as search

            found = search(cfg, search_schedule, reporter=Reporter(quiet=quiet))
            typer.echo(f"best schedule (validation reward {found['best']['reward']:.4f}): "
                       f"{json.dumps(found['best']['schedule'])}")
            typer.echo(f"search directory: {found['directory']}  (search-mcts.json)")
            return
        from polytask.flows.continual import continual as continual_flow

        run_dir, summary = continual_flow(cfg, resume=resume, reporter=Reporter(quiet=quiet))
    except (PolytaskError, OSError) as e:
        _fail(e)
    from polytask.flows.text import format_continual_table

    typer.echo(format_continual_table(summary))
    typer.echo(f"run directory: {run_dir}  (summary.json, report.html)")


@app.command()
def icl(
    config: Annotated[Optional[Path], typer.Argument(help="icl YAML: families, model, regime, method, train, eval")]
    = None,
    set_: SetOpt = [],  # noqa: B006
    resume: ResumeOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train a small transformer on in-context task families, then its error vs number of examples (issue 13)."""
    try:
        if resume is not None and (config is not None or set_):
            raise PolytaskError("--resume continues a run with its saved config; drop CONFIG and --set")
        if resume is None and config is None:
            raise PolytaskError("give an icl config (see examples/icl-linear.yaml)")
        from polytask.flows import Reporter
        from polytask.flows.icl import icl as icl_flow
        from polytask.flows.icl import load_icl_config

        cfg = None if config is None else load_icl_config(config, set_, full=False)  # before torch loads
        run_dir, results = icl_flow(cfg, resume=resume, reporter=Reporter(quiet=quiet))
    except (PolytaskError, OSError) as e:
        _fail(e)
    from polytask.flows.icl import summary_text

    typer.echo(summary_text(results))
    typer.echo(f"run directory: {run_dir}  (results.json, report.html)")


def entrypoint() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    entrypoint()
