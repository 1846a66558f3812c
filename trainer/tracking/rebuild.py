"""MLflow runs rebuilt from result files, for `xstilts sync`.

A run's result.json is the record of what happened; MLflow is a view of it. When
MLflow never saw a finished run (it finished while the tracking server was lost with its
database, or its results were copied from a cluster), sync creates the run from the file:
the RunConfig's params and the parameter count, the final metrics (dev, per-language test,
averages, tokens) at the run's last step, the run's tags with its run id and the parent link,
result.json and config.json as artifacts, and status FINISHED at the time it finished.

Idempotent: a result whose run id MLflow already holds (tag `xstilts.run_id`) is left alone,
so a second sync creates nothing. A rebuilt run carries `xstilts.rebuilt_from` from its
creation and is marked FINISHED last, so a rebuild cut short (the run exists, not FINISHED)
is completed by the next sync, and RunWriter skips what the first attempt already wrote.
A training-loss history is not in result.json: only a buffer replay can bring that back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from xstilts.trainer.config import RunResult
from xstilts.trainer.rundir import ResultProblem, RunDir, read_result
from xstilts.trainer.tracking.buffer import RUN_ID_TAG, RunIdentity
from xstilts.trainer.tracking.mlflow_client import (
    Counts,
    RunWriter,
    artifact_location,
    first_line,
    is_rejection,
    open_client,
    resolve_run,
    resolve_tracking_uri,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

REBUILT_TAG = "xstilts.rebuilt_from"

RebuildStatus = Literal["rebuilt", "present", "failed", "unreadable"]


@dataclass
class RunRebuild:
    """What sync did with one run's result.json."""

    run_dir: Path
    status: RebuildStatus
    mlflow_run_id: str | None = None
    counts: Counts = field(default_factory=Counts)
    error: str | None = None

    def describe(self) -> str:
        if self.status == "present":
            return f"{self.run_dir}: already in MLflow"
        if self.status == "unreadable":
            return f"{self.run_dir}: {RunDir.RESULT} skipped: {self.error}"
        if self.status == "failed":
            return (f"{self.run_dir}: FAILED to rebuild its MLflow run from {RunDir.RESULT}: {self.error}"
                    " (sync again when MLflow is reachable)")
        c = self.counts
        text = (f"{self.run_dir}: rebuilt MLflow run {self.mlflow_run_id} from {RunDir.RESULT}: {c.params_logged}"
                f" params,"
                f" {c.metrics_logged} metrics, {c.artifacts_logged} artifacts")
        if c.artifacts_missing:
            text += f"; {c.artifacts_missing} artifact file(s) missing"
        if c.rejected:
            text += f"; {len(c.rejected)} refused by MLflow ({c.rejected[0]})"
        return text


def rebuild_runs(run_dirs: list[Path], tracking_uri: str | None = None) -> list[RunRebuild]:
    """Create the MLflow run of every run directory's result.json that MLflow lacks. The URI
    defaults to the one the run was configured with, else its storage root's local store."""
    outcomes: list[RunRebuild] = []
    groups: dict[tuple[str, str], list[tuple[Path, RunResult]]] = {}
    for run_dir in run_dirs:
        loaded = _load(run_dir)
        if isinstance(loaded, RunRebuild):
            outcomes.append(loaded)
            continue
        storage_root = run_dir.parent.parent  # <root>/runs/<id>, wherever the run was trained
        uri = resolve_tracking_uri(tracking_uri or RunIdentity.of(loaded.config).tracking_uri, storage_root)
        groups.setdefault((uri, loaded.config.tracking.experiment_name), []).append((run_dir, loaded))
    for (uri, experiment_name), members in groups.items():
        outcomes.extend(_rebuild_group(uri, experiment_name, members, tracking_uri))
    return sorted(outcomes, key=lambda o: o.run_dir)


def _load(run_dir: Path) -> RunResult | RunRebuild:
    try:
        result = read_result(RunDir(run_dir).result)
    except ResultProblem as e:
        return RunRebuild(run_dir, "unreadable", error=e.what)
    try:
        _epoch_ms(result.finished_at)
    except ValueError:
        return RunRebuild(run_dir, "unreadable", error=f"finished_at {result.finished_at!r} is not an ISO 8601 time")
    return result


def _rebuild_group(uri: str, experiment_name: str, members: list[tuple[Path, RunResult]],
                   shown_uri: str | None) -> list[RunRebuild]:
    """One experiment in one MLflow: a single search for the runs it holds, then a rebuild of
    each missing one. An error that is not MLflow refusing one run (the server is down) fails
    the rest of the group at once rather than once per run."""
    outcomes: list[RunRebuild] = []
    try:
        client = open_client(uri)
        held = _held_runs(client, experiment_name)
    except Exception as e:
        return [RunRebuild(run_dir, "failed", error=first_line(e, shown_uri)) for run_dir, _ in members]
    for i, (run_dir, result) in enumerate(members):
        if held.get(result.run_id, False):
            outcomes.append(RunRebuild(run_dir, "present"))
            continue
        outcome = RunRebuild(run_dir, "rebuilt")
        try:
            outcome.mlflow_run_id = _rebuild(client, uri, run_dir, result, outcome.counts)
        except Exception as e:
            outcome.status, outcome.error = "failed", first_line(e, shown_uri)
            if not is_rejection(e):
                outcomes.append(outcome)
                outcomes.extend(RunRebuild(d, "failed", error=outcome.error) for d, _ in members[i + 1:])
                break
        outcomes.append(outcome)
    return outcomes


def _held_runs(client: MlflowClient, experiment_name: str) -> dict[str, bool]:
    """The xstilts run ids the MLflow experiment has a run for, each with whether that run is
    complete: anything but a rebuild cut short (tagged as rebuilt, not FINISHED)."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return {}
    held: dict[str, bool] = {}
    page_token = None
    while True:
        page = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` != ''",
                                  max_results=1000, page_token=page_token)
        for run in page:
            complete = REBUILT_TAG not in run.data.tags or run.info.status == "FINISHED"
            run_id = run.data.tags[RUN_ID_TAG]
            held[run_id] = held.get(run_id, False) or complete
        page_token = page.token
        if not page_token:
            return held


def _rebuild(client: MlflowClient, uri: str, run_dir: Path, result: RunResult, counts: Counts) -> str:
    # config_params lives with the tracker, which imports this module (through sync).
    from xstilts.trainer.tracking.tracker import config_params

    finished = _epoch_ms(result.finished_at)
    identity = RunIdentity.of(result.config)
    identity = dataclasses.replace(
        identity, time=finished - int(result.wall_seconds * 1000),
        tags=identity.tags | {REBUILT_TAG: RunDir.RESULT},
        # The parent the run was given may live in another MLflow (a cluster's) or be lost with
        # the database: then the experiment's parent is found or created by its tags.
        parent_run_id=identity.parent_run_id if _is_run(client, identity.parent_run_id) else None)
    run_id: str = resolve_run(client, identity, artifact_location(uri))
    writer = RunWriter(client, run_id)
    writer.log_params(config_params(result.config) | {"parameter_count": str(result.parameter_count)}, counts)
    # The values the trainer logs when it writes result.json, at the same step.
    metrics = result.metrics | {"tokens_seen": float(result.tokens_seen),
                                "tokens_per_second": result.tokens_per_second}
    writer.log_metrics([{"metrics": metrics, "step": result.train_steps, "timestamp": finished}], counts)
    for path in (RunDir(run_dir).result, RunDir(run_dir).config):
        writer.log_artifact(path, None, counts)
    client.set_terminated(run_id, status="FINISHED", end_time=finished)
    counts.finished = "FINISHED"
    return run_id


def _is_run(client: MlflowClient, mlflow_run_id: str | None) -> bool:
    from mlflow.exceptions import MlflowException

    if not mlflow_run_id:
        return False
    try:
        stage: str = client.get_run(mlflow_run_id).info.lifecycle_stage
        return stage == "active"
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def _epoch_ms(iso_time: str) -> int:
    """finished_at (ISO 8601, UTC when it names no zone) in MLflow's milliseconds."""
    moment = datetime.fromisoformat(iso_time)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)
