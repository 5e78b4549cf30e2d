"""Progress of long commands: a bar on a terminal (rich), plain lines when output goes to a file or pipe."""
from __future__ import annotations

import sys


class Progress:
    """`line(text)` prints a line either way; `update(done)` moves the bar (terminal only)."""

    def __init__(self, description: str, total: float, stream=None):
        self.stream = stream or sys.stdout
        self.total = total
        self._bar = None
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TimeElapsedColumn

            self._bar = RichProgress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=Console(file=self.stream), transient=False)
            self._task = self._bar.add_task(description, total=total)
            self._bar.start()

    def line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def update(self, done: float, description: str | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=min(done, self.total),
                             **({"description": description} if description else {}))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
