"""Summary figures the benches print."""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def median_p90(values: Iterable[float]) -> tuple[float, float]:
    """The median and the 90th percentile (the nearest rank above it) of *values*."""
    ordered = sorted(values)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.9)]
