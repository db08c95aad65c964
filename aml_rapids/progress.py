"""One console for everything the CLI prints, and one look for progress bars on long work: rich, with items/s,
quiet when output is not a terminal.

Markup is off everywhere: paths, class names and library messages are printed literally (a folder called
``[red]`` or ``[/]`` is text, not a style); colour comes only from ``say``'s ``style``.
"""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


def say(text: str, prefix: str = "", style: str | None = None) -> None:
    """Print ``text`` literally, after ``prefix`` in ``style`` (e.g. ``say(msg, "error: ", "red")``)."""
    console.print(Text.assemble((prefix, style or ""), text))


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
    columns = [TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
               _Rate(unit), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield (lambda n=1: bar.advance(task, n)), (lambda t: bar.update(task, total=t))
