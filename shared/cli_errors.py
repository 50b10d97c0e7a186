"""One command-line grammar for every ``lare2`` command: exit codes and how user errors are shown.

Exit codes
    0  success
    1  the command ran and found problems (``cache verify`` findings, ``cache diff`` differences,
       ``score`` error rows)
    2  bad usage or bad input: ONE line ``error: <message>`` on stderr naming the file or value and
       the remedy (typer's own usage box for bad options), never a traceback
    3  ``lare2 train`` stopped early on purpose (the hidden ``--stop-after-steps``)

``user_errors()`` is a context manager and a decorator: the exceptions that mean "bad input" become
that line and exit 2. They are recognised by class name (``CacheError``, ``ManifestError``,
``SettingsError``, ``ModelSourceError``, ``CheckpointError``, ...) plus ``FileNotFoundError``,
``FileExistsError``, ``NotADirectoryError``, ``IsADirectoryError`` and ``ValueError``, so this module
imports neither torch nor any stage: ``lare2 --help`` stays fast and ``lare2 train`` never loads
diffusers. Set ``LARE2_TRACEBACK=1`` to see the traceback anyway.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, NoReturn

import typer

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3

# lare2 exception classes that always mean bad input (matched by name: importing them would load torch)
USER_ERROR_NAMES = frozenset({"CacheError", "CacheExistsError", "ManifestError", "SettingsError", "ModelSourceError",
                              "ModelNotFoundError", "CheckpointError", "ImageError"})
EXTRA_OF_PACKAGE = {"diffusers": "extract", "transformers": "extract", "skimage": "demo"}
"""Packages of the optional installs (pyproject.toml extras): a missing one is a usage error that names the extra."""
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (FileNotFoundError, FileExistsError, NotADirectoryError,
                                                      IsADirectoryError, ValueError)


def is_user_error(err: BaseException, extra: tuple[type[BaseException], ...] = ()) -> bool:
    if isinstance(err, USER_ERROR_TYPES + extra):
        return True
    return any(cls.__name__ in USER_ERROR_NAMES and cls.__module__.startswith("lare2.") for cls in type(err).__mro__)


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
def user_errors(*extra: type[BaseException]) -> Iterator[None]:
    """Bad input (a missing or wrong file, a bad setting, an incompatible run/cache) -> ``error: ...`` + exit 2.

    ``extra``: more exception types that mean bad input in this command (e.g. ``KeyError`` for an
    unknown sample id). Anything else propagates with its traceback: that is a bug."""
    try:
        yield
    except ModuleNotFoundError as err:  # a stage's extra not installed: say which
        extra_name = EXTRA_OF_PACKAGE.get((err.name or "").split(".")[0])
        if extra_name is None or os.environ.get("LARE2_TRACEBACK"):
            raise
        fail(f"this command needs {err.name}, which is not installed: pip install 'lare2[{extra_name}]'")
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a user error
        if not is_user_error(err, extra) or os.environ.get("LARE2_TRACEBACK"):
            raise
        fail(one_line(err))


def check_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU else ``cpu``; ``cuda`` without one -> exit 2 (imports torch)."""
    from lare2.shared.devices import resolve_device

    with user_errors():
        return resolve_device(device).type
