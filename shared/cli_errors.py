"""One command-line grammar for every ``lare2`` command: exit codes and how user errors are shown.

Exit codes
    0  success
    1  the command ran and found problems (``cache verify`` findings, ``cache diff`` differences,
       ``score`` error rows)
    2  bad usage or bad input: ONE line ``error: <message>`` on stderr naming the file or value and
       the remedy, never a traceback; parser errors (an unknown option, a value out of range, a
       missing argument) too
    3  ``lare2 train`` stopped early on purpose (the hidden ``--stop-after-steps``)
    75 ``lare2 extract`` stopped by SIGTERM or SIGUSR1 (a scheduler's cancel, pre-emption or time limit)
       after writing every block it had finished: nothing is wrong, rerun or requeue the same command
       and it resumes. 75 is sysexits' ``EX_TEMPFAIL`` ("try again later"), and unlike 143 (128 +
       SIGTERM, what a shell reports for a process the signal killed) it says the stop was clean
   130 interrupted (Ctrl-C): one ``error:`` line says what was kept and how to resume (``interrupted``)

``user_errors()`` is a context manager and a decorator: the exceptions that mean "bad input" become
that line and exit 2. They are matched by type: the project's own ``UserError`` and its domain
subclasses (``lare2.shared.errors``, torch-free), plus ``FileNotFoundError``, ``FileExistsError``,
``NotADirectoryError`` and ``IsADirectoryError`` for files a user names. Anything else, a plain
``ValueError`` from numpy or torch included, is a bug and keeps its traceback. Set
``LARE2_TRACEBACK=1`` to see the traceback of a user error too.

Every CLI module has ``register(app)`` (adds its commands) and ``main(argv) -> int`` (runs them
without the console script, through :func:`run_commands`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import typer
from typer.core import TyperGroup

from lare2.shared.errors import UserError

EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3
EXIT_INTERRUPTED = 130
"""128 + SIGINT, as shells report a command stopped by Ctrl-C."""
EXIT_PREEMPTED = 75

EXTRA_OF_PACKAGE = {"diffusers": "extract", "transformers": "extract", "skimage": "demo", "fastapi": "serve",
                    "uvicorn": "serve", "multipart": "serve", "prometheus_client": "serve"}
"""Packages of the optional installs (pyproject.toml extras): a missing one is a usage error that names the extra."""
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, FileExistsError,
                                                      NotADirectoryError, IsADirectoryError)
ParserError: type[Exception] = typer.BadParameter.__mro__[1]
"""click's ``UsageError``, from the click that typer uses (recent typers carry their own copy)."""


def one_line(err: BaseException) -> str:
    """The error as one line: OS errors as ``path: reason``, KeyError without its quotes."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    elif isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: message`` (one line, stderr) and exit with ``code``."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Bad input (a missing or wrong file, a bad setting, an incompatible run/cache) -> ``error: ...`` + exit 2.

    Anything that is not a user error propagates with its traceback: that is a bug."""
    try:
        yield
    except ModuleNotFoundError as err:  # a stage's extra not installed: say which
        extra_name = EXTRA_OF_PACKAGE.get((err.name or "").split(".")[0])
        if extra_name is None or os.environ.get("LARE2_TRACEBACK"):
            raise
        fail(f"this command needs {err.name}, which is not installed: pip install 'lare2[{extra_name}]'")
    except USER_ERROR_TYPES as err:
        if os.environ.get("LARE2_TRACEBACK"):
            raise
        fail(one_line(err))


def check_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU else ``cpu``; ``cuda`` without one -> exit 2 (imports torch)."""
    from lare2.shared.devices import resolve_device

    with user_errors():
        return resolve_device(device).type


def check_out_folder(path: str | Path, option: str, what: str) -> None:
    """Exit 2 when ``path``, the folder ``option`` names for ``what``, is a file or lies under one (before any work,
    so that the refusal names the option instead of saying only "File exists" or "Not a directory")."""
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists()), path)
    if blocker.is_dir() or not blocker.exists():
        return
    where = "a file" if blocker == path else f"under {blocker}, which is a file"
    fail(f"{option} {path}: {where}, not a folder; {what} needs a folder: choose another {option}")


@contextlib.contextmanager
def interrupted(what: str, kept: Callable[[], str]) -> Iterator[None]:
    """Ctrl-C -> ``error: <what>: interrupted (Ctrl-C); <kept()>`` and exit 130: what was kept, how to resume."""
    try:
        yield
    except KeyboardInterrupt:
        fail(f"{what}: interrupted (Ctrl-C); {kept()}", EXIT_INTERRUPTED)


# ---- parser errors ------------------------------------------------------------------------------
def usage_message(err: Exception, command: str) -> str:
    """click's complaint as ``<command>: <reason>; see '<command> --help'`` (one line); ``command``
    when click did not say which (it leaves some option errors without their context)."""
    if getattr(err, "ctx", None) is not None:
        command = err.ctx.command_path
    return f"{command}: {err.format_message().rstrip('.')}; see '{command} --help'"


@contextlib.contextmanager
def usage_in_one_line(command: str) -> Iterator[None]:
    """A parser error (unknown option, value out of range, missing argument) -> one ``error:`` line + exit 2.

    ``NoArgsIsHelpError`` passes: it is how a bare group shows its help."""
    try:
        yield
    except ParserError as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # as typer tells it apart, without importing it
            raise
        fail(usage_message(err, command), err.exit_code)


class OneLineUsageGroup(TyperGroup):
    """The root command group: parser errors of every command below it come out in the one-line form.

    Subcommands are parsed inside the root's ``invoke``, so wrapping it (and the root's own parsing)
    covers every nested command; ``--help`` is untouched."""

    def make_context(self, info_name: str | None, args: list[str], parent: typer.Context | None = None,
                     **extra: Any) -> typer.Context:
        with usage_in_one_line(info_name or self.name or "lare2"):
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: typer.Context) -> Any:
        # a command that says what it keeps on Ctrl-C (``interrupted``) has exited already; the others, here
        command = " ".join(filter(None, (ctx.command_path, ctx.invoked_subcommand)))
        with usage_in_one_line(ctx.command_path), interrupted(command, lambda: "what it wrote before stays as it is; "
                                                              "rerun it to finish"):
            return super().invoke(ctx)


def run_commands(register: Callable[[typer.Typer], None], argv: list[str] | None, prog_name: str = "lare2") -> int:
    """Run the commands ``register`` adds, with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    A module that registers one command runs it directly (``python -m lare2.extract --manifest ...``);
    several are subcommands (``main(["train", ...])``)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False, no_args_is_help=True)
    register(app)
    return run_app(app, argv, prog_name)


def run_app(app: typer.Typer, argv: list[str] | None, prog_name: str = "lare2") -> int:
    """``app`` with ``argv``: the exit code, as the console script would exit; a bug's exception propagates."""
    try:
        with usage_in_one_line(prog_name):
            code = typer.main.get_command(app).main(args=argv, prog_name=prog_name, standalone_mode=False)
    except ParserError as err:  # a bare group: its help is already printed
        return err.exit_code
    except typer.Exit as err:  # from fail(): the line is printed
        return err.exit_code
    return int(code or 0)
