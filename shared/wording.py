"""Words in user-facing messages: ``counted(1, "block")`` is "1 block", ``counted(2, "block")`` "2 blocks";
``shown(None)`` is "none", never "None"."""

from __future__ import annotations


def counted(count: int, noun: str, plural: str = "") -> str:
    """``count`` and ``noun``, in the plural (``plural``, else ``noun + "s"``) unless ``count`` is 1."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def shown(value: object) -> str:
    """A setting's value in a message: ``'jpeg:50'`` (its repr); ``none`` for one that is not set or not recorded."""
    return "none" if value is None else repr(value)
