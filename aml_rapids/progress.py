"""One look for progress bars on long work: rich, with items/s, quiet when output is not a terminal."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)


class _Rate(TextColumn):
    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):
        speed = task.finished_speed or task.speed
        return f"{speed:,.0f} {self.unit}/s" if speed else ""


@contextmanager
def progress_bar(description: str, total: int | None = None, unit: str = "img"):
    """Yield ``(advance, set_total)`` callables for a rich progress bar that shows rate and time left."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(unit),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield (lambda n=1: bar.advance(task, n)), (lambda t: bar.update(task, total=t))
