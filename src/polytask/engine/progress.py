"""Progress display: a rich progress bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class Reporter:
    """Shows job progress; ``quiet`` silences it (library use, tests)."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.console = Console(file=self.stream)
        self._progress: Progress | None = None
        self._bar = None

    @property
    def interactive(self) -> bool:
        """Whether to draw a live progress bar: not quiet and writing to a terminal (else plain log lines)."""
        return not self.quiet and self.stream.isatty()

    def log(self, line: str) -> None:
        """Print one line (time-stamped when not interactive; above the bar when one is live)."""
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.console.print(line, highlight=False, markup=False)
        else:
            print(f"{time.strftime('%H:%M:%S')} {line}", file=self.stream, flush=True)

    def start(self, job: str, total: int, done: int = 0) -> None:
        """Begin showing job ``job`` of ``total`` steps, ``done`` of them already taken (a resumed job)."""
        if not self.interactive:
            self.log(f"[{job}] {'resuming at step ' + str(done) if done else 'starting'} ({total} steps)")
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), console=self.console, transient=True,
        )
        self._progress.start()
        self._bar = self._progress.add_task(job, total=total, completed=done)

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more steps of the current job."""
        if self._progress is not None:
            self._progress.advance(self._bar, n)

    def finish(self) -> None:
        """End the current job's progress bar (no-op when none is live)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
