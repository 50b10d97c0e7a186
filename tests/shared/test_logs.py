"""Log lines: piped or written to a file, each record is one whole line (never wrapped at 80 columns, never
padded), so that ``grep`` finds a message; on a terminal rich's columns stay."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.bad_images import good_rgb


def test_a_long_log_line_is_not_broken_through_a_pipe(tmp_path: Path) -> None:
    src = tmp_path / ("a-folder-with-a-name-long-enough-to-push-the-line-past-eighty-columns" * 2)
    for k, label in enumerate(("0_real", "1_fake")):
        (src / "train" / label).mkdir(parents=True)
        for i in range(2):
            (src / "train" / label / f"{label}-{i}.png").write_bytes(good_rgb(seed=10 * k + i, size=(16, 16)))
    out = tmp_path / "manifest.parquet"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # rich's width when not a tty: 80
    lare2 = Path(sys.executable).with_name("lare2")
    done = subprocess.run([str(lare2), "manifest", "build", "folders", str(src), "-o", str(out)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    message = f"{out}: 4 rows (0 with errors) under {src}"
    assert len(message) > 200
    (line,) = [line for line in done.stderr.splitlines() if message in line]
    assert line.endswith(message) and " INFO " in line  # "2026-12-05 05:44:38 INFO     <message>", whole


def test_records_are_plain_lines_off_a_terminal_and_rich_columns_on_one() -> None:
    from rich.console import Console

    from lare2.shared.logs import LogHandler

    record = logging.LogRecord("lare2.x", logging.WARNING, __file__, 1, "w" * 150 + " the end", None, None)
    piped = io.StringIO()
    LogHandler(console=Console(file=piped, width=80), show_path=False).emit(record)
    assert piped.getvalue().count("\n") == 1 and piped.getvalue().rstrip("\n").endswith(" the end")
    assert " WARNING  " + "w" * 150 in piped.getvalue()
    terminal = io.StringIO()
    LogHandler(console=Console(file=terminal, width=80, force_terminal=True), show_path=False).emit(record)
    assert terminal.getvalue().count("\n") > 1  # wrapped into rich's message column


def test_tables_are_not_folded_through_a_pipe(tmp_path: Path) -> None:
    """Off a terminal a table is as wide as its cells need: a long path stays on one line, on stderr (the build's
    duplicates) as on stdout (``manifest show``)."""
    src = tmp_path / ("a-folder-with-a-name-long-enough-to-push-a-table-cell-past-eighty-columns" * 2)
    for k, label in enumerate(("0_real", "1_fake")):
        (src / "train" / label).mkdir(parents=True)
        for i in range(2):
            (src / "train" / label / f"{label}-{i}.png").write_bytes(good_rgb(seed=10 * k + i, size=(16, 16)))
    copy = "train/0_real/" + "a-copy-with-a-name-long-enough-to-fold" * 3 + ".png"
    (src / copy).write_bytes((src / "train" / "0_real" / "0_real-0.png").read_bytes())
    out = tmp_path / "manifest.parquet"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # rich's width when not a tty: 80
    lare2 = str(Path(sys.executable).with_name("lare2"))
    built = subprocess.run([lare2, "manifest", "build", "folders", str(src), "-o", str(out)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert "occur more than once" in built.stderr, built.stderr
    assert sum(copy in line for line in built.stderr.splitlines()) == 2, built.stderr  # in copies, in dropped
    shown = subprocess.run([lare2, "manifest", "show", str(out)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert any(line.strip() == f"root: {src}" for line in shown.stdout.splitlines()), shown.stdout
    assert len(str(src)) > 150
