"""The merge report stays readable with many tasks and methods: every table fits the page and the console."""

from html.parser import HTMLParser

from polytask.report.html import _CELL_PAD_PX, _CHAR_PX, _PAGE_PX
from polytask.report.merge import format_merge_table, render_merge_report

METHODS = ("average", "task_arithmetic", "ties", "dare", "dare_ties", "breadcrumbs", "metagpt", "lwptv", "fisher",
           "regmean", "adamerging", "divmerge")


def _summary(n_tasks=11):
    tasks = [{"name": f"attribute_{i}", "metric": "accuracy" if i % 3 else "mse", "higher_is_better": bool(i % 3)}
             for i in range(n_tasks)]
    results = {}
    for j, m in enumerate(("finetuned", "pretrained", *METHODS)):
        scores = {t["name"]: {t["metric"]: 0.9 - 0.02 * j if t["higher_is_better"] else 5.29e6 * (1 + 0.1 * j)}
                  for t in tasks}
        results[m] = {"method": m, "params": {}, "tasks": scores, "seconds": 0.1 * j, "mean": 0.5,
                      "normalized": {t["name"]: 1 - 0.03 * j for t in tasks}, "mean_normalized": 1 - 0.03 * j}
    return {"polytask_version": "test", "suite": "digit-attributes", "tasks": tasks, "seed": 0,
            "pretrain_tasks": [t["name"] for t in tasks], "results": results, "wall_time_s": 1.0}


class _Tables(HTMLParser):
    """The text of every cell of every table, by table and column."""

    def __init__(self):
        super().__init__()
        self.tables, self._cell, self._col = [], None, 0

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append({})
        elif tag == "tr":
            self._col = 0
        elif tag in ("td", "th") and self.tables:
            span = int(dict(attrs).get("colspan", 1))
            self._cell = (self._col, span)
            self._col += span

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None and self._cell[1] == 1:
            col = self.tables[-1].setdefault(self._cell[0], [])
            col.append(data.strip())


def test_every_merge_report_table_fits_a_1400_px_page_with_every_column():
    html = render_merge_report(_summary())
    parser = _Tables()
    parser.feed(html)
    assert parser.tables
    for table in parser.tables:  # the page's content box at 1400 px; same width estimate as the run report's
        width = sum(max(len(t) for t in texts) * _CHAR_PX + _CELL_PAD_PX for texts in table.values())
        assert width <= _PAGE_PX, width
    for name in ("attribute_10", "divmerge", "mean norm.", "time (s)"):  # nothing cut off: the last task, method
        assert name in html


def test_the_console_table_fits_120_columns_and_shows_every_value():
    text = format_merge_table(_summary())
    assert max(len(line) for line in text.splitlines()) <= 120
    for name in ("attribute_10", "divmerge", "mean norm.", "5.290e6"):
        assert name in text
    assert "…" not in text  # no cell is cut
