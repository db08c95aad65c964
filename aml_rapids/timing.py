"""Wall time per named part, summed: where a stage's time goes, for its summary and the benchmarks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable


@contextlib.contextmanager
def span(totals: dict[str, float], part: str, sync: Callable[[], None] | None = None):
    """Add the wall seconds of the ``with`` block to ``totals[part]``. ``sync`` (e.g. waiting for a GPU stream)
    runs at both ends, so work queued on a device is counted in the part that queued it."""
    if sync:
        sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        if sync:
            sync()
        totals[part] = totals.get(part, 0.0) + time.perf_counter() - start
