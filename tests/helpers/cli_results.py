"""Results of the ``lare2`` command run in-process, and the one ``error:`` line a refusal prints."""

from __future__ import annotations

from typer.testing import CliRunner, Result

from lare2.cli import app

runner = CliRunner()


def invoke(*args) -> Result:
    """``lare2 ARGS`` (each one ``str()``-ed) in-process; any exception but the exit fails the test."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def error_line(result: Result) -> str:
    """The one ``error:`` line on stderr; no traceback anywhere in the output."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]
