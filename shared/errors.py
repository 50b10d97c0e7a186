"""The project's own exception types for input a user can fix (torch-free, imported everywhere).

The CLI shows an instance of ``UserError`` (or of a subclass) as one line ``error: <message>`` and
exits 2 (``lare2.shared.cli_errors``). Anything else, a plain ``ValueError`` from numpy or torch
included, is a bug and keeps its traceback. Each domain module defines its own subclass next to
the code that raises it (``CacheError``, ``ManifestError``, ``SettingsError``, ``ImageError``,
``ModelSourceError``, ``CheckpointError``, ...); the ones below serve every module.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a wrong file, value, setting or combination of options; the message names it and the remedy."""


class InputError(UserError, ValueError):
    """A value the user gave (an option, an argument, a field) that cannot be used."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""
