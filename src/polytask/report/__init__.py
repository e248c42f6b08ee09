"""Reports of finished runs: console tables, SVG charts and a self-contained HTML page.

The report only reads result files (``summary.json``, ``metrics.jsonl``); it never trains.
"""

from polytask.report.console import format_number, format_results, layout, results_tables, tabulate_results
from polytask.report.html import load_summary, read_metrics, render_report, write_report
from polytask.report.svg import line_chart

__all__ = [
    "format_number",
    "format_results",
    "layout",
    "line_chart",
    "load_summary",
    "read_metrics",
    "render_report",
    "results_tables",
    "tabulate_results",
    "write_report",
]
