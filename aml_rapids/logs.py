"""What aml-rapids tells a person, and what it keeps: every module logs to one logger (``aml_rapids``).

On the console (stderr, so stdout stays free for ``--json`` and ``config``) lines are printed literally by rich,
warnings and errors prefixed in colour. A command's whole log is also kept in its run folder: ``session`` buffers
every line from the start, and ``keep_in(folder)`` (called when the first run record is written, once the folder
is known to be the command's) writes what was buffered to ``runs/<run id>.log`` and goes on writing there.

Markup is off everywhere: paths, class names and library messages are printed literally (a folder called
``[red]`` or ``[/]`` is text, not a style); colour comes only from a line's ``style``.
"""

from __future__ import annotations

import logging
import logging.handlers
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.text import Text

log = logging.getLogger("aml_rapids")
console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False, emoji=False)

PREFIXES = {logging.WARNING: ("warning: ", "yellow"), logging.ERROR: ("error: ", "red")}
QUIET, NORMAL, VERBOSE = logging.WARNING, logging.INFO, logging.DEBUG


def say(text: str, prefix: str = "", style: str | None = None) -> None:
    """Log ``text`` at INFO, printed after ``prefix`` in ``style`` (e.g. ``say(msg, "  rejected ", "yellow")``)."""
    log.info(text, extra={"prefix": prefix, "style": style})


def warn(text: str) -> None:
    log.warning(text)


class _ConsoleHandler(logging.Handler):
    """Prints records through the rich console; progress lines only where no progress bar shows them."""

    def __init__(self, level: int):
        super().__init__(level)
        self.bar_shown = False  # set by progress.progress_bar while a bar is drawn

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "progress", False) and self.bar_shown:
            return
        prefix, style = PREFIXES.get(record.levelno, (getattr(record, "prefix", ""), getattr(record, "style", None)))
        console.print(Text.assemble((prefix, style or ""), record.getMessage()))


class _FileFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = getattr(record, "prefix", "") if record.levelno < logging.WARNING else ""
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        return f"{stamp} {record.levelname:<7} {prefix}{record.getMessage()}"


_console_handler: _ConsoleHandler | None = None
_buffer: logging.handlers.MemoryHandler | None = None
_file: logging.FileHandler | None = None
_run_id: str | None = None


def console_handler() -> _ConsoleHandler | None:
    return _console_handler


@contextmanager
def session(level: int, run_id: str):
    """One command's logging: the console at ``level`` (QUIET, NORMAL or VERBOSE) and a buffer of every line,
    kept in a file once ``keep_in`` names the run folder. Restores the logger as it was afterwards."""
    global _console_handler, _buffer, _file, _run_id
    saved = (log.level, log.propagate, list(log.handlers))
    _console_handler = _ConsoleHandler(level)
    _buffer = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
    _run_id = run_id
    log.handlers, log.propagate = [_console_handler, _buffer], False
    log.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        for handler in log.handlers:
            handler.close()
        log.setLevel(saved[0])
        log.propagate, log.handlers = saved[1], saved[2]
        _console_handler = _buffer = _file = _run_id = None


def keep_in(folder: Path) -> Path | None:
    """From now on write the session's log to ``folder/runs/<run id>.log``, starting with what was buffered;
    the first folder named wins (``run`` keeps one log for all its stages). Outside a session: nothing."""
    global _buffer, _file
    if _file is not None:
        return Path(_file.baseFilename)
    if _buffer is None:
        return None
    path = Path(folder) / "runs" / f"{_run_id}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    _file = logging.FileHandler(path, encoding="utf-8")
    _file.setFormatter(_FileFormatter())
    _buffer.setTarget(_file)
    _buffer.flush()
    log.removeHandler(_buffer)
    _buffer.close()
    _buffer = None
    log.addHandler(_file)
    return path
