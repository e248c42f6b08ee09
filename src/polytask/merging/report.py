"""Tables of a merging experiment: console text and one self-contained HTML page (no scripts, no URLs)."""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any

_CSS = """
body { margin: 0; color: #1f2328; font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; }
p.note { color: #59636e; max-width: 90ch; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin-top: 12px; }
th, td { padding: 6px 12px; text-align: right; white-space: nowrap; border-bottom: 1px solid #d8dee4; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f6f8fa; }
td.best { background: #dafbe1; font-weight: 600; }
td.ref { color: #59636e; }
"""

REFERENCE_ROWS = ("finetuned", "pretrained")


def table_rows(summary: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: method, per-task score, per-task normalised score, means."""
    tasks = [t["name"] for t in summary["tasks"]]
    metric = {t["name"]: t["metric"] for t in summary["tasks"]}
    head = ["method", *[f"{t} {metric[t]}" for t in tasks], *[f"{t} norm." for t in tasks], "mean", "mean norm."]
    rows = []
    for label, r in summary["results"].items():
        rows.append([label, *[r["tasks"][t][metric[t]] for t in tasks], *[r["normalized"][t] for t in tasks],
                     r["mean"], r["mean_normalized"]])
    return head, rows


def format_merge_table(summary: Mapping[str, Any]) -> str:
    """The experiment's table as plain text (one row per method)."""
    head, rows = table_rows(summary)
    cells = [head] + [[r[0], *[f"{v:.4f}" for v in r[1:]]] for r in rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(head))]
    return "\n".join("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in
                               enumerate(zip(row, widths, strict=True))) for row in cells)


def render_merge_report(summary: Mapping[str, Any]) -> str:
    """One HTML page: per-method scores and normalised scores per task; best merged value per column marked."""
    head, rows = table_rows(summary)
    merged = [r for r in rows if r[0] not in REFERENCE_ROWS]
    best = {i: max(r[i] for r in merged) for i in range(1, len(head))} if merged else {}
    body = []
    for r in rows:
        ref = r[0] in REFERENCE_ROWS
        cells = [f"<td>{escape(str(r[0]))}</td>"]
        for i, v in enumerate(r[1:], start=1):
            cls = "ref" if ref else ("best" if v == best.get(i) else "")
            cells.append(f'<td class="{cls}">{v:.4f}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    params = "".join(f"<li><b>{escape(k)}</b>: {escape(str(r.get('method')))} {escape(str(r.get('params')))}</li>"
                     for k, r in summary["results"].items() if k not in REFERENCE_ROWS)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>polytask merge: {escape(str(summary.get('suite')))}</title>
<style>{_CSS}</style></head><body><main>
<h1>Model merging on {escape(str(summary.get('suite')))}</h1>
<p class="note">Tasks: {escape(', '.join(t['name'] for t in summary['tasks']))}; backbone pretrained on
{escape(', '.join(summary.get('pretrain_tasks', [])))}. Test scores of the merged encoder with each task's own head;
"norm." divides by the individually fine-tuned model's score (finetuned = 1). Best merged value per column in green.</p>
<table><thead><tr>{''.join(f'<th>{escape(h)}</th>' for h in head)}</tr></thead>
<tbody>{''.join(body)}</tbody></table>
<h2 style="font-size:16px;margin-top:28px">Parameters used</h2><ul>{params}</ul>
<p class="note">polytask {escape(str(summary.get('polytask_version')))}, seed {escape(str(summary.get('seed')))},
wall time {summary.get('wall_time_s', 0):.1f} s.</p>
</main></body></html>
"""
