"""Errors the CLI turns into a one-line message and an exit code of their own (the README's table).

Every problem a user can fix is one of these; anything else is a bug, reported with its traceback (exit 1).
"""


class AmlRapidsError(Exception):
    """Base class: a problem the user can fix; the message says which file and what is wrong."""

    exit_code = 1


class ConfigError(AmlRapidsError):
    """An invalid config file, override or option, or a request that contradicts how existing results were
    made (another extraction config, evaluating rows the model trained on)."""

    exit_code = 2


class DataError(AmlRapidsError):
    """Input data that cannot be used as asked (missing root, bad CSV, empty dataset, bad manifest, a damaged
    store or model folder)."""

    exit_code = 3


class WeightsError(DataError):
    """Weights that cannot be found on this machine or do not fit the network."""


class SplitError(AmlRapidsError):
    """A split that cannot give every class a place in every part."""

    exit_code = 4


class RejectedFiles(AmlRapidsError):
    """``index --strict`` and files were rejected (the manifest and rejects.csv are written all the same)."""

    exit_code = 5


class FailedRowsError(AmlRapidsError):
    """Rows whose files could not be read during extraction: stored as failed (a re-run retries them)."""

    exit_code = 6


class BusyError(AmlRapidsError):
    """A store that another process is writing right now."""

    exit_code = 7


class OutputError(AmlRapidsError):
    """An output location that cannot be written: a file in the way, no permission, a full disk."""

    exit_code = 8


class VariantsFailed(AmlRapidsError):
    """Some variants of a study could not run; the others' results are written."""

    exit_code = 9


class TrainingDiverged(AmlRapidsError):
    """A fine-tuning whose loss stopped being a number: stopped, its last good checkpoint and best weights kept."""

    exit_code = 10


class EngineError(AmlRapidsError):
    """An inference engine that cannot run here (not installed, not on this device, cannot convert the network)
    or whose features disagree with PyTorch fp32's beyond the parity guard's threshold."""

    exit_code = 11


class DownloadError(AmlRapidsError):
    """A download that failed (no internet, the file gone from its source): ``aml-rapids weights fetch`` is the
    one command that downloads."""

    exit_code = 12


class ClusterError(AmlRapidsError):
    """A Dask cluster that cannot be started or reached (no scheduler at its file, more workers than GPUs,
    dask-jobqueue not installed), or whose workers are too small for the work."""

    exit_code = 13


EXIT_INTERRUPTED = 130  # Ctrl-C; every stage resumes or can be re-run
EXIT_TERMINATED = 143  # SIGTERM (128 + 15), as a batch scheduler sends at a job's time limit: the same clean stop


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so a job stopped by its scheduler unwinds as cleanly (the store's
    lock released, finished chunks kept) and a rerun resumes."""
