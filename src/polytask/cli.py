"""The ``polytask`` command: thin wrappers that parse, validate and call the library."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from polytask.errors import PolytaskError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Learn many tasks with one model: which tasks to group, and how to learn them.")
_state = {"debug": False}


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="show full tracebacks")] = False) -> None:
    _state["debug"] = debug


def _fail(e: BaseException) -> None:
    if _state["debug"]:
        traceback.print_exception(e)
    else:
        typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Argument(help="experiment YAML (none: the default experiment)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override a key, e.g. --set train.epochs=3")] = [],  # noqa: B006
    resume: Annotated[Optional[Path], typer.Option(help="continue the run in this directory")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress output")] = False,
) -> None:
    """Train the single-task baselines and every configured method; write summary.json and report.html."""
    from polytask.config import load_config
    from polytask.engine.progress import Reporter
    from polytask.experiment import run as run_experiment
    from polytask.report.console import format_results

    try:
        if resume is not None and (config is not None or set_):
            raise PolytaskError("--resume continues a run with its saved config; drop CONFIG and --set")
        cfg = None if resume is not None else load_config(config, set_)
        run_dir, summary = run_experiment(cfg, resume=resume, reporter=Reporter(quiet=quiet))
    except (PolytaskError, OSError) as e:
        _fail(e)
    typer.echo(format_results(summary))
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
        for name, field in entry.params.model_fields.items():
            default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
            typer.echo(f"    {name} ({default}): {field.description or ''}")


@app.command()
def methods() -> None:
    """List the registered joint-training methods, each with its paper."""
    from polytask.methods import load_all

    for entry in load_all():
        typer.echo(f"{entry.name:12s} [{entry.extra.get('kind', '')}] {entry.summary}")
        if entry.paper:
            typer.echo(f"{'':12s} paper: {entry.paper}")


@app.command()
def report(run_dirs: Annotated[list[Path], typer.Argument(help="one or more run directories")],
           out: Annotated[Optional[Path], typer.Option(help="output HTML file")] = None) -> None:
    """Write a self-contained HTML report of one or more runs."""
    from polytask.report.html import write_report

    try:
        path = write_report(run_dirs, out)
    except (PolytaskError, OSError) as e:
        _fail(e)
    typer.echo(f"report: {path}")


def entrypoint() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    entrypoint()
