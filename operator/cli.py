"""The `xstilts` command line. Each command is a thin shell over the pure core: load the spec,
call plan / render / reconcile / report, print with rich."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table
from xstilts.operator.cluster_cli import register as register_cluster_commands
from xstilts.operator.crd import crd as make_crd
from xstilts.operator.plan import Plan, PlannedRun, plan
from xstilts.operator.spec import ExperimentSpec, SpecError, load_spec_text

from xstilts import __version__

EXIT_INVALID = 2

app = typer.Typer(
    name="xstilts",
    help="Scaling studies of English intermediate-task training (STILTs) for zero-shot"
    " cross-lingual transfer: one spec, run on this machine or on a Kubernetes GPU cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)

SpecPath = Annotated[Path, typer.Argument(help="Experiment spec: a bare spec or a kind: Experiment object (YAML).")]


def load_spec(path: Path) -> ExperimentSpec:
    """Read and validate a spec file; on any problem print every error and exit 2."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        err.print(f"[red]error:[/red] cannot read {path}: {e.strerror or e}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID) from None
    except UnicodeDecodeError as e:
        err.print(f"[red]error:[/red] cannot read {path}: not UTF-8 text (byte {e.start})", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID) from None
    try:
        return load_spec_text(text, str(path))
    except SpecError as e:
        print_spec_error(e)
        raise typer.Exit(EXIT_INVALID) from None


def print_spec_error(e: SpecError) -> None:
    err.print(f"[red]{e.source}: {len(e.problems)} problem(s)[/red]", soft_wrap=True)
    for line in e.problems:
        err.print(f"  - {line}", markup=False, highlight=False, soft_wrap=True)


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


@app.command()
def validate(specs: Annotated[list[Path], typer.Argument(help="One or more spec files.")]) -> None:
    """Check specs; print every problem with its field path. Exit 0 if all are valid, else 2."""
    failed = False
    for path in specs:
        try:
            spec = load_spec(path)
        except typer.Exit:
            failed = True
            continue
        console.print(f"[green]ok[/green] {path}: {spec.name}, {spec.run_count} runs")
    if failed:
        raise typer.Exit(EXIT_INVALID)


def _fmt_hours(hours: float | None) -> str:
    if hours is None:
        return "?"
    return f"{hours:,.1f}" if hours >= 0.1 else f"{hours:.3f}"


def plan_rows(p: Plan) -> list[dict[str, Any]]:
    return [
        {
            "run_id": r.run_id,
            "stage": r.config.stage.value,
            "model": r.labels.model,
            "intermediate": r.labels.intermediate,
            "target": r.labels.target,
            "tasks": list(r.config.tasks),
            "seed": r.config.seed,
            "depends_on": list(r.depends_on),
            "train_tokens": r.train_tokens,
            "gpu_hours": r.gpu_hours,
            "gpus": r.config.resources.gpus_per_node * r.config.resources.nodes,
            "zero_stage": r.config.deepspeed.zero_stage,
            "offload": r.config.deepspeed.offload,
        }
        for r in p.runs
    ]


@app.command("plan")
def plan_command(
    spec_path: SpecPath,
    output: Annotated[str, typer.Option("--output", "-o", help="table or json")] = "table",
    configs: Annotated[bool, typer.Option(help="With --output json: include each run's full RunConfig.")] = False,
) -> None:
    """Show the runs a spec expands to, their dependencies and GPU-hour estimates."""
    if output not in ("table", "json"):
        err.print(f"[red]error:[/red] --output must be 'table' or 'json', not {output!r}")
        raise typer.Exit(EXIT_INVALID)
    spec = load_spec(spec_path)
    p = plan(spec)
    if output == "json":
        rows = plan_rows(p)
        if configs:
            for row, run in zip(rows, p.runs, strict=True):
                row["config"] = run.config.model_dump(mode="json")
        doc = {
            "experiment": spec.name,
            "runs": rows,
            "totals": _totals(p),
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    _print_plan_table(spec, p)


def _totals(p: Plan) -> dict[str, Any]:
    from xstilts.trainer.config import Stage

    return {
        "runs": len(p.runs),
        "intermediate_runs": p.count(Stage.INTERMEDIATE),
        "target_runs": p.count(Stage.TARGET),
        "gpu_hours": p.gpu_hours,
        "unknown_gpu_hours": sum(1 for r in p.runs if r.gpu_hours is None),
    }


def _print_plan_table(spec: ExperimentSpec, p: Plan) -> None:
    table = Table(title=f"{spec.name}: {len(p.runs)} runs", show_lines=False)
    for column in ("run", "stage", "model", "intermediate", "target", "seed", "after", "GPUs", "ZeRO", "GPU-h"):
        table.add_column(column, justify="right" if column in ("seed", "GPUs", "GPU-h") else "left")

    def row(r: PlannedRun) -> list[str]:
        ds = r.config.deepspeed
        zero = f"{ds.zero_stage}" + ("" if ds.offload == "none" else f"+{ds.offload}")
        res = r.config.resources
        gpus = f"{res.gpus_per_node}x{res.nodes}" if res.nodes > 1 else str(res.gpus_per_node)
        return [r.run_id, r.config.stage.value, r.labels.model, r.labels.intermediate,
                r.labels.target or "-", str(r.config.seed), ",".join(r.depends_on) or "-",
                gpus, zero, _fmt_hours(r.gpu_hours)]

    for r in p.runs:
        table.add_row(*row(r))
    console.print(table)
    t = _totals(p)
    unknown = f" ({t['unknown_gpu_hours']} runs of unknown size not counted)" if t["unknown_gpu_hours"] else ""
    console.print(
        f"[bold]{t['runs']}[/bold] runs: {t['intermediate_runs']} intermediate, {t['target_runs']} target;"
        f" estimated [bold]{_fmt_hours(t['gpu_hours'])}[/bold] GPU-hours at"
        f" {spec.planning.assumed_tflops_per_gpu:g} TFLOP/s per GPU{unknown}"
    )


@app.command()
def crd() -> None:
    """Print the Experiment CustomResourceDefinition (generated from the spec model)."""
    sys.stdout.write(yaml.safe_dump(make_crd(), sort_keys=False, width=100, allow_unicode=True))


OutputDir = Annotated[Path | None, typer.Option(
    "--output-dir", help="The experiment's storage root (default: xstilts-out/<name>).")]
TrackingUri = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow server (default: the spec's, else a SQLite store in the output directory).")]


@app.command()
def run(
    spec_path: SpecPath,
    parallel: Annotated[int | None, typer.Option(
        "--parallel", "-j", min=1, help="Runs at once (default: one per GPU, or per CPU core, at most the"
        " spec's cluster.maxParallel).")] = None,
    output_dir: OutputDir = None,
    tracking_uri: TrackingUri = None,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", help="Also retry runs that failed in an earlier invocation.")] = False,
) -> None:
    """Execute the experiment on this machine, dependencies first; rerun to resume."""
    from xstilts.operator.local_cli import run_command

    spec = load_spec(spec_path)
    raise typer.Exit(run_command(spec, spec_path, parallel, output_dir, tracking_uri, retry_failed, console, err))


@app.command()
def report(
    spec_path: SpecPath,
    output_dir: OutputDir = None,
    formats: Annotated[str, typer.Option("--format", help="Comma-separated: md, html, png, json.")] = "md,html,png",
    from_mlflow: Annotated[bool, typer.Option(
        "--from-mlflow", help="Read results from MLflow instead of the result files.")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Gain over the baseline vs model size: tables and plots under <output-dir>/report/, logged to MLflow."""
    from xstilts.operator.local_cli import report_command

    spec = load_spec(spec_path)
    raise typer.Exit(report_command(spec, output_dir, formats, from_mlflow, tracking_uri, console, err))


@app.command()
def ui(
    spec_path: Annotated[Path | None, typer.Argument(help="Experiment spec (or give --output-dir).")] = None,
    output_dir: OutputDir = None,
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 5000,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Start the MLflow UI on the experiment's local MLflow store."""
    from xstilts.operator.local_cli import ui_command

    spec = load_spec(spec_path) if spec_path is not None else None
    raise typer.Exit(ui_command(spec, output_dir, host, port, console, err))


@app.command()
def sync(
    target: Annotated[Path, typer.Argument(
        help="A storage root, a directory of storage roots, or an experiment spec (its default storage root).")]
    = Path("xstilts-out"),
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="Upload to this MLflow instead of the one each run was configured with.")] = None,
) -> None:
    """Upload what runs buffered while MLflow was unreachable, and rebuild from result.json the finished runs
    MLflow lacks; safe to repeat. Exit 1 if something could not reach MLflow."""
    from xstilts.operator.plan import default_storage_root
    from xstilts.trainer.tracking import sync_storage

    if not target.exists():
        err.print(f"[red]error:[/red] {target} is neither a storage root nor a spec file", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID)
    root = target if target.is_dir() else Path(default_storage_root(load_spec(target)))
    report = sync_storage(root, tracking_uri)
    for line in report.lines():
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(0 if report.ok else 1)


# submit, status, logs, delete, controller (their imports of the Kubernetes client are lazy).
register_cluster_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
