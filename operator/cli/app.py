"""The `xstilts` command line: the app and its command groups. Each group's module declares
and implements its own commands over the pure core (spec, plan, render, reconcile, report):

    experiment_commands  validate, plan, crd
    local_commands       run, report, ui, sync      (this machine)
    cluster_commands     submit, status, logs, delete, controller
"""

from __future__ import annotations

from typing import Annotated

import typer
from xstilts.operator.cli import cluster_commands, experiment_commands, local_commands
from xstilts.operator.cli.common import console

from xstilts import __version__

app = typer.Typer(
    name="xstilts",
    help="Scaling studies of English intermediate-task training (STILTs) for zero-shot"
    " cross-lingual transfer: one spec, run on this machine or on a Kubernetes GPU cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        console.print(f"xstilts {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """xstilts: does English intermediate-task training help more or less as models grow?"""


experiment_commands.register(app)
local_commands.register(app)
cluster_commands.register(app)


def main() -> None:
    app()
