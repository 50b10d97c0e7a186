"""Logging and progress: rank-aware logger, rich progress bars with rate and ETA; the console for tables."""

from __future__ import annotations

import logging
import os
import time

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
"""The log's console (stderr): log records and progress bars."""
UNFOLDED_WIDTH = 100_000
"""Columns of a table console off a terminal: wider than any table, which is only as wide as its cells need."""


def output_console(stderr: bool = False) -> Console:
    """The console for a command's tables and report lines, on stdout (or stderr, beside the log): as wide as the
    terminal on one; piped or redirected, as wide as each table needs, so that no cell folds onto a second line
    (rich would fold at 80 columns) and ``grep`` or ``cut`` see whole rows."""
    terminal = Console(stderr=stderr)
    return terminal if terminal.is_terminal else Console(stderr=stderr, width=UNFOLDED_WIDTH)


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


class LogHandler(RichHandler):
    """rich's columns on a terminal; anywhere else (a pipe, a log file, CI) one plain line per record,
    ``2026-12-05 05:44:38 INFO     message``, never wrapped at the console's width nor padded to it, so
    that ``grep`` finds a whole message. Decided per record: ``console`` follows ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        if self.console.is_terminal:
            super().emit(record)
            return
        try:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
            self.console.file.write(f"{stamp} {record.levelname:<8} {self.format(record)}\n")
            self.console.file.flush()
        except Exception:  # noqa: BLE001 - logging's contract: a failing handler reports, never raises
            self.handleError(record)


def get_logger(name: str) -> logging.Logger:
    """A logger that prints through rich once per process, tagged with the rank when >1 process."""
    root = logging.getLogger("lare2")
    if not root.handlers:
        handler = LogHandler(console=console, show_path=False, rich_tracebacks=False)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        prefix = f"[rank {_rank()}] " if world > 1 else ""
        handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("LARE2_LOG_LEVEL", "INFO"))
        root.propagate = False
    return logging.getLogger(name if name.startswith("lare2") else f"lare2.{name}")


def progress_bar(unit: str = "img", disable: bool = False) -> Progress:
    """A progress bar showing done/total, rate (``unit``/s), elapsed and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=False,
    )


def rate_text(done: int, seconds: float, unit: str = "img") -> str:
    return f"{done / seconds:.1f} {unit}/s" if seconds > 0 else f"- {unit}/s"
