"""What every command shares: option types and wording, the one rule for defaults, and ``command``, which gives
each command a run id, logging (-q/-v and a log file in its run folder), --json and exit codes.

Defaults follow one rule: an option that mirrors a config key defaults to the config (built-in < ``-c`` file <
``--set`` < the option), and its help shows the built-in value and the key; an output defaults to a folder
beside the input, named in its help.
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import logging
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import RunConfig, as_overrides, load_config
from ..errors import EXIT_INTERRUPTED, EXIT_TERMINATED, AmlRapidsError, OutputError, Terminated
from ..logs import NORMAL, QUIET, VERBOSE, log, session
from ..provenance import run_scope
from ..workflow import as_json

BUILT_IN = RunConfig()


def from_config(key: str) -> str:
    """The help's default for an option mirroring config ``key``: its built-in value and where it comes from."""
    value: object = BUILT_IN
    for part in key.split("."):
        value = getattr(value, part)
    return f"{key} in the config: {'none' if value is None else value}"


ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", metavar="FILE", show_default="built-in: the published method, as configs/default.yaml",
    help="YAML config file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", show_default="none",
    help="Override one config key, e.g. split.seed=3 (repeatable; values are YAML).")]
ManifestArg = Annotated[Path, typer.Argument(
    metavar="MANIFEST", show_default=False, help="manifest.parquet written by `aml-rapids index` (and split).")]
StoreArg = Annotated[Path, typer.Argument(
    metavar="STORE", show_default=False, help="Feature store written by `aml-rapids extract`.")]
ModelArg = Annotated[Path, typer.Argument(
    metavar="MODEL", show_default=False, help="Model folder written by `aml-rapids train`.")]
AllowFailedOpt = Annotated[bool, typer.Option(
    "--allow-failed", show_default="off",
    help="Exit 0 even if some cells' files could not be read (they are kept as failed and retried next run).")]
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", show_default="off", help="Replace this command's own earlier results in the output folder.")]
BackendOpt = Annotated[Optional[str], typer.Option(
    metavar="auto|cuml|sklearn", show_default=from_config("classify.backend"),
    help="Classifier backend: cuML on a GPU, scikit-learn on a CPU.")]

LevelOpt = Annotated[str, typer.Option(
    "--level", metavar="cell|patient", help="cell: the stacking classifier on cells (the method); patient: attention "
                                            "multiple-instance learning on each patient's bag of cells (config "
                                            "section patients).")]


def out_option(default: str, what: str = "Output folder", *aliases: str):
    """``-o/--out``: every command's output, with the default it takes when not given."""
    return typer.Option("--out", "-o", *aliases, metavar="DIR", show_default=default, help=f"{what}.")


def resolve_config(path: Optional[Path], overrides: Optional[list[str]], **options: object) -> RunConfig:
    """Config file < --set overrides < explicit options (those not left at None)."""
    given = {key: value for key, value in options.items() if value is not None}
    return load_config(path, list(overrides or []) + as_overrides(given))


# A file system refusing a write is the user's to fix (space, permissions), wherever it happens.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

_COMMON = [
    inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--quiet", "-q", show_default="off", help="Print only warnings and errors (the log file keeps everything).")]),
    inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--verbose", "-v", show_default="off", help="Print debugging detail too.")]),
    inspect.Parameter("json_out", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--json", show_default="off", help="Print a machine-readable summary on stdout (all other output is on "
                                           "stderr).")]),
]
_active = False  # a command is running: one called by another (``run``) runs inside it
_json = False  # the running command was asked for --json: stdout is the JSON summary's alone


def json_requested() -> bool:
    return _json


def _exit_code(exc: BaseException) -> tuple[int, str] | None:
    """The exit code and one-line message of a problem the user can fix; None for a bug."""
    if isinstance(exc, AmlRapidsError):
        return exc.exit_code, str(exc)
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return OutputError.exit_code, f"{exc.filename or ''}: {exc.strerror}".lstrip(": ")
    if isinstance(exc, KeyboardInterrupt):
        # zarr's pending write tasks die with the process; asyncio would log each of them at exit
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        return (EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED,
                f"{how}; finished work is kept: the same command again resumes an extraction or prediction "
                "where it stopped")
    return None


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def _sigterm_unwinds():
    """While a command runs, SIGTERM raises ``Terminated`` (in the main thread, where signals are delivered)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def command(app: typer.Typer, name: str | None = None):
    """Register ``fn`` as a command: a run id for its records, logging at -q/-v, a problem the user can fix as
    one line and its exit code (a traceback is a bug), and with --json its returned result on stdout."""

    def register(fn):
        stage = name or fn.__name__.replace("_", "-")

        @functools.wraps(fn)
        def wrapper(*args, quiet: bool = False, verbose: bool = False, json_out: bool = False, **kwargs):
            global _active, _json
            if _active:
                return fn(*args, **kwargs)
            level = QUIET if quiet else VERBOSE if verbose else NORMAL
            _active, _json = True, json_out
            try:
                with run_scope() as run_id, session(level, run_id), _sigterm_unwinds():
                    log.debug("%s, run id %s", " ".join(sys.argv), run_id)
                    try:
                        result = fn(*args, **kwargs)
                    except (AmlRapidsError, OSError, KeyboardInterrupt) as exc:
                        known = _exit_code(exc)
                        if known is None:
                            raise
                        log.error(known[1])
                        if json_out:
                            _print_json({"command": stage, "run_id": run_id, "exit_code": known[0], "error": known[1]})
                        raise typer.Exit(known[0]) from None
                    if json_out:
                        _print_json({"command": stage, "run_id": run_id, "exit_code": 0, "result": as_json(result)})
                    return result
            finally:
                _active = _json = False

        signature = inspect.signature(fn, eval_str=True)
        wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *_COMMON])
        app.command(stage)(wrapper)
        return wrapper

    return register


def _print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()
