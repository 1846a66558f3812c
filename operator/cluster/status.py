"""`xstilts status NAME`: one view of an experiment on a cluster, from its Experiment object
(spec → the planned runs; status → their states, counts, GPU-hours, best gain) and its
Jobs (which Job runs which run, for how long on how many GPUs).

`build_view` is pure; `gather` reads the API; `print_status` draws it with rich.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from xstilts.operator.cluster.reconcile import COUNT_KEYS, COUNTED_AS, Observed, ObservedJob, reconcile
from xstilts.operator.cluster.render import (
    INTERMEDIATE_LABEL,
    MODEL_LABEL,
    NO_TARGET,
    STAGE_LABEL,
    TARGET_LABEL,
    experiment_selector,
    pod_storage_root,
)
from xstilts.operator.cluster.results import ResultStore
from xstilts.operator.cluster.runtime.kube_api import EXPERIMENTS, JOBS, Kube, KubeError
from xstilts.operator.experiment.plan import plan
from xstilts.operator.experiment.spec import ExperimentSpec, SpecError, parse_document, to_object

# Before the controller has written a run's state.
UNKNOWN = "unknown"
STATE_STYLE = {"succeeded": "green", "running": "cyan", "finishing": "cyan", "failed": "red", "blocked": "red",
               "pending": "yellow", "creating": "yellow"}
BAR_WIDTH = 30


@dataclass
class RunRow:
    run_id: str
    stage: str
    model: str
    intermediate: str
    target: str | None
    seed: int | None
    state: str
    job: str | None = None
    gpu_hours: float | None = None
    failure: str | None = None


@dataclass
class StatusView:
    name: str
    namespace: str
    controller: bool  # an Experiment object (the controller runs it) or Jobs made with --no-controller
    phase: str
    message: str
    counts: dict[str, int]
    gpu_hours_used: float | None
    gpu_hours_estimated: float | None
    best_gain: str | None = None
    mlflow_experiment: str | None = None
    problems: list[str] = field(default_factory=list)  # Degraded/invalid-spec messages
    rows: list[RunRow] = field(default_factory=list)

    @property
    def progress(self) -> float:
        total = self.counts.get("total", 0)
        return self.counts.get("succeeded", 0) / total if total else 0.0

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["progress"] = round(self.progress, 4)
        return doc


def _job_hours(job: ObservedJob, now: datetime) -> float | None:
    if job.start_time is None or not job.gpus:
        return None
    end = job.completion_time or (now if job.phase == "running" else None)
    if end is None:
        return None
    hours: float = max(0.0, (end - job.start_time).total_seconds()) * job.gpus / 3600.0
    return hours


def build_view(name: str, namespace: str, experiment: Mapping[str, Any] | None, jobs: list[Mapping[str, Any]],
               now: datetime, *, controller: bool = True) -> StatusView | None:
    """The view of one experiment; None when there is neither an Experiment nor a Job.
    `controller=False` marks an experiment submitted with --no-controller, whose
    "Experiment" was computed here from its spec."""
    observed: dict[str, tuple[ObservedJob, Mapping[str, Any]]] = {}
    for job in jobs:
        try:
            seen = ObservedJob.from_k8s(job)
        except ValueError:
            continue
        observed[seen.run_id] = (seen, job)
    if experiment is None:
        return _view_from_jobs(name, namespace, observed, now) if observed else None
    status = experiment.get("status") or {}
    states: Mapping[str, str] = status.get("runs") or {}
    failures: Mapping[str, str] = status.get("failures") or {}
    view = StatusView(
        name=name, namespace=namespace, controller=controller, phase=str(status.get("phase") or "Pending"),
        message=str(status.get("message") or "not reconciled yet: is the controller running?"),
        counts={k: int((status.get("counts") or {}).get(k, 0)) for k in COUNT_KEYS},
        gpu_hours_used=status.get("gpuHoursUsed"), gpu_hours_estimated=status.get("gpuHoursEstimated"),
        best_gain=status.get("bestGain"), mlflow_experiment=status.get("mlflowExperiment"))
    view.problems = [str(c.get("message")) for c in status.get("conditions") or []
                     if c.get("type") == "Degraded" and c.get("status") == "True"]
    try:
        spec = parse_document(dict(experiment), f"experiment {namespace}/{name}")
    except SpecError:
        return view  # the status says why (phase Failed, InvalidSpec)
    planned = plan(spec, storage_root=pod_storage_root(spec))
    if not view.counts["total"]:
        view.counts["total"] = len(planned.runs)
        view.counts["pending"] = len(planned.runs)
    for run in planned.runs:
        labels = run.labels
        job_seen = observed[run.run_id][0] if run.run_id in observed else None
        view.rows.append(RunRow(
            run_id=run.run_id, stage=run.config.stage.value, model=labels.model, intermediate=labels.intermediate,
            target=labels.target, seed=run.config.seed,
            # A summarised status (past 5,000 runs) lists failed runs only: the Job says the rest.
            state=states.get(run.run_id) or (job_seen.phase if job_seen else UNKNOWN),
            job=job_seen.name if job_seen else None,
            gpu_hours=_job_hours(job_seen, now) if job_seen else None, failure=failures.get(run.run_id)))
    return view


def _view_from_jobs(name: str, namespace: str, observed: Mapping[str, tuple[ObservedJob, Mapping[str, Any]]],
                    now: datetime) -> StatusView:
    counts = dict.fromkeys(COUNT_KEYS, 0)
    rows = []
    for run_id, (job, raw) in observed.items():
        labels = (raw.get("metadata") or {}).get("labels") or {}
        state = job.phase
        counts[COUNTED_AS.get(state, "pending")] += 1
        target = labels.get(TARGET_LABEL)
        rows.append(RunRow(run_id=run_id, stage=str(labels.get(STAGE_LABEL, "?")),
                           model=str(labels.get(MODEL_LABEL, "?")),
                           intermediate=str(labels.get(INTERMEDIATE_LABEL, "?")),
                           target=None if target in (None, NO_TARGET) else str(target), seed=None, state=state,
                           job=job.name, gpu_hours=_job_hours(job, now), failure=job.failure_reason))
    counts["total"] = len(rows)
    rows.sort(key=lambda r: (r.stage != "intermediate", r.model, r.intermediate, r.target or "", r.run_id))
    used = sum(r.gpu_hours or 0.0 for r in rows)
    # Without the spec, the runs that have no Job yet are unknown, and so is the phase.
    return StatusView(name=name, namespace=namespace, controller=False, phase="Unknown",
                      message=(f"{counts['succeeded']}/{counts['total']} Jobs succeeded; submitted with"
                               " --no-controller, so runs without a Job are not shown: pass --spec SPEC"
                               " for the whole plan"),
                      counts=counts, gpu_hours_used=round(used, 3), gpu_hours_estimated=None, rows=rows)


def gather(kube: Kube, namespace: str, name: str, spec: ExperimentSpec | None = None,
           results_dir: Path | None = None) -> StatusView | None:
    """The Experiment object and its Jobs; with no Experiment (submitted with
    --no-controller) and a spec, the status the controller would compute from them."""
    experiment = None
    if kube.api_available(EXPERIMENTS.group, EXPERIMENTS.version):
        try:
            experiment = kube.get(EXPERIMENTS, namespace, name)
        except KubeError as e:
            if not e.not_found:
                raise
    jobs = kube.list(JOBS, namespace, selector=experiment_selector(name)).get("items") or []
    now = datetime.now(UTC)
    if experiment is None and spec is not None:
        return build_view(name, namespace, without_controller(spec, namespace, jobs, results_dir, now), jobs, now,
                          controller=False)
    return build_view(name, namespace, experiment, jobs, now)


def without_controller(spec: ExperimentSpec, namespace: str, jobs: list[dict[str, Any]], results_dir: Path | None,
                       now: datetime) -> dict[str, Any]:
    """The Experiment object a controller would hold for a spec submitted with
    --no-controller: its status computed by reconcile from the Jobs (and results)."""
    planned = plan(spec, storage_root=pod_storage_root(spec))
    observed = []
    for job in jobs:
        with contextlib.suppress(ValueError):
            observed.append(ObservedJob.from_k8s(job))
    results = ResultStore(results_dir).read(spec, planned)[0] if results_dir else {}
    obj: dict[str, Any] = to_object(spec, namespace)
    obj["status"] = reconcile(spec, planned, Observed(observed, results), now).status
    return obj


def _hours(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if value >= 0.1 else f"{value:.3f}"


def progress_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "█" * filled + "░" * (width - filled)


def print_status(view: StatusView, console: Console) -> None:
    c = view.counts
    style = {"Succeeded": "green", "Failed": "red", "PartiallyFailed": "red", "Degraded": "red",
             "Running": "cyan"}.get(view.phase, "yellow")
    console.print(f"[bold]{view.name}[/bold] in namespace {view.namespace}: [{style}]{view.phase}[/{style}]",
                  highlight=False)
    console.print(f"{progress_bar(view.progress)} {c.get('succeeded', 0)}/{c.get('total', 0)} runs succeeded"
                  f" ({view.progress:.0%}); {c.get('running', 0)} running, {c.get('pending', 0)} pending,"
                  f" {c.get('failed', 0)} failed, {c.get('blocked', 0)} blocked", highlight=False)
    estimate = f" of {_hours(view.gpu_hours_estimated)} estimated" if view.gpu_hours_estimated is not None else ""
    console.print(f"GPU-hours: {_hours(view.gpu_hours_used)} used{estimate}", highlight=False)
    if view.best_gain:
        console.print(f"best gain so far: {view.best_gain} points", highlight=False)
    if view.mlflow_experiment:
        console.print(f"MLflow experiment: {view.mlflow_experiment}", highlight=False)
    for problem in view.problems:
        console.print(f"[red]{problem}[/red]", soft_wrap=True, highlight=False)
    if not view.controller or view.message:
        console.print(view.message, highlight=False, style="dim")
    if not view.rows:
        return
    table = Table(show_lines=False)
    for column in ("run", "stage", "model", "intermediate", "target", "seed", "state", "job", "GPU-h"):
        table.add_column(column, justify="right" if column in ("seed", "GPU-h") else "left")
    for row in view.rows:
        state_style = STATE_STYLE.get(row.state, "")
        state = f"[{state_style}]{row.state}[/{state_style}]" if state_style else row.state
        if row.failure:
            state += f" ({row.failure})"
        table.add_row(row.run_id, row.stage, row.model, row.intermediate, row.target or "-",
                      "-" if row.seed is None else str(row.seed), state, row.job or "-", _hours(row.gpu_hours))
    console.print(table)
