"""`python -m sstl.cli`: the command line, as the `sstl` script runs it."""

from sstl.cli.app import app

app()
