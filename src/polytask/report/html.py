"""One self-contained HTML page (inline CSS and SVG, no scripts or URLs) from run directories."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from polytask.errors import CheckpointError, DataError, PolytaskError
from polytask.report.console import Grid, layout, number, tabulate_results, task_metrics
from polytask.report.continual import continual_section
from polytask.report.front import front_section
from polytask.report.pareto import build_front, front_summary, has_front, pareto_section
from polytask.report.relations import has_relations, relations_section
from polytask.report.svg import PALETTE, Point, line_chart

Record = dict[str, Any]

_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d8dee4; --soft: #f6f8fa; --best: #dafbe1; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 48px; }
h1 { font-size: 24px; margin: 0 0 2px; }
h2 { font-size: 18px; margin: 32px 0 10px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 22px 0 8px; }
.run { margin-top: 36px; }
.run:first-of-type { margin-top: 0; }
.subtitle { color: var(--muted); margin: 0 0 14px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 3px 18px; margin: 0; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; }
.scroll { overflow-x: auto; }
table.results { border-collapse: collapse; font-variant-numeric: tabular-nums; }
table.results th, table.results td { padding: 6px 14px; text-align: right; white-space: nowrap;
       border-bottom: 1px solid var(--line); }
table.results .label { text-align: left; }
table.results caption { caption-side: top; text-align: left; font-weight: 600; padding: 14px 0 6px; }
table.results thead th { background: var(--soft); font-weight: 600; }
table.results thead tr:not(:last-child) th { border-bottom: none; }
table.results th.group { text-align: center; }
table.results tbody tr:hover { background: var(--soft); }
table.results td.best { background: var(--best); font-weight: 600; }
.note { color: var(--muted); font-size: 13px; max-width: 90ch; margin: 8px 0; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 14px; }
figure { margin: 0; padding: 8px; border: 1px solid var(--line); border-radius: 6px; }
figure svg { display: block; max-width: 100%; height: auto; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
table.results td.worse { background: #fff1e5; }
.verdict { font-size: 17px; line-height: 1.5; margin: 4px 0 18px; padding: 14px 18px; max-width: 110ch;
           background: var(--best); border-left: 4px solid #1a7f37; border-radius: 4px; }
"""


def load_summary(run_dir: Path) -> dict[str, Any]:
    """Read ``run_dir/summary.json``; raise an error naming the file when it is missing or malformed."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: expected a polytask run directory with a summary.json "
            "(it is written when a run finishes); check the path or let the run complete."
        )
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read as JSON ({err}); re-run or restore it.") from err
    if not isinstance(summary, dict) or not isinstance(summary.get("results"), dict):
        raise CheckpointError(
            f"{path} has no 'results' object; is it a polytask summary.json written by a finished run?"
        )
    return summary


def read_metrics(run_dir: Path) -> tuple[list[Record], int]:
    """Records of ``run_dir/metrics.jsonl`` and the count of unreadable lines skipped.

    A missing file gives no records; a torn last line (an interrupted run) is skipped, not fatal.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return [], 0
    records: list[Record] = []
    skipped = 0
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                skipped += 1
    return records, skipped


def curve(records: Iterable[Record], job: str, task: str, split: str, key: str) -> list[Point]:
    """``key`` of ``job`` on ``task`` and ``split`` per epoch (mean over records of one epoch)."""
    by_x: dict[float, list[float]] = {}
    for r in records:
        if r.get("job") != job or r.get("task") != task or r.get("split") != split:
            continue
        x = number(r.get("epoch", r.get("step")))
        y = number(r.get(key))
        if x is not None and y is not None and math.isfinite(y):
            by_x.setdefault(x, []).append(y)
    return [(x, sum(ys) / len(ys)) for x, ys in sorted(by_x.items())]


def _method_of(job: str, results: Mapping[str, Any]) -> str:
    """The results entry a job belongs to: itself, or ``stl`` for a job ``stl/<task>``."""
    return job if job in results else job.partition("/")[0]


def _best_epoch(job: str, task: str, results: Mapping[str, Any]) -> float | None:
    result = results.get(_method_of(job, results))
    best = result.get("best_epoch") if isinstance(result, Mapping) else None
    if isinstance(best, Mapping):
        best = best.get(task)
    return number(best)


def _jobs(records: Sequence[Record], results: Mapping[str, Any]) -> list[str]:
    """Jobs in metrics order, grouped by their method's display order in the results."""
    seen = list(dict.fromkeys(r["job"] for r in records if isinstance(r.get("job"), str)))
    order = {m: i for i, m in enumerate(results)}
    return sorted(seen, key=lambda j: order.get(_method_of(j, results), len(order)))


def _charts(summary: Mapping[str, Any], records: Sequence[Record]) -> str:
    results = summary["results"]
    tasks = task_metrics(summary)
    jobs = _jobs(records, results)
    methods = list(dict.fromkeys([*results, *(_method_of(j, results) for j in jobs)]))
    method_colors = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}
    colors = {j: method_colors[_method_of(j, results)] for j in jobs}
    trained = {
        (r["job"], r["task"]) for r in records if isinstance(r.get("job"), str) and isinstance(r.get("task"), str)
    }
    out = []
    for task, specs in tasks.items():
        owners = [j for j in jobs if (j, task) in trained and j.partition("/")[2] in ("", task)]
        metric, better = specs[0]
        val = {j: curve(records, j, task, "val", metric) for j in owners}
        markers = {}
        for job, points in val.items():
            best = _best_epoch(job, task, results)
            markers.update((job, p) for p in points if p[0] == best)
        train = {j: curve(records, j, task, "train", "loss") for j in owners}
        if not any([*val.values(), *train.values()]):
            out.append(f"<h3>{escape(task)}</h3><p class='note'>No curves were recorded for this task.</p>")
            continue
        arrow = {True: " ↑", False: " ↓", None: ""}[better]
        out.append(f"<h3>{escape(task)}</h3><div class='charts'>")
        out.append(
            "<figure>"
            + line_chart(
                val,
                f"{task} · validation {metric}",
                "epoch",
                f"{metric}{arrow}",
                colors=colors,
                markers=markers,
            )
            + "</figure>"
        )
        out.append(
            "<figure>"
            + line_chart(train, f"{task} · training loss", "epoch", "loss ↓", colors=colors)
            + "</figure></div>"
        )
    return "".join(out)


_PAGE_PX = 1116
"""Width of the page's content box: ``main``'s max-width less its padding (see _CSS)."""
_CHAR_PX = 8.2
"""Upper estimate of one character's width in a table cell (14 px system-ui, bold headers)."""
_CELL_PAD_PX = 28
"""Horizontal padding of a table cell (see _CSS)."""


def fits_page(grid: Grid) -> bool:
    """Whether a table fits the page's width without a horizontal scroll (estimated from its text)."""
    return sum(w * _CHAR_PX + _CELL_PAD_PX for w in grid.widths()) <= _PAGE_PX


def _table(grid: Grid, multiple: bool) -> str:
    caption = f"<caption>{escape(grid.title)}</caption>" if multiple else ""
    groups: list[tuple[str, int]] = []
    for group, _ in grid.headers:
        if groups and groups[-1][0] == group and group:
            groups[-1] = (group, groups[-1][1] + 1)
        else:
            groups.append((group, 1))
    labels = "".join(f"<th class='label'>{escape(h)}</th>" for h in grid.label_headers)
    names = "".join(f"<th>{escape(name)}</th>" for _, name in grid.headers)
    head = f"<tr>{labels}{names}</tr>"
    if any(group for group, _ in grid.headers):
        spans = "".join(f"<th class='group' colspan='{n}'>{escape(g)}</th>" if g else "<th></th>" * n
                        for g, n in groups)
        head = f"<tr>{'<th></th>' * len(grid.label_headers)}{spans}</tr>{head}"
    rows = []
    for row in grid.rows:
        cells = "".join(f"<td class='best'>{escape(c)}</td>" if b else f"<td>{escape(c)}</td>"
                        for c, b in zip(row.cells, row.best, strict=True))
        label = "".join(f"<td class='label'>{escape(x)}</td>" for x in row.labels)
        rows.append(f"<tr>{label}{cells}</tr>")
    return (f"<div class='scroll'><table class='results'>{caption}<thead>{head}</thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _tables(grids: list[Grid]) -> str:
    """The laid-out results tables (see :func:`~polytask.report.console.layout`), captioned when several."""
    return "".join(_table(grid, len(grids) > 1) for grid in grids)


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    human = f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s" if minutes else ""
    return f"{seconds:.1f} s" + (f" ({human})" if human else "")


def _meta(summary: Mapping[str, Any], tasks: Iterable[str]) -> str:
    suite = summary.get("suite")
    versions = summary.get("versions")
    rows = [
        ("suite", suite.get("name") if isinstance(suite, Mapping) else None),
        ("tasks", ", ".join(tasks)),
        ("seed", summary.get("seed")),
        ("started", summary.get("started")),
        ("wall time", _duration(number(summary.get("wall_time_s")))),
        ("reference", summary.get("reference")),
        (
            "versions",
            " · ".join(f"{k} {v}" for k, v in versions.items()) if isinstance(versions, Mapping) else None,
        ),
    ]
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in rows if v not in (None, ""))
    return f"<dl class='meta'>{items}</dl>"


def _section(run_dir: Path, summary: Mapping[str, Any]) -> str:
    records, skipped = read_metrics(run_dir)
    model = tabulate_results(summary)
    run_id = str(summary.get("run_id") or Path(run_dir).name)
    reference = model.reference
    grids = layout(model, fits_page)
    where = "column" if len(grids) == 1 else "column of the summary and each row of the per-task metrics"
    how = (
        "<p class='note'><b>How to read this.</b> Test metrics are taken at each job's "
        "best-validation epoch (ringed in the curves); ↑ means higher is better, ↓ lower is better, "
        f"and the best value of each {where} is highlighted. "
    )
    if reference:
        how += (
            f"Δm% is the mean relative change of every task metric against <b>{escape(reference)}</b>, "
            "signed so that improvements count negative: below 0 is better than the reference on "
            "average, above 0 worse. "
        )
    if any(c.name == "mean rank" for c in model.columns):
        how += "Mean rank averages a method's rank over all task metrics (1 is best)."
    how += "</p>"
    notes = []
    if not records:
        notes.append("No metrics.jsonl records in this run, so there are no training curves.")
    if skipped:
        notes.append(f"{skipped} unreadable line(s) of metrics.jsonl were skipped.")
    return (
        f"<section class='run' id='{escape(run_id)}'>"
        f"<h1>{escape(run_id)}</h1>"
        f"<p class='subtitle'>polytask run report · {escape(Path(run_dir).name)}</p>"
        f"{_verdict(summary)}"
        f"{_meta(summary, task_metrics(summary))}"
        f"<h2>Results</h2>{_tables(grids)}{how}"
        f"{_pareto(summary, run_id)}{front_section(run_dir, summary)}"
        f"<h2>Training curves</h2>"
        + "".join(f"<p class='note'>{escape(n)}</p>" for n in notes)
        + (_charts(summary, records) if records else "")
        + "</section>"
    )


def _pareto(summary: Mapping[str, Any], run_id: str) -> str:
    """The run's Pareto section (:mod:`polytask.report.pareto`) when it has >= 2 tasks and >= 2 methods besides
    the single-task row; a note instead when the front cannot be drawn."""
    if not has_front(summary):
        return ""
    try:
        front = build_front([(run_id, summary)])
    except DataError as e:
        return f"<h2>Pareto front</h2><p class='note'>No Pareto front: {escape(str(e))}</p>"
    if len(front.labels) < 2:
        return ""
    return pareto_section(front)


def _verdict(summary: Mapping[str, Any]) -> str:
    """The advice of a grouping study (``flow: advise``), first thing on the page, with how it was reached."""
    v = summary.get("verdict")
    if not isinstance(v, Mapping):
        return ""
    aff = summary.get("affinity") or {}
    cost = number((aff.get("cost") or {}).get("wall_time_s"))
    how = (f"Affinity from <b>{escape(str(aff.get('estimator', '?')))}</b>"
           + (f" ({cost:.2g} s)" if cost is not None else "")
           + f"; the plan with the lowest total validation loss of {len(v.get('total_val_loss', {}))} trained plans "
           "(table below: test metrics, Δm% against independent models).")
    return f"<p class='verdict'><b>Verdict.</b> {escape(str(v.get('text', '')))}</p><p class='note'>{how}</p>"


def _summary_or_relations(run_dir: Path) -> dict[str, Any]:
    """The run's summary; a run with only relations results (relate, group) has none and gets ``{}``."""
    if not (run_dir / "summary.json").exists() and has_relations(run_dir):
        return {}
    return load_summary(run_dir)


def _relations_only(run_dir: Path) -> str:
    return (f"<section class='run'><h1>{escape(run_dir.name)}</h1>"
            "<p class='subtitle'>polytask task-relations report</p></section>")


def render_report(run_dirs: Sequence[Path]) -> str:
    """The report page of one or more run directories, one section per run, as an HTML string."""
    if not run_dirs:
        raise PolytaskError("the report needs at least one run directory")
    summaries = [(Path(d), _summary_or_relations(Path(d))) for d in run_dirs]
    ids = [str(s.get("run_id") or d.name) for d, s in summaries]
    version = next((s.get("polytask_version") for _, s in summaries if s.get("polytask_version")), "")
    body = "".join(continual_section(s) if s.get("kind") == "continual" else
                   (_section(d, s) if s.get("results") is not None else _relations_only(d)) + relations_section(d)
                   for d, s in summaries)
    return _page(f"polytask report · {', '.join(ids)}", body, version, [d.name for d, _ in summaries])


def _page(title: str, body: str, version: Any, sources: Sequence[str]) -> str:
    """The self-contained page around ``body``: inline CSS, a footer naming the version and the run directories."""
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{body}<footer>Generated by polytask {escape(str(version))} from "
        f"{escape(', '.join(sources))}.</footer></main></body></html>\n"
    )


def _run_names(summaries: Sequence[tuple[Path, Mapping[str, Any]]]) -> list[str]:
    """Each run's id (its directory's name without one), made unique with ``#2``, ``#3`` where repeated; with
    several runs, the prefix and suffix all ids share (cut at a ``-``, ``_`` or ``.``) are left out, so the labels of
    a study's runs (``study-adatt-s0``, ``study-cgc-s0``, ...) read ``adatt``, ``cgc``."""
    names: list[str] = []
    for d, s in summaries:
        base = str(s.get("run_id") or d.name)
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}#{n}"
        names.append(name)
    return _without_common_ends(names) if len(names) > 1 else names


def _without_common_ends(names: Sequence[str]) -> list[str]:
    """``names`` less their common prefix and suffix, each cut just after (before) a separator, where every name
    keeps at least one character and the results stay distinct."""
    seps = "-_."
    prefix = _common_start(names)
    cut = max((i + 1 for i, c in enumerate(prefix) if c in seps), default=0)
    suffix = _common_start([n[cut:][::-1] for n in names])[::-1]
    back = max((len(suffix) - i for i, c in enumerate(suffix) if c in seps), default=0)
    out = [n[cut:len(n) - back] for n in names]
    return out if all(out) and len(set(out)) == len(out) else list(names)


def _common_start(texts: Sequence[str]) -> str:
    """The characters every one of ``texts`` starts with."""
    first = min(texts, key=len)
    for i, c in enumerate(first):
        if any(t[i] != c for t in texts):
            return first[:i]
    return first


def render_front(run_dirs: Sequence[Path], normalise: bool | None = None) -> tuple[str, dict[str, Any]]:
    """The Pareto-front page over every method of ``run_dirs`` and its data (see
    :func:`~polytask.report.pareto.front_summary`); the runs must share their tasks."""
    if not run_dirs:
        raise PolytaskError("a Pareto front needs at least one run directory")
    summaries = [(Path(d), load_summary(Path(d))) for d in run_dirs]
    for d, s in summaries:
        if s.get("kind") == "continual":
            raise DataError(f"run {d.name!r} is a continual run (an accuracy matrix, not per-task results); "
                            "a Pareto front compares multi-task runs")
    names = _run_names(summaries)
    front = build_front([(n, s) for n, (_, s) in zip(names, summaries, strict=True)], normalise)
    data = front_summary(front)
    data["runs"] = {n: str(d) for n, (d, _) in zip(names, summaries, strict=True)}
    version = next((s.get("polytask_version") for _, s in summaries if s.get("polytask_version")), "")
    body = (f"<section class='run'><h1>{escape(', '.join(names))}</h1><p class='subtitle'>polytask Pareto front "
            f"over {len(names)} run(s)</p>{pareto_section(front)}</section>")
    return _page(f"polytask Pareto front · {', '.join(names)}", body, version, [d.name for d, _ in summaries]), data


def write_front(run_dirs: Sequence[Path], out: Path | None = None,
                normalise: bool | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the Pareto-front page of ``run_dirs`` atomically to ``out`` (default: first run's front.html);
    returns its path and the front's data."""
    page, data = render_front(run_dirs, normalise)
    target = Path(out) if out is not None else Path(run_dirs[0]) / "front.html"
    write_atomic(target, page)
    return target, data


def write_report(run_dirs: Sequence[Path], out: Path | None = None) -> Path:
    """Write the report of ``run_dirs`` atomically to ``out`` (default: first run's report.html)."""
    target = Path(out) if out is not None else Path(run_dirs[0]) / "report.html"
    write_atomic(target, render_report(run_dirs))
    return target


def write_atomic(target: Path, page: str) -> None:
    """Write ``page`` to ``target`` through a temporary beside it, fsynced and renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(page)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
