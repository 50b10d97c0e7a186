"""Counts in user-facing messages: ``counted(1, "block")`` is "1 block", ``counted(2, "block")`` "2 blocks"."""

from __future__ import annotations


def counted(count: int, noun: str, plural: str = "") -> str:
    """``count`` and ``noun``, in the plural (``plural``, else ``noun + "s"``) unless ``count`` is 1."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
