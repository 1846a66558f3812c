"""`xstilts run`, `report`, `ui` and `sync`: the experiment on this machine. Each command
resolves where things live, calls the executor, the report or the tracking sync, prints, and
exits with its code. Heavy imports (MLflow, matplotlib) happen inside, so `xstilts --help`
stays fast."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from xstilts.operator.cli.common import OutputDir, SpecPath, TrackingUri, console, err, load_spec
from xstilts.operator.experiment.plan import default_storage_root, plan
from xstilts.operator.experiment.spec import ExperimentSpec
from xstilts.trainer.config import ExitCode

DEFAULT_UI_PORT = 5000


def quiet_mlflow() -> None:
    """MLflow's INFO lines (database migrations, artifact downloads) would interleave with the
    progress display; its warnings still show. Only this process: the trainers log as they do."""
    try:
        import mlflow  # noqa: F401 - importing configures its loggers, which are then turned down
    except ImportError:
        return
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def storage_root_of(spec: ExperimentSpec, output_dir: Path | None) -> Path:
    return output_dir if output_dir is not None else Path(default_storage_root(spec))


def default_parallel(spec: ExperimentSpec, machine_gpus: int, cpus: int) -> int:
    """One run per GPU, or per CPU core on a machine without one, at most the spec's
    cluster.maxParallel."""
    limit: int = spec.cluster.max_parallel
    return max(1, min(limit, machine_gpus or cpus))


def follow_up_commands(spec_path: Path, output_dir: Path | None, tracking_uri: str | None) -> tuple[str, str]:
    """The `xstilts report` and `xstilts ui` lines to print after a run, with the same options."""
    where = [] if output_dir is None else ["--output-dir", str(output_dir)]
    report = ["xstilts", "report", str(spec_path), *where]
    if tracking_uri:  # without a password: printed commands end up in logs
        from xstilts.trainer.tracking.buffer import redact_uri

        report += ["--tracking-uri", redact_uri(tracking_uri)]
    ui = ["xstilts", "ui", str(spec_path), *where]
    return shlex.join(report), shlex.join(ui)


def run_command(spec: ExperimentSpec, spec_path: Path, parallel: int | None, output_dir: Path | None,
                tracking_uri: str | None, retry_failed: bool, console: Console, err: Console) -> int:
    from xstilts.operator.local.display import display_for, print_outcome
    from xstilts.operator.local.executor import (
        LocalOptions,
        LocalRunError,
        detect_gpus,
        run_experiment,
        tracking_uri_for,
    )

    quiet_mlflow()
    root = storage_root_of(spec, output_dir)
    p = plan(spec, str(root))
    uri = tracking_uri_for(spec, tracking_uri, root)
    n = parallel or default_parallel(spec, len(detect_gpus()), os.cpu_count() or 1)
    try:
        outcome = run_experiment(spec, p, root, uri, LocalOptions(parallel=n, retry_failed=retry_failed),
                                 display_for(console))
    except LocalRunError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        return ExitCode.INVALID_INPUT
    print_outcome(console, outcome, *follow_up_commands(spec_path, output_dir, tracking_uri))
    stopped_by: int | None = outcome.stopped_by
    if stopped_by is not None:
        return 128 + stopped_by  # 130 after Ctrl-C, as a shell reports it
    return ExitCode.OK if outcome.ok else ExitCode.FAILED


REPORT_FORMATS_HELP = "Comma-separated: md, html, png, json."


def parse_formats(text: str) -> list[str]:
    from xstilts.operator.report.storage import REPORT_FORMATS

    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in REPORT_FORMATS]
    if bad or not formats:
        raise ValueError(f"--format {text!r}: {', '.join(bad) or 'nothing'} is not a report format;"
                         f" choose from {', '.join(REPORT_FORMATS)}")
    return formats


def report_command(spec: ExperimentSpec, output_dir: Path | None, formats_text: str, from_mlflow: bool,
                   tracking_uri: str | None, console: Console, err: Console) -> int:
    from xstilts.operator.local.executor import parent_run, tracking_uri_for
    from xstilts.operator.report.build import (
        build_report,
        excludes_zero_text,
        fmt_interval,
        fmt_parameters,
        grid_of,
        verdict_lines,
    )
    from xstilts.operator.report.storage import (
        REPORT_DIR,
        load_mlflow_results,
        load_result_files,
        log_report,
        write_report,
    )

    try:
        formats = parse_formats(formats_text)
    except ValueError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        return ExitCode.INVALID_INPUT
    quiet_mlflow()
    root = storage_root_of(spec, output_dir)
    p = plan(spec, str(root))
    uri = tracking_uri_for(spec, tracking_uri, root)
    experiment_name = spec.mlflow.experiment_name or spec.name
    if from_mlflow:
        from mlflow.exceptions import MlflowException
        from xstilts.trainer.tracking.buffer import redact_uri
        from xstilts.trainer.tracking.mlflow_client import first_line

        try:
            loaded = load_mlflow_results(uri, experiment_name, [r.run_id for r in (*p.runs, *p.reserve)])
        except (MlflowException, OSError) as e:  # refused, unreachable: say so, not a traceback
            err.print(f"[red]error:[/red] cannot read the results from MLflow at {escape(redact_uri(uri))}:"
                      f" {escape(first_line(e, uri))}", soft_wrap=True)
            return ExitCode.FAILED
    else:
        loaded = load_result_files(p)
    for problem in loaded.problems:
        err.print(f"[yellow]warning:[/yellow] {escape(problem)}", soft_wrap=True)
    report = build_report(loaded.results, grid_of(spec), loaded.predictions)
    figures = []
    if "png" in formats or "html" in formats:
        from xstilts.operator.report.plots import figures as make_figures

        try:
            figures = make_figures(report)
        except ImportError as e:  # matplotlib comes with the [train] extra
            err.print(f"[red]error:[/red] the plots need matplotlib ({e}): pip install 'xstilts\\[train]',"
                      " or ask for --format md,json", soft_wrap=True)
            return ExitCode.INVALID_INPUT
    paths = write_report(report, figures, root / REPORT_DIR, formats)

    def warn(text: str) -> None:
        err.print(f"[yellow]warning:[/yellow] {escape(text)}", soft_wrap=True)

    parent = parent_run(uri, experiment_name, spec.name, root, warn)
    if parent is not None:
        try:
            log_report(paths, uri, parent, report)
        except Exception as e:  # the files are written; MLflow is only a view of them
            from xstilts.trainer.tracking.mlflow_client import first_line

            warn(f"could not log the report to MLflow run {parent}: {type(e).__name__}: {first_line(e, uri)}")
    for line in verdict_lines(report):
        console.print(f"  {escape(line)}", soft_wrap=True)
    labels = {m.name: m.label for m in report.grid.models}
    for b in report.best:
        console.print(f"  {escape(labels[b.model])} ({fmt_parameters(report.parameters.get(b.model))}): best"
                      f" {escape(b.arm)}, zero-shot {fmt_interval(b.gain)} points,"
                      f" {excludes_zero_text(b.gain.excludes_zero)}", soft_wrap=True)
    if report.missing:
        console.print(f"[yellow]{len(report.missing)} gaps[/yellow] (see Missing in the report), e.g."
                      f" {escape(report.missing[0])}", soft_wrap=True)
    console.print(f"report: {', '.join(escape(str(p)) for p in paths)}"
                  + (f"; logged to MLflow run {parent}" if parent and paths else ""), soft_wrap=True)
    return ExitCode.OK


def ui_command(spec: ExperimentSpec | None, output_dir: Path | None, host: str, port: int,
               console: Console, err: Console) -> int:
    """`mlflow ui` on the experiment's local store, in the foreground until Ctrl-C."""
    from xstilts.trainer.tracking.mlflow_client import artifact_location, local_tracking_uri, sqlite_path

    if output_dir is not None:
        root = output_dir
    elif spec is None:
        err.print("[red]error:[/red] give a SPEC or --output-dir DIR (the experiment's output directory)")
        return ExitCode.INVALID_INPUT
    elif spec.mlflow.tracking_uri:
        console.print(f"{spec.name} tracks to {escape(spec.mlflow.tracking_uri)}: open that server's UI")
        return ExitCode.OK
    else:
        root = storage_root_of(spec, None)
    uri = local_tracking_uri(root)
    db, artifacts = sqlite_path(uri), artifact_location(uri)
    if db is None or artifacts is None or not db.exists():
        err.print(f"[red]error:[/red] no MLflow store at {escape(str(db))}: run `xstilts run` first,"
                  " or pass the experiment's --output-dir", soft_wrap=True)
        return ExitCode.INVALID_INPUT
    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--default-artifact-root", artifacts,
            "--host", host, "--port", str(port), "--workers", "1"]
    url = f"http://{host}:{port}" + runs_view_path(uri, spec.mlflow.experiment_name or spec.name if spec else None)
    console.print(f"MLflow UI for {escape(str(root))}: [bold]{escape(url)}[/bold] (Ctrl-C to stop)", soft_wrap=True)
    sys.stdout.flush()
    console.file.flush()
    # Browsing runs needs none of the server's background job workers (GenAI features): a
    # lighter UI on a laptop, unless the environment asks for them.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | dict(os.environ)
    return serve_until_stopped(argv, env)


def runs_view_path(tracking_uri: str, experiment_name: str | None) -> str:
    """The UI route of the experiment's training-runs table ("/" when the experiment is unknown)."""
    if experiment_name is None:
        return "/"
    from xstilts.trainer.tracking.mlflow_client import EXPERIMENT_KIND_TAG, TRAINING_KIND, open_client

    client = open_client(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return "/"
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # a store from before the tag: the same view
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    # workflowType: the UI's "Model training" side (runs, models) rather than its GenAI side
    return f"/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"


def serve_until_stopped(argv: list[str], env: dict[str, str]) -> int:
    """Run the server in a process group of its own until it exits or this process is stopped
    (Ctrl-C, SIGTERM, SIGHUP); then stop the whole group: `mlflow ui` starts uvicorn and other
    workers as children, which a signal to the first process alone would leave running."""
    server = subprocess.Popen(argv, env=env, start_new_session=True)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        stop_group(server)


def stop_group(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return  # the group is gone
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            server.poll()
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


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
    spec = load_spec(spec_path)
    raise typer.Exit(run_command(spec, spec_path, parallel, output_dir, tracking_uri, retry_failed, console, err))


def report(
    spec_path: SpecPath,
    output_dir: OutputDir = None,
    formats: Annotated[str, typer.Option("--format", help="Comma-separated: md, html, png, json.")] = "md,html,png",
    from_mlflow: Annotated[bool, typer.Option(
        "--from-mlflow", help="Read results from MLflow instead of the result files.")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Gain over the baseline vs model size: tables and plots under <output-dir>/report/, logged to MLflow."""
    spec = load_spec(spec_path)
    raise typer.Exit(report_command(spec, output_dir, formats, from_mlflow, tracking_uri, console, err))


def ui(
    spec_path: Annotated[Path | None, typer.Argument(help="Experiment spec (or give --output-dir).")] = None,
    output_dir: OutputDir = None,
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 5000,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Start the MLflow UI on the experiment's local MLflow store."""
    spec = load_spec(spec_path) if spec_path is not None else None
    raise typer.Exit(ui_command(spec, output_dir, host, port, console, err))


def sync(
    target: Annotated[Path, typer.Argument(
        help="A storage root, a directory of storage roots, or an experiment spec (its default storage root).")]
    = Path("xstilts-out"),
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="Upload to this MLflow instead of the one each run was configured with.")] = None,
) -> None:
    """Upload what runs buffered while MLflow was unreachable, and rebuild from result.json the finished runs
    MLflow lacks; safe to repeat. Exit 1 if something could not reach MLflow."""
    from xstilts.operator.experiment.plan import default_storage_root
    from xstilts.trainer.tracking.tracker import sync_storage

    if not target.exists():
        err.print(f"[red]error:[/red] {target} is neither a storage root nor a spec file", soft_wrap=True)
        raise typer.Exit(ExitCode.INVALID_INPUT)
    root = target if target.is_dir() else Path(default_storage_root(load_spec(target)))
    report = sync_storage(root, tracking_uri)
    for line in report.lines():
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(0 if report.ok else 1)


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(report)
    app.command()(ui)
    app.command()(sync)
