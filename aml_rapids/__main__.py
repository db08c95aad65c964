"""``python -m aml_rapids``: the command line."""

from .cli import app

app(prog_name="aml-rapids")
