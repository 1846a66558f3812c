"""The `xstilts` command line (see app.py)."""

from xstilts.operator.cli.app import app, main

__all__ = ["app", "main"]
