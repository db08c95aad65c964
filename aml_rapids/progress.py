"""Progress of long work: a rich bar (rate, time left) on a terminal; elsewhere (SLURM, nohup, a pipe, the log
file) plain lines at a steady interval, so a batch job's log shows how far it got and how fast."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from datetime import timedelta

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .logs import NORMAL, console, console_handler, log

INTERVAL_ENV = "AML_RAPIDS_PROGRESS_SECONDS"  # seconds between plain progress lines
DEFAULT_INTERVAL = 30.0


def rate_text(rate: float, unit: str) -> str:
    """``1,234 img/s``; below 10 a second, two significant digits (occlusion does 0.38 cells/s on a CPU)."""
    return f"{rate:,.0f} {unit}/s" if rate >= 10 else f"{rate:.2g} {unit}/s"


class _Rate(TextColumn):
    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):
        speed = task.finished_speed or task.speed
        return rate_text(speed, self.unit) if speed else ""


def _interval() -> float:
    """Seconds between plain lines: AML_RAPIDS_PROGRESS_SECONDS (0: a line per update), else 30."""
    value = os.environ.get(INTERVAL_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_INTERVAL
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # negative, NaN or not a number
        log.warning(f"{INTERVAL_ENV}={value!r} is not a number of seconds >= 0; using {DEFAULT_INTERVAL:g}")
        return DEFAULT_INTERVAL
    return seconds


class _Lines:
    """Counts work done and logs one plain line per interval (and one at the end)."""

    def __init__(self, description: str, total: int | None, unit: str):
        self.description, self.total, self.unit = description, total, unit
        self.done, self.start, self.interval = 0, time.monotonic(), _interval()
        self.last = self.start

    def advance(self, n: int = 1) -> None:
        now = time.monotonic()
        if not self.done:  # the first item's arrival starts the clock: start-up is not part of the rate
            self.start = self.last = now
        self.done += n
        if now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def _line(self, now: float, final: bool = False) -> None:
        seconds = now - self.start
        rate = self.done / seconds if seconds > 0 else 0.0
        parts = [f"{self.done:,}" + (f"/{self.total:,} {self.unit} ({self.done / self.total:.0%})"
                                     if self.total else f" {self.unit}"), rate_text(rate, self.unit)]
        if final:
            parts.append(f"done in {timedelta(seconds=round(seconds))}")
        elif self.total and rate > 0:
            parts.append(f"ETA {timedelta(seconds=round((self.total - self.done) / rate))}")
        log.info(f"{self.description}: {', '.join(parts)}", extra={"progress": True})

    def finish(self) -> None:
        if self.done:
            self._line(time.monotonic(), final=True)


@contextmanager
def progress_bar(description: str, total: int | None = None, unit: str = "img"):
    """Yield ``(advance, set_total)`` callables; a bar on a terminal, plain lines in every log."""
    handler = console_handler()
    show_bar = console.is_terminal and handler is not None and handler.level <= NORMAL
    lines = _Lines(description, total, unit)
    columns = [TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
               _Rate(unit), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, disable=not show_bar) as bar:
        task = bar.add_task(description, total=total)
        if handler is not None:
            handler.bar_shown = show_bar

        def advance(n: int = 1) -> None:
            bar.advance(task, n)
            lines.advance(n)

        def set_total(n: int) -> None:
            bar.update(task, total=n)
            lines.total = n

        try:
            yield advance, set_total
            lines.finish()
        finally:
            if handler is not None:
                handler.bar_shown = False
