"""The cache's exceptions, in a module of their own so that raisers import no store or verifier."""

from __future__ import annotations

from lare2.shared.errors import UserError


class CacheError(UserError, RuntimeError):
    """A cache that cannot be created, opened or appended to; the message says why."""


class CacheExistsError(CacheError):
    """Creation found a cache already there (possibly made by a concurrent job a moment ago)."""


class RecomputeUnavailable(RuntimeError):
    """Raised by a recompute function when the extractor, the models or the device are not at hand."""
