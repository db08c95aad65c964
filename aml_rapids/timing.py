"""Wall time per named part, summed: where a stage's time goes, for its summary and the benchmarks."""

from __future__ import annotations

import contextlib
import time


@contextlib.contextmanager
def span(totals: dict[str, float], part: str):
    """Add the wall seconds of the ``with`` block to ``totals[part]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        totals[part] = totals.get(part, 0.0) + time.perf_counter() - start
