"""What every command group shares: the consoles, the CLI's exit codes, reading a spec file,
and the options several groups declare."""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from xstilts.operator.experiment.spec import MAX_SPEC_BYTES, ExperimentSpec, SpecError, load_spec_text

console = Console()
err = Console(stderr=True)


class CliExit(IntEnum):
    """The command line's exit codes (the trainer's own are `xstilts.trainer.config.ExitCode`)."""

    OK = 0
    FAILED = 1  # a run failed, a cluster call failed, MLflow still unreachable
    INVALID = 2  # bad spec, bad option: nothing was done


SpecPath = Annotated[Path, typer.Argument(help="Experiment spec: a bare spec or a kind: Experiment object (YAML).")]
OutputDir = Annotated[Path | None, typer.Option(
    "--output-dir", help="The experiment's storage root (default: xstilts-out/<name>).")]
TrackingUri = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow server (default: the spec's, else a SQLite store in the output directory).")]


def fail(message: str, code: int = CliExit.FAILED) -> NoReturn:
    """One red line on stderr, then exit with `code`. `message` is plain text, never markup."""
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True, highlight=False)


def load_spec(path: Path) -> ExperimentSpec:
    """Read and validate a spec file; on any problem print every error and exit 2."""
    try:
        with path.open("rb") as f:  # never more than the limit: `validate /dev/zero` must end
            data = f.read(MAX_SPEC_BYTES + 1)
        if len(data) > MAX_SPEC_BYTES:
            fail(f"cannot read {path}: larger than {MAX_SPEC_BYTES:,} bytes, the limit for a spec"
                 " (a spec is a few kilobytes)", CliExit.INVALID)
        text = data.decode("utf-8")
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror or e}", CliExit.INVALID)
    except UnicodeDecodeError as e:
        fail(f"cannot read {path}: not UTF-8 text (byte {e.start})", CliExit.INVALID)
    try:
        return load_spec_text(text, str(path))
    except SpecError as e:
        print_spec_error(e)
        raise typer.Exit(CliExit.INVALID) from None


def print_spec_error(e: SpecError) -> None:
    err.print(f"[red]{escape(e.source)}: {len(e.problems)} problem(s)[/red]", soft_wrap=True)
    for line in e.problems:
        err.print(f"  - {line}", markup=False, highlight=False, soft_wrap=True)
