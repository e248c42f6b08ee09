"""The continual section of the report: per strategy, the mean accuracy matrix as a heatmap (rows: after training
on experience i; columns: tested on experience j), the metrics table, and each experience's accuracy over the
stream as curves. Reads ``summary.json`` only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

import numpy as np

from polytask.report.svg import line_chart

_METRICS = (("average_accuracy", "avg acc"), ("bwt", "BWT"), ("fwt", "FWT"), ("forgetting", "forgetting"),
            ("intransigence", "intransigence"))


def _mean(results: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.mean([np.asarray(r[key], dtype=np.float64) for r in results], axis=0)


def metric_rows(summary: Mapping[str, Any]) -> list[tuple[str, dict[str, tuple[float, float | None] | None], float,
                                                           int]]:
    """Per strategy label: each metric's mean and std over seeds (std None for one seed; None where undefined), the
    mean wall time and the mean size of the strategy's memory (numbers: its state plus what it added to the model)."""
    rows = []
    for label, results in summary["results"].items():
        stats: dict[str, tuple[float, float | None] | None] = {}
        for key, _ in _METRICS:
            vals = [r["metrics"][key] for r in results if r["metrics"].get(key) is not None]
            stats[key] = None if not vals else (float(np.mean(vals)), float(np.std(vals)) if len(vals) > 1 else None)
        rows.append((label, stats, float(np.mean([r["wall_time_s"] for r in results])),
                     int(np.mean([r["state_numel"] + r.get("added_numel", 0) for r in results]))))
    return rows


def _pm(mean: float, std: float | None) -> str:
    return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def format_continual_table(summary: Mapping[str, Any]) -> str:
    """The metrics of every strategy as a plain-text table (what the CLI prints)."""
    header = ["strategy", *(n for _, n in _METRICS), "time (s)", "memory"]
    lines = [[label, *("-" if stats[k] is None else _pm(*stats[k]) for k, _ in _METRICS), f"{seconds:.1f}",
              str(numel)] for label, stats, seconds, numel in metric_rows(summary)]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    stream = summary.get("stream") or {}
    title = (f"{stream.get('name', '')} ({stream.get('scenario', '')}-incremental, "
             f"{len(stream.get('experiences', []))} experiences)")
    return "\n".join([title, *("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                                          enumerate(zip(row, widths, strict=True))) for row in [header, *lines])])


def accuracy_heatmap(r: np.ndarray, labels: Sequence[str], title: str, cell: int = 46) -> str:
    """An inline ``<svg>`` of the matrix ``r`` (values in [0, 1]): white to green, the value in each cell."""
    rows, cols = r.shape
    left, top = 64, 56
    w, h = left + cols * cell + 12, top + rows * cell + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
             f'font-family="system-ui, sans-serif" font-size="11" role="img" aria-label="{escape(title)}">',
             f'<text x="{left}" y="16" font-size="13" font-weight="600">{escape(title)}</text>',
             f'<text x="{left}" y="34" fill="#59636e">tested on</text>']
    for j, name in enumerate(labels[:cols]):
        parts.append(f'<text x="{left + j * cell + cell / 2}" y="{top - 4}" text-anchor="middle">{escape(name)}'
                     "</text>")
    for i in range(rows):
        row_label = "all" if rows == 1 and cols > 1 else labels[i]
        parts.append(f'<text x="{left - 6}" y="{top + i * cell + cell / 2 + 4}" text-anchor="end">after '
                     f"{escape(row_label)}</text>")
        for j in range(cols):
            v = float(np.clip(r[i, j], 0, 1))
            g = (int(255 - 180 * v), int(255 - 90 * v), int(255 - 170 * v))
            ink = "#fff" if v > 0.6 else "#1f2328"
            x, y = left + j * cell, top + i * cell
            parts.append(f'<rect x="{x}" y="{y}" width="{cell - 2}" height="{cell - 2}" '
                         f'fill="rgb{g}"><title>{r[i, j]:.4f}</title></rect>'
                         f'<text x="{x + cell / 2 - 1}" y="{y + cell / 2 + 4}" text-anchor="middle" '
                         f'fill="{ink}">{r[i, j]:.2f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def continual_section(summary: Mapping[str, Any]) -> str:
    """The HTML of a continual run: metrics table (mean ± std over seeds), heatmaps and accuracy curves."""
    stream = summary.get("stream") or {}
    names = [e["name"] for e in stream.get("experiences", [])]
    by_label: Mapping[str, Sequence[Mapping[str, Any]]] = summary["results"]
    head = "".join(f"<th>{escape(n)}</th>" for _, n in _METRICS)
    body = []
    for label, stats, seconds, numel in metric_rows(summary):
        cells = "".join("<td>–</td>" if stats[key] is None else f"<td>{_pm(*stats[key])}</td>" for key, _ in _METRICS)
        body.append(f"<tr><td class='label'>{escape(label)}</td>{cells}<td>{seconds:.1f}</td><td>{numel}</td></tr>")
    seeds = sorted({r["seed"] for results in by_label.values() for r in results})
    figures = []
    for label, results in by_label.items():
        r = _mean(results, "accuracy")
        figures.append(f"<figure>{accuracy_heatmap(r, names, f'{label}: accuracy matrix')}</figure>")
        if r.shape[0] > 1:
            curves = {names[j]: [(i + 1, float(r[i, j])) for i in range(r.shape[0])] for j in range(r.shape[1])}
            figures.append("<figure>" + line_chart(curves, f"{label}: accuracy of each experience over the stream",
                                                   "experiences trained", "accuracy") + "</figure>")
    return (f"<section class='run'><h1>{escape(str(summary.get('run_id', 'continual run')))}</h1>"
            f"<p class='subtitle'>continual learning on {escape(str(stream.get('name', '')))} "
            f"({escape(str(stream.get('scenario', '')))}-incremental, {len(names)} experiences, "
            f"seeds {', '.join(map(str, seeds))})</p>"
            "<div class='scroll'><table class='results'><thead><tr><th class='label'>strategy</th>"
            f"{head}<th>time (s)</th><th>memory (numbers)</th></tr></thead><tbody>{''.join(body)}</tbody></table></div>"
            f"<p class='note'>Score: {escape(str(summary.get('score', 'accuracy')))}. BWT and FWT after "
            "Lopez-Paz &amp; Ranzato (2017); forgetting and intransigence after Chaudhry et al. (2018), "
            "intransigence against the cumulative strategy of the same seed. Mean ± std over seeds.</p>"
            f"<h2>Accuracy matrices</h2><div class='charts'>{''.join(figures)}</div></section>")
