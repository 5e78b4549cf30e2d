"""Progress of long commands: a bar on a terminal (rich), plain lines when output goes to a file or pipe."""
from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO):
    """Log to stderr: through rich on a terminal (a progress bar can then share it; returns its Console),
    as plain timestamped lines otherwise (returns None)."""
    if not sys.stderr.isatty():
        logging.basicConfig(level=level, format=LOG_FORMAT)
        return None
    from rich.console import Console
    from rich.logging import RichHandler

    console = Console(file=sys.stderr)
    logging.basicConfig(level=level, format="%(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[RichHandler(console=console, show_path=False)])
    return console


class Progress:
    """`line(text)` prints a line either way; `update(done)` moves the bar (terminal only)."""

    def __init__(self, description: str, total: float, stream=None, console=None):
        """`console`: a rich Console to share (e.g. the one logging writes through); implies a terminal."""
        self.stream = stream or (console.file if console is not None else sys.stdout)
        self.total = total
        self._bar = None
        if console is not None or self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TimeElapsedColumn

            self._bar = RichProgress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=console or Console(file=self.stream),
                                     transient=False)
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
