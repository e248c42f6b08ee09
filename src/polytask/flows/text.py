"""What the CLI prints and writes of a flow's results: the report's renderers, reached through the flows floor
(the report only reads result files)."""

from polytask.report.console import format_results
from polytask.report.continual import format_continual_table
from polytask.report.html import write_report
from polytask.report.merge import format_merge_table
from polytask.report.relations import networks_text

__all__ = ["format_continual_table", "format_merge_table", "format_results", "networks_text", "write_report"]
