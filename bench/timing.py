"""Side-by-side timing on a shared, noisy machine: the contenders take turns, and medians are compared."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(contenders: dict[str, Callable[[int], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call, ``repeats`` rounds; round r calls every contender once with r, in an
    order reversed every other round, so drifting load hits all of them alike."""
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            contenders[name](r)
            seconds[name].append(time.perf_counter() - started)
    return seconds


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def rounded(values: list[float], digits: int = 3) -> list[float]:
    return [round(v, digits) for v in values]
