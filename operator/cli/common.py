"""What every command group shares: the consoles, reading a spec file, and the options several
groups declare. Exit codes are the project's one set, `xstilts.trainer.config.ExitCode`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from xstilts.operator.experiment.spec import MAX_SPEC_BYTES, ExperimentSpec, SpecError, load_spec_text
from xstilts.trainer.config import ExitCode

console = Console()
err = Console(stderr=True)


SpecPath = Annotated[Path, typer.Argument(help="Experiment spec: a bare spec or a kind: Experiment object (YAML).")]
OutputDir = Annotated[Path | None, typer.Option(
    "--output-dir", help="The experiment's storage root (default: xstilts-out/<name>).")]
TrackingUri = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow server (default: the spec's, else a SQLite store in the output directory).")]


def fail(message: str, code: int = ExitCode.FAILED) -> NoReturn:
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
                 " (a spec is a few kilobytes)", ExitCode.INVALID_INPUT)
        text = data.decode("utf-8")
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror or e}", ExitCode.INVALID_INPUT)
    except UnicodeDecodeError as e:
        fail(f"cannot read {path}: not UTF-8 text (byte {e.start})", ExitCode.INVALID_INPUT)
    try:
        return load_spec_text(text, str(path))
    except SpecError as e:
        print_spec_error(e)
        raise typer.Exit(ExitCode.INVALID_INPUT) from None


def print_spec_error(e: SpecError) -> None:
    err.print(f"[red]{escape(e.source)}: {len(e.problems)} problem(s)[/red]", soft_wrap=True)
    for line in e.problems:
        err.print(f"  - {line}", markup=False, highlight=False, soft_wrap=True)
