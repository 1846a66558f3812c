"""The MLflow side of tracking: stores and clients, finding or creating the experiment, the
parent run and a run's child run by their tags, and RunWriter, which writes records to one
MLflow run skipping what it already holds (the basis of idempotent replay). mlflow is
imported inside functions only."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xstilts.trainer.rundir import file_lock
from xstilts.trainer.tracking.buffer import (
    EXPERIMENT_TAG,
    MLFLOW_PARENT_TAG,
    PARENT_TAG,
    RUN_ID_TAG,
    RunIdentity,
    scrub,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

LOCAL_STORE = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
# Set only where the environment does not already choose. MLflow's HTTP defaults (7 retries
# with exponential backoff, 120 s timeout) make a dead server cost minutes per call; anything
# that does not get through is buffered and replayed, so one quick retry is enough (a hung
# server costs about 2 x 10 s per attempt). And MLflow prints each finished run's URL, with any
# credentials the tracking URI carries, to stdout: not into training logs.
CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
# MLflow error codes that mean "the server understood and refuses": replaying cannot help.
# Everything else (connection errors, timeouts, 5xx, rate limits, auth) may heal, so it is
# buffered and retried.
_REJECTIONS = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "MALFORMED_REQUEST", "INVALID_STATE"})
# log_batch limits of the MLflow REST API.
_METRICS_PER_BATCH = 1000
_PARAMS_TAGS_PER_BATCH = 100


# --- stores ----------------------------------------------------------------------------------


def local_tracking_uri(storage_root: str | Path) -> str:
    """The embedded store of a storage root: a SQLite file beside the runs."""
    return f"sqlite:///{Path(storage_root).resolve() / LOCAL_STORE}"


def resolve_tracking_uri(tracking_uri: str | None, storage_root: str | Path) -> str:
    return tracking_uri or local_tracking_uri(storage_root)


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside it; MLflow's default (./mlruns under the working
    directory) would scatter them. A server decides for itself."""
    db = sqlite_path(uri)
    return (db.parent / LOCAL_ARTIFACTS).resolve().as_uri() if db else None


def open_client(tracking_uri: str) -> MlflowClient:
    """An MlflowClient with short HTTP timeouts; a SQLite store is created under a lock."""
    for name, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    db = sqlite_path(tracking_uri)
    if db is None:
        return MlflowClient(tracking_uri)
    with file_lock(db.with_name(db.name + ".lock")):
        return MlflowClient(tracking_uri)


def is_rejection(error: BaseException) -> bool:
    return getattr(error, "error_code", None) in _REJECTIONS


def first_line(error: BaseException, uri: str | None = None, limit: int = 240) -> str:
    """The error's first line, for a log line or a report, without the credentials of `uri`."""
    text = scrub(str(error), uri).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


# --- finding or creating experiments and runs ------------------------------------------------


def _quoted(value: str) -> str:
    """A value for an MLflow filter string. Names here are DNS labels and hex ids, but a
    value that would break out of its quotes is refused rather than trusted."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} contains both quote characters and cannot be searched for in MLflow")


def _oldest_run_id(client: MlflowClient, experiment_id: str, filter_string: str) -> str | None:
    """Several matches mean concurrent creators raced; all of them agree on the oldest."""
    runs = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000)
    if not runs:
        return None
    return str(min(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)).info.run_id)


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


def find_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            # MLflow 3's UI opens an experiment of this kind on its training-runs table (params,
            # metrics, grouping), not on the GenAI overview of traces
            return str(client.create_experiment(name, artifact_location=artifact_location,
                                                tags={EXPERIMENT_KIND_TAG: TRAINING_KIND}))
        except MlflowException as e:  # created by someone else since we looked
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise e from None
    if experiment.lifecycle_stage == "deleted":  # its name cannot be reused, so bring it back
        client.restore_experiment(experiment.experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return str(experiment.experiment_id)


def _find_or_create_parent(client: MlflowClient, experiment_id: str, experiment: str) -> str:
    search = f"tags.`{PARENT_TAG}` = 'true' AND tags.`{EXPERIMENT_TAG}` = {_quoted(experiment)}"
    found = _oldest_run_id(client, experiment_id, search)
    if found:
        return found
    created = client.create_run(experiment_id, tags={PARENT_TAG: "true", EXPERIMENT_TAG: experiment},
                                run_name=experiment).info.run_id
    winner = _oldest_run_id(client, experiment_id, search) or created
    if winner != created:  # another process created one first: keep only the oldest
        client.delete_run(created)
    return winner


def find_or_create_parent_run(tracking_uri: str | None, experiment_name: str, experiment: str, *,
                              storage_root: str | Path | None = None) -> str:
    """The experiment's parent run, found by its tags or created once: for the executor and
    the controller, which pass its id to every run (TrackingConfig.parent_run_id). With no
    tracking URI, the local store of `storage_root` is used. Raises MlflowException when
    MLflow is unreachable; runs given no parent id find or create it themselves."""
    if tracking_uri is None:
        if storage_root is None:
            raise ValueError("find_or_create_parent_run needs a tracking_uri, or a storage_root for the local store")
        tracking_uri = local_tracking_uri(storage_root)
    client = open_client(tracking_uri)
    experiment_id = find_or_create_experiment(client, experiment_name, artifact_location(tracking_uri))
    return _find_or_create_parent(client, experiment_id, experiment)


def resolve_run(client: MlflowClient, identity: RunIdentity, artifact_location: str | None) -> str:
    """The MLflow run of `identity`: found by its xstilts.run_id tag, or created (with the
    start time the run really started). Tags, parent link included, are (re)set either way."""
    from mlflow.entities import RunTag

    experiment_id = find_or_create_experiment(client, identity.experiment_name, artifact_location)
    parent = identity.parent_run_id or _find_or_create_parent(client, experiment_id, identity.experiment)
    tags = identity.tags | {MLFLOW_PARENT_TAG: parent}
    run_id = _oldest_run_id(client, experiment_id, f"tags.`{RUN_ID_TAG}` = {_quoted(identity.run_id)}")
    if run_id is None:
        run_id = client.create_run(experiment_id, start_time=identity.time, tags=tags,
                                   run_name=identity.run_name).info.run_id
    else:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return str(run_id)


# --- writing to one MLflow run, skipping what is already there --------------------------------


@dataclass
class Counts:
    params_logged: int = 0
    params_skipped: int = 0  # already in MLflow with the same value
    metrics_logged: int = 0
    metrics_skipped: int = 0  # a point for the same (key, step) already in MLflow
    tags_set: int = 0
    artifacts_logged: int = 0
    artifacts_missing: int = 0  # the file was gone when its record was replayed
    finished: str | None = None  # the terminal status set, if any
    rejected: list[str] = field(default_factory=list)  # what MLflow refused, with why

    def add(self, other: Counts) -> None:
        for name in ("params_logged", "params_skipped", "metrics_logged", "metrics_skipped", "tags_set",
                     "artifacts_logged", "artifacts_missing"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.finished = other.finished or self.finished
        self.rejected.extend(other.rejected)


class RunWriter:
    """One MLflow run and what it already holds, so that each write skips what is there."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        data = client.get_run(run_id).data
        self.params: dict[str, str] = dict(data.params)
        self.metric_keys = set(data.metrics)
        self.steps: dict[str, set[int]] = {}

    def _steps(self, key: str) -> set[int]:
        if key not in self.steps:  # one history request per key the run already had
            history = self.client.get_metric_history(self.run_id, key) if key in self.metric_keys else []
            self.steps[key] = {m.step for m in history}
        return self.steps[key]

    def apply(self, record: dict[str, Any], run_dir: Path, counts: Counts) -> None:
        kind = record["kind"]
        if kind == "params":
            self.log_params(record["params"], counts)
        elif kind == "metrics":
            self.log_metrics([record], counts)
        elif kind == "tags":
            self.set_tags(record["tags"], counts)
        elif kind == "artifact":
            self.log_artifact(_artifact_file(record, run_dir), record.get("artifact_path"), counts)
        elif kind == "finish":
            self.client.set_terminated(self.run_id, status=record["status"], end_time=int(record["time"]))
            counts.finished = record["status"]
        else:
            raise ValueError(f"unknown record kind {kind!r}")

    def log_params(self, params: dict[str, str], counts: Counts) -> None:
        from mlflow.entities import Param

        new: dict[str, str] = {}
        for key, value in params.items():
            if key not in self.params:
                new[key] = value
            elif self.params[key] == value:
                counts.params_skipped += 1
            else:  # MLflow params are write-once; sending it would fail the whole batch
                counts.rejected.append(f"param {key}: MLflow has {self.params[key]!r}, not {value!r}")
        items = list(new.items())
        for i in range(0, len(items), _PARAMS_TAGS_PER_BATCH):
            chunk = items[i:i + _PARAMS_TAGS_PER_BATCH]
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk])
            self.params.update(chunk)
            counts.params_logged += len(chunk)

    def log_metrics(self, records: list[dict[str, Any]], counts: Counts) -> None:
        """Metric records, in as few requests as MLflow allows. A (key, step) that MLflow, or an
        earlier record of the batch, already has is skipped: the first value stays."""
        from mlflow.entities import Metric

        points: list[Metric] = []
        batch: dict[str, set[int]] = {}
        for record in records:
            step, timestamp = int(record["step"]), int(record["timestamp"])
            for key, value in record["metrics"].items():
                if step in self._steps(key) or step in batch.setdefault(key, set()):
                    counts.metrics_skipped += 1
                else:
                    batch[key].add(step)
                    points.append(Metric(key, float(value), timestamp, step))
        for i in range(0, len(points), _METRICS_PER_BATCH):
            chunk = points[i:i + _METRICS_PER_BATCH]
            self.client.log_batch(self.run_id, metrics=chunk)
            for point in chunk:
                self._steps(point.key).add(point.step)
            counts.metrics_logged += len(chunk)

    def set_tags(self, tags: dict[str, str], counts: Counts) -> None:
        from mlflow.entities import RunTag

        items = list(tags.items())
        for i in range(0, len(items), _PARAMS_TAGS_PER_BATCH):
            chunk = items[i:i + _PARAMS_TAGS_PER_BATCH]
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in chunk])
            counts.tags_set += len(chunk)

    def log_artifact(self, path: Path, artifact_path: str | None, counts: Counts) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path or path.name)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)
        else:
            counts.artifacts_missing += 1
            return
        counts.artifacts_logged += 1


def _artifact_file(record: dict[str, Any], run_dir: Path) -> Path:
    path = Path(record["path"])
    return run_dir / path if record.get("relative") else path
