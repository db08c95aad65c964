"""Errors the CLI turns into a one-line message and a meaningful exit code."""


class AmlRapidsError(Exception):
    """Base class: a problem the user can fix; the message says which file and what is wrong."""

    exit_code = 1


class ConfigError(AmlRapidsError):
    """An invalid config file or override."""

    exit_code = 2


class DataError(AmlRapidsError):
    """Input data that cannot be used as asked (missing root, bad CSV, empty dataset, bad manifest)."""

    exit_code = 3


class SplitError(AmlRapidsError):
    """A split that cannot give every class a place in every part."""

    exit_code = 4
