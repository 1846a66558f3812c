"""MLflow tracking for one run, resilient to tracking-server outages, and `xstilts sync`.

Layout in MLflow (DESIGN.md): one MLflow experiment per xstilts experiment, one parent run
for the experiment (tags `xstilts.parent=true`, `xstilts.experiment=<name>`), and one child
run per training run, tagged `xstilts.run_id=<run id>` and linked by `mlflow.parentRunId`.
Runs are found by these tags, never remembered, so a retried or resumed run (same run id)
writes to the same MLflow run.

Outages. Every write first goes to MLflow; if MLflow cannot be reached, the tracker goes
offline and appends every call (start, params, metrics with step and timestamp, tags,
artifacts by path, finish status) to `<run_dir>/mlflow-buffer.jsonl`. Training never waits
long: HTTP retries and timeouts are cut to seconds (see `_HTTP_DEFAULTS`), and while offline
the tracker tries to reconnect only every `retry_after_seconds` (doubling up to 10 minutes).
Reconnecting, `finish()` and `xstilts sync` replay the buffer with `sync_run_dir`:

- Replay is idempotent. A metric point whose (key, step) MLflow already has is skipped, a
  param that MLflow already holds with the same value is skipped, tags and artifacts are
  overwritten with the same content. So a crash in the middle of a sync, or a second sync of
  the same records, duplicates nothing.
- The buffer is append-only; a sibling marker `mlflow-buffer.synced.json` holds the byte
  offset up to which records have reached MLflow and is replaced atomically (write, fsync,
  rename) only after they did. Nothing is lost if sync crashes: the records after the marker
  are replayed next time. A flock on `mlflow-buffer.lock` keeps two syncs of one buffer apart.
- Records MLflow refuses for good (a param changed value, a malformed key) are counted as
  rejected and left in the buffer file for inspection; they do not block later records.

One point per step. MLflow's metric history is append-only, so a resumed run that re-logs a
step (it restarts from an older checkpoint) must not log it again: the first value logged for
a (key, step) stays and later ones are skipped, live and in replay. On a deterministic resume
the values are the same anyway. Metrics logged without a step count as step 0.

Store. A RunConfig without a tracking URI uses `sqlite:///<storage_root>/mlflow.db`, with
artifacts under `<storage_root>/mlartifacts`. MLflow 3 deprecates the file store (`./mlruns`);
SQLite is its default backend, and it serialises concurrent writers (several local runs
logging at once) with its file lock. What SQLite cannot do is let two processes create the
schema at once (its alembic migration races), so opening a SQLite store holds a flock beside
the database while MLflow creates or checks the tables.

URIs may carry credentials (`https://user:token@host`); buffers and log lines keep only the
URI without them, and replay takes credentials from MLflow's own environment variables
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN).

mlflow is imported lazily: the operator's CLI imports this module without the training stack.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from xstilts.trainer.config import RUNS_DIR, RunConfig

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

BUFFER_FILE = "mlflow-buffer.jsonl"
SYNCED_MARKER = "mlflow-buffer.synced.json"
BUFFER_LOCK = "mlflow-buffer.lock"
LOCAL_STORE = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"

RUN_ID_TAG = "xstilts.run_id"
STAGE_TAG = "xstilts.stage"
MODEL_TAG = "xstilts.model"
INTERMEDIATE_TAG = "xstilts.intermediate"
TARGET_TAG = "xstilts.target"
EXPERIMENT_TAG = "xstilts.experiment"
PARENT_TAG = "xstilts.parent"
MLFLOW_PARENT_TAG = "mlflow.parentRunId"

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
MAX_RETRY_INTERVAL = 600.0
# MLflow's defaults (7 retries with exponential backoff, 120 s timeout) make a dead server cost
# minutes per call. Anything that does not get through is buffered and replayed, so one quick
# retry is enough. Set only where the environment does not already choose.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# MLflow error codes that mean "the server understood and refuses": replaying cannot help.
# Everything else (connection errors, timeouts, 5xx, rate limits, auth) may heal, so it is
# buffered and retried.
_REJECTIONS = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "MALFORMED_REQUEST", "INVALID_STATE"})
# log_batch limits of the MLflow REST API.
_METRICS_PER_BATCH = 1000
_PARAMS_TAGS_PER_BATCH = 100
_HEX_RUN_ID = re.compile(r"^[0-9a-f]{6,64}$")


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- stores ----------------------------------------------------------------------------------


def local_tracking_uri(storage_root: str | Path) -> str:
    """The embedded store of a storage root: a SQLite file beside the runs."""
    return f"sqlite:///{Path(storage_root).resolve() / LOCAL_STORE}"


def resolve_tracking_uri(tracking_uri: str | None, storage_root: str | Path) -> str:
    return tracking_uri or local_tracking_uri(storage_root)


def redact_uri(uri: str) -> str:
    """The URI without user:password, for files and log lines."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside it; MLflow's default (./mlruns under the working
    directory) would scatter them. A server decides for itself."""
    db = _sqlite_path(uri)
    return (db.parent / LOCAL_ARTIFACTS).resolve().as_uri() if db else None


@contextlib.contextmanager
def _flock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive flock on `path` (created if missing); yields False if `blocking` is False
    and another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_client(tracking_uri: str) -> MlflowClient:
    """An MlflowClient with short HTTP timeouts; a SQLite store is created under a lock."""
    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    db = _sqlite_path(tracking_uri)
    if db is None:
        return MlflowClient(tracking_uri)
    with _flock(db.with_name(db.name + ".lock")):
        return MlflowClient(tracking_uri)


def _is_rejection(error: BaseException) -> bool:
    return getattr(error, "error_code", None) in _REJECTIONS


def _first_line(error: BaseException, limit: int = 240) -> str:
    text = str(error).strip().splitlines()
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
    return min(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)).info.run_id


def find_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as e:  # created by someone else since we looked
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise e from None
    if experiment.lifecycle_stage == "deleted":  # its name cannot be reused, so bring it back
        client.restore_experiment(experiment.experiment_id)
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
    experiment_id = find_or_create_experiment(client, experiment_name, _artifact_location(tracking_uri))
    return _find_or_create_parent(client, experiment_id, experiment)


@dataclass(frozen=True)
class RunIdentity:
    """What finds (or creates) a run's MLflow run; also the buffer's `start` record."""

    run_id: str
    experiment_name: str
    experiment: str
    parent_run_id: str | None
    run_name: str
    tags: dict[str, str]
    tracking_uri: str | None  # None: the local store of the run's storage root
    time: int = field(default_factory=_now_ms)

    @classmethod
    def of(cls, config: RunConfig) -> RunIdentity:
        labels = config.labels
        tags = {RUN_ID_TAG: config.run_id, STAGE_TAG: config.stage.value}
        if labels:
            tags |= {EXPERIMENT_TAG: labels.experiment, MODEL_TAG: labels.model,
                     INTERMEDIATE_TAG: labels.intermediate}
            if labels.target:
                tags[TARGET_TAG] = labels.target
            name = "/".join([labels.model, labels.intermediate, labels.target or "-", f"seed{config.seed}"])
        else:
            tags |= {EXPERIMENT_TAG: config.tracking.experiment_name, MODEL_TAG: config.model}
            name = f"{'+'.join(config.tasks)}/seed{config.seed}"
        uri = config.tracking.tracking_uri
        return cls(run_id=config.run_id, experiment_name=config.tracking.experiment_name,
                   experiment=tags[EXPERIMENT_TAG], parent_run_id=config.tracking.parent_run_id,
                   run_name=f"{name}/{config.run_id}", tags=tags,
                   tracking_uri=redact_uri(uri) if uri else None)

    def to_record(self) -> dict[str, Any]:
        return {"kind": "start", "run_id": self.run_id, "experiment_name": self.experiment_name,
                "experiment": self.experiment, "parent_run_id": self.parent_run_id, "run_name": self.run_name,
                "tags": self.tags, "tracking_uri": self.tracking_uri, "time": self.time}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RunIdentity:
        run_id = record["run_id"]
        if not isinstance(run_id, str) or not _HEX_RUN_ID.match(run_id):
            raise ValueError(f"run_id {run_id!r} is not a run id")
        return cls(run_id=run_id, experiment_name=str(record["experiment_name"]),
                   experiment=str(record["experiment"]), parent_run_id=record.get("parent_run_id"),
                   run_name=str(record["run_name"]), tags={str(k): str(v) for k, v in record["tags"].items()},
                   tracking_uri=record.get("tracking_uri"), time=int(record["time"]))


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


class _MlflowRun:
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
            self.log_metrics(record["metrics"], int(record["step"]), int(record["timestamp"]), counts)
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

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp: int, counts: Counts) -> None:
        from mlflow.entities import Metric

        points = []
        for key, value in metrics.items():
            if step in self._steps(key):
                counts.metrics_skipped += 1
            else:
                points.append(Metric(key, float(value), timestamp, step))
        for i in range(0, len(points), _METRICS_PER_BATCH):
            chunk = points[i:i + _METRICS_PER_BATCH]
            self.client.log_batch(self.run_id, metrics=chunk)
            for point in chunk:
                self._steps(point.key).add(step)
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


# --- the buffer --------------------------------------------------------------------------------


@dataclass
class _Pending:
    context: dict[str, Any] | None  # the last start record before the first pending one
    records: list[tuple[int, dict[str, Any]]]  # (byte offset just after the record, record)
    corrupt: int  # complete lines that are not records (a torn write later appended to)


class Buffer:
    """`<run_dir>/mlflow-buffer.jsonl`: an append-only log of tracking calls made while MLflow
    was unreachable, and the atomically replaced marker of how much of it reached MLflow."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / BUFFER_FILE
        self.marker = run_dir / SYNCED_MARKER
        self._tail_checked = False

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as handle:
            if not self._tail_checked:
                # A process killed mid-write leaves a line without its newline; end it, so that
                # this record is not glued to it (the torn line is then skipped as corrupt).
                if self._ends_torn():
                    handle.write(b"\n")
                self._tail_checked = True
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def _ends_torn(self) -> bool:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                if handle.tell() == 0:
                    return False
                handle.seek(-1, os.SEEK_END)
                return handle.read(1) != b"\n"
        except FileNotFoundError:
            return False

    def _synced_offset(self) -> int:
        try:
            marker = json.loads(self.marker.read_text(encoding="utf-8"))
            inode = os.stat(self.path).st_ino
        except (OSError, ValueError):
            return 0
        # A marker of an older buffer file (deleted and started again) does not apply.
        if not isinstance(marker, dict) or marker.get("inode") != inode:
            return 0
        offset = marker.get("offset")
        return offset if isinstance(offset, int) and offset >= 0 else 0

    def mark_synced(self, offset: int) -> None:
        body = json.dumps({"offset": offset, "inode": os.stat(self.path).st_ino, "synced_at": _now_ms()})
        fd, tmp = tempfile.mkstemp(dir=self.run_dir, prefix=f".{SYNCED_MARKER}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(body)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.marker)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def pending(self) -> _Pending:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return _Pending(None, [], 0)
        synced = self._synced_offset()
        if synced > len(data):
            synced = 0
        context: dict[str, Any] | None = None
        records: list[tuple[int, dict[str, Any]]] = []
        corrupt, start = 0, 0
        while (end := data.find(b"\n", start)) != -1:
            line, start = data[start:end], end + 1
            if not line.strip():
                continue
            record = parse_record(line)
            if start <= synced:
                if record is not None and record["kind"] == "start":
                    context = record
            elif record is None:
                corrupt += 1
            else:
                records.append((start, record))
        return _Pending(context, records, corrupt)

    def has_pending(self) -> bool:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return False
        return size > self._synced_offset() and bool(self.pending().records)


def _str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _valid(record: dict[str, Any]) -> bool:
    """The record has every field its kind needs, with the right types: checked before
    replay, so that an error while replaying is always MLflow's, never the record's."""
    kind = record.get("kind")
    if kind == "start":
        try:
            RunIdentity.from_record(record)
        except (KeyError, TypeError, ValueError, AttributeError):
            return False
        return True
    if kind in ("params", "tags"):
        return _str_map(record.get(kind))
    if kind == "metrics":
        metrics = record.get("metrics")
        return (isinstance(metrics, dict) and _is_int(record.get("step")) and _is_int(record.get("timestamp"))
                and all(isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
                        for k, v in metrics.items()))
    if kind == "artifact":
        return isinstance(record.get("path"), str) and isinstance(record.get("artifact_path"), str | None)
    if kind == "finish":
        return record.get("status") in TERMINAL_STATUSES and _is_int(record.get("time"))
    return False


def parse_record(line: bytes) -> dict[str, Any] | None:
    """One buffer line as a record, or None if it is not a well-formed one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and _valid(record) else None


# --- sync ------------------------------------------------------------------------------------


SyncStatus = Literal["synced", "up-to-date", "busy", "failed"]


@dataclass
class RunSync:
    """What syncing one run directory's buffer did."""

    run_dir: Path
    status: SyncStatus
    mlflow_run_id: str | None = None
    counts: Counts = field(default_factory=Counts)
    corrupt_lines: int = 0
    error: str | None = None

    def describe(self) -> str:
        c = self.counts
        if self.status == "busy":
            return f"{self.run_dir}: skipped, another sync of this buffer is running"
        if self.status == "up-to-date":
            return f"{self.run_dir}: up to date"
        parts = [f"{c.params_logged} params", f"{c.metrics_logged} metric points", f"{c.tags_set} tags",
                 f"{c.artifacts_logged} artifacts"]
        skipped = c.params_skipped + c.metrics_skipped
        text = f"{self.run_dir}: " + ("" if self.status == "synced" else "partly ") + "synced " + ", ".join(parts)
        if self.mlflow_run_id:
            text += f" to MLflow run {self.mlflow_run_id}"
        if skipped:
            text += f"; {skipped} already there"
        if c.finished:
            text += f"; marked {c.finished}"
        if c.artifacts_missing:
            text += f"; {c.artifacts_missing} artifact file(s) no longer exist"
        if c.rejected:
            text += f"; {len(c.rejected)} refused by MLflow ({c.rejected[0]})"
        if self.corrupt_lines:
            text += f"; {self.corrupt_lines} unreadable buffer line(s) skipped"
        if self.status == "failed":
            text += f"; FAILED: {self.error} (the rest stays buffered: sync again when MLflow is reachable)"
        return text


@dataclass
class SyncReport:
    runs: list[RunSync] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing failed: every buffered record reached MLflow or was refused for good."""
        return all(r.status != "failed" for r in self.runs)

    @property
    def counts(self) -> Counts:
        total = Counts()
        for r in self.runs:
            total.add(r.counts)
        return total

    def count(self, status: SyncStatus) -> int:
        return sum(1 for r in self.runs if r.status == status)

    def lines(self) -> list[str]:
        """One line per run that did anything, then a summary."""
        out = [r.describe() for r in self.runs if r.status != "up-to-date"]
        if not self.runs:
            return ["no buffered MLflow records found"]
        out.append(f"{len(self.runs)} buffered run(s): {self.count('synced')} synced, "
                   f"{self.count('up-to-date')} up to date, {self.count('busy')} busy, {self.count('failed')} failed")
        return out


def sync_run_dir(run_dir: Path, tracking_uri: str | None = None) -> SyncReport:
    """Replay the run directory's buffer into MLflow (see the module docstring). The URI
    defaults to the one the run was configured with, else the storage root's local store."""
    return SyncReport([_sync_one(Path(run_dir), tracking_uri)])


def sync_storage(storage_root: Path, tracking_uri: str | None = None) -> SyncReport:
    """Sync every run that has a buffer under a storage root (`<root>/runs/*`), or under a
    directory of storage roots (`<dir>/*/runs/*`, e.g. the default `xstilts-out`)."""
    root = Path(storage_root)
    buffers = sorted({*root.glob(f"{RUNS_DIR}/*/{BUFFER_FILE}"), *root.glob(f"*/{RUNS_DIR}/*/{BUFFER_FILE}")})
    return SyncReport([_sync_one(b.parent, tracking_uri) for b in buffers])


def _sync_one(run_dir: Path, tracking_uri: str | None) -> RunSync:
    buffer = Buffer(run_dir)
    if not buffer.path.exists():
        return RunSync(run_dir, "up-to-date")
    with _flock(run_dir / BUFFER_LOCK, blocking=False) as acquired:
        if not acquired:
            return RunSync(run_dir, "busy")
        pending = buffer.pending()
        result = RunSync(run_dir, "synced", corrupt_lines=pending.corrupt)
        if not pending.records:
            result.status = "up-to-date"
            return result
        storage_root = run_dir.parent.parent  # <root>/runs/<id>
        clients: dict[str, MlflowClient] = {}
        run: _MlflowRun | None = None
        context = pending.context
        synced_to: int | None = None
        try:
            for end, record in pending.records:
                if record["kind"] == "start":
                    context, run = record, None
                if context is None:  # its start record was lost: no way to know the run
                    result.counts.rejected.append(f"{record['kind']} record with no start record before it")
                    synced_to = end
                    continue
                try:
                    if run is None:
                        identity = RunIdentity.from_record(context)
                        uri = resolve_tracking_uri(tracking_uri or identity.tracking_uri, storage_root)
                        if uri not in clients:
                            clients[uri] = open_client(uri)
                        run = _MlflowRun(clients[uri], resolve_run(clients[uri], identity, _artifact_location(uri)))
                        result.mlflow_run_id = run.run_id
                    if record["kind"] != "start":
                        run.apply(record, run_dir, result.counts)
                except Exception as e:
                    if not _is_rejection(e):
                        raise
                    result.counts.rejected.append(f"{record['kind']} record: {_first_line(e)}")
                synced_to = end
        except Exception as e:  # MLflow unreachable or failing: keep what is not yet synced
            result.status, result.error = "failed", _first_line(e)
        if synced_to is not None:
            buffer.mark_synced(synced_to)
        return result


# --- the tracker -----------------------------------------------------------------------------


def config_params(config: RunConfig) -> dict[str, str]:
    """The RunConfig as flat MLflow params (`hyperparameters.learning_rate`, ...). Paths and
    tracking settings are left out: they say where a run ran, not what it was."""
    doc = config.model_dump(mode="json", exclude={"storage_root", "task_data", "tracking"})
    flat: dict[str, str] = {"run_id": config.run_id}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif isinstance(value, list):
            flat[prefix] = ",".join(str(v) for v in value)
        else:
            flat[prefix] = "" if value is None else str(value)

    walk("", doc)
    return flat


def local_run_dir(config: RunConfig) -> Path:
    """Where the run's buffer lives: its run directory, or for an object-store storage root
    (s3://...) a directory in the local temp dir (it survives a process, not the machine)."""
    if "://" not in config.storage_root:
        return Path(config.run_dir)
    return Path(tempfile.gettempdir()) / "xstilts-mlflow-buffer" / config.run_id


class RunTracker:
    """MLflow logging of one training run; never raises for MLflow's sake and never makes
    training wait more than seconds (see the module docstring). With `enabled=False` (every
    rank but 0 of a distributed run) each method is a no-op."""

    def __init__(self, config: RunConfig, enabled: bool = True, *, retry_after_seconds: float = 30.0,
                 buffer_dir: Path | None = None) -> None:
        self.enabled = enabled
        self._identity = RunIdentity.of(config)
        self._buffer = Buffer(buffer_dir or local_run_dir(config))
        # A local store needs a local directory: the storage root, or for an object store the
        # directory that holds the buffer.
        local_root = config.storage_root if "://" not in config.storage_root else self._buffer.run_dir
        self._uri = resolve_tracking_uri(config.tracking.tracking_uri, local_root)
        self._retry_after = retry_after_seconds
        self._interval = retry_after_seconds
        self._next_attempt = 0.0
        self._run: _MlflowRun | None = None  # set while MLflow is reachable
        self._outage = False  # an outage has been reported and not yet its end
        self._started = self._finished = self._start_buffered = self._buffer_broken = False

    @property
    def mlflow_run_id(self) -> str | None:
        return self._run.run_id if self._run else None

    @property
    def online(self) -> bool:
        return self._run is not None

    @property
    def buffer_path(self) -> Path:
        return self._buffer.path

    def start(self) -> str | None:
        """Find or create this run's MLflow run (and the experiment and parent run) and mark it
        RUNNING; records an earlier attempt left buffered are replayed first. Returns the
        MLflow run id, or None when MLflow is unreachable: the start is then buffered, and so
        is every call until MLflow can be reached again."""
        if not self.enabled:
            return None
        if not self._started:
            self._started = True
            self._connect(starting=True)
            if self._run is None:
                self._append_start()
        return self.mlflow_run_id

    def log_params(self, params: dict[str, Any]) -> None:
        self._record({"kind": "params", "params": {str(k): "" if v is None else str(v) for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log metric values at `step` (None: step 0). A (key, step) already logged keeps its
        first value; a later one is skipped."""
        self._record({"kind": "metrics", "metrics": {str(k): float(v) for k, v in metrics.items()},
                      "step": int(step or 0), "timestamp": _now_ms()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._record({"kind": "tags", "tags": {str(k): str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a directory. Buffered by path: a replay uploads the file as it is
        then. Paths inside the run directory are buffered relative to it."""
        path = Path(path).resolve()
        record: dict[str, Any] = {"kind": "artifact", "path": str(path), "artifact_path": artifact_path}
        with contextlib.suppress(ValueError):
            record |= {"path": str(path.relative_to(self._buffer.run_dir.resolve())), "relative": True}
        self._record(record)

    def finish(self, status: str = "FINISHED") -> None:
        """Set the run's terminal status, then try to replay whatever is still buffered."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(TERMINAL_STATUSES)}")
        if not self.enabled or self._finished:
            return
        self._record({"kind": "finish", "status": status, "time": _now_ms()})
        self._finished = True
        if self._buffer.has_pending():
            self._connect(starting=False)
        if self._buffer.has_pending():
            log.warning("MLflow records of run %s stay buffered in %s; run `xstilts sync` once %s is reachable",
                        self._identity.run_id, self._buffer.path, redact_uri(self._uri))

    # --- delivery ---

    def _record(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if not self._started:
            self.start()
        if self._run is None and time.monotonic() >= self._next_attempt:
            self._connect(starting=False)
        if self._run is not None:
            try:
                counts = Counts()
                self._run.apply(record, self._buffer.run_dir, counts)
                for reason in counts.rejected:
                    log.warning("MLflow refused %s of run %s", reason, self._identity.run_id)
                if counts.artifacts_missing:
                    log.warning("artifact %s does not exist; not logged", record.get("path"))
                return
            except Exception as e:
                if _is_rejection(e):
                    log.warning("MLflow refused a %s record of run %s: %s", record["kind"], self._identity.run_id,
                                _first_line(e))
                    return
                self._go_offline(e)
        self._append_start()
        self._append(record)

    def _connect(self, starting: bool) -> None:
        """Replay the buffer if it holds anything, then write live. `starting` also marks the
        MLflow run RUNNING (a resumed run was FAILED or KILLED); a reconnect mid-run, or at
        finish, leaves the status the replay set."""
        try:
            if self._buffer.has_pending():
                outcome = sync_run_dir(self._buffer.run_dir, tracking_uri=self._uri).runs[0]
                if outcome.status in ("failed", "busy"):
                    raise ConnectionError(outcome.error or "another sync of this buffer is running")
            client = open_client(self._uri)
            run_id = resolve_run(client, self._identity, _artifact_location(self._uri))
            if starting:
                client.update_run(run_id, status="RUNNING")
            self._run = _MlflowRun(client, run_id)
        except Exception as e:
            self._go_offline(e)
            return
        self._interval = self._retry_after
        self._start_buffered = False  # a later outage's records get their own start record
        if self._outage:
            self._outage = False
            log.warning("MLflow at %s is reachable again; buffered records of run %s are synced",
                        redact_uri(self._uri), self._identity.run_id)

    def _go_offline(self, error: BaseException) -> None:
        if not self._outage:
            self._outage = True
            log.warning("MLflow at %s is unreachable (%s); run %s goes on and buffers its records in %s",
                        redact_uri(self._uri), _first_line(error), self._identity.run_id, self._buffer.path)
        self._run = None
        self._next_attempt = time.monotonic() + self._interval
        self._interval = min(self._interval * 2, MAX_RETRY_INTERVAL)

    def _append_start(self) -> None:
        """Every process that buffers writes its start record first: replay finds or creates
        the run from it."""
        if not self._start_buffered:
            self._append(self._identity.to_record())
            self._start_buffered = True

    def _append(self, record: dict[str, Any]) -> None:
        try:
            self._buffer.append(record)
        except OSError as e:  # the run's disk is full or gone: training still goes on
            if not self._buffer_broken:
                self._buffer_broken = True
                log.error("cannot write the MLflow buffer %s (%s); tracking records are being lost",
                          self._buffer.path, e.strerror or e)
