"""MLflow tracking for one run, resilient to tracking-server outages, and `xstilts sync`.

Layout in MLflow: one MLflow experiment per xstilts experiment, one parent run
for the experiment (tags `xstilts.parent=true`, `xstilts.experiment=<name>`), and one child
run per training run, tagged `xstilts.run_id=<run id>` and linked by `mlflow.parentRunId`.
Runs are found by these tags, never remembered, so a retried or resumed run (same run id)
writes to the same MLflow run.

Outages. Every write goes to MLflow first; if MLflow cannot be reached, the tracker goes
offline and appends every call (start, params, metrics with step and timestamp, tags,
artifacts by path, finish status) to `<run_dir>/mlflow-buffer.jsonl`. Training never waits
long: HTTP retries and timeouts are cut to seconds (`mlflow_client.CLIENT_DEFAULTS`: a
refused connection costs milliseconds, a hung server about 20 s), and while offline the
tracker tries again only every `retry_after_seconds`, doubling up to 10 minutes.
Reconnecting, `finish()` and `xstilts sync` replay the buffer (`sync`):

- Replay is idempotent. A metric point whose (key, step) MLflow already has is skipped, a
  param MLflow already holds with the same value is skipped, tags and artifacts are written
  again with the same content. A crash in the middle of a sync, or a second sync of the same
  records, duplicates nothing.
- The buffer is append-only; a marker beside it (`mlflow-buffer.synced.json`) holds the byte
  offset up to which records have reached MLflow, and is replaced atomically (write, fsync,
  rename) only after they did. If sync crashes, the records after the marker are replayed
  next time: nothing is lost. A flock on `mlflow-buffer.lock` keeps two syncs of one buffer
  apart (the second reports "busy").
- Records MLflow refuses for good (a param that changed value, an invalid key) are reported
  and stay in the buffer file for inspection; they do not block the records after them.

One point per step. MLflow's metric history is append-only, so a resumed run that re-logs a
step (it restarts from an older checkpoint) must not log it again: the first value logged for
a (key, step) stays and later ones are skipped, live and in replay. On a deterministic resume
the values are equal anyway. Metrics logged without a step count as step 0.

Off the training thread. Metric logs (every few steps of training) are delivered by a
background thread from a queue, so a training step never waits for MLflow, a slow server or
the buffer file. Every other call (params, tags, artifacts, finish) and the properties first
wait until the metrics queued before them are delivered: records keep their order, and what a
caller reads afterwards (online, the buffer) includes them.

Store. A RunConfig without a tracking URI uses `sqlite:///<storage_root>/mlflow.db`, with
artifacts under `<storage_root>/mlartifacts` (the same store `xstilts run` sets up). MLflow 3
deprecates the file store (`./mlruns`) and defaults to SQLite, which serialises concurrent
writers (several local runs logging at once) with its own lock. What SQLite cannot do is let
two processes create the schema at once (MLflow's alembic migration races and one fails), so
opening a SQLite store holds a flock beside the database while MLflow creates or checks the
tables. A storage root in an object store (s3://...) keeps the buffer, and the local store if
no URI is given, in the local temp dir instead.

Secrets. URIs may carry credentials (`https://user:token@host`). Buffers, log lines and sync
reports keep the URI without them, MLflow's printing of run URLs is turned off, and replay
takes credentials from MLflow's own environment variables (MLFLOW_TRACKING_USERNAME,
MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN), which is where Secrets should put them.

Modules of this package: `buffer` (the buffer file and its records; no mlflow), `mlflow_client`
(clients, finding or creating experiments and runs, idempotent writes), `sync`
(replay and its report), and this one (the tracker the trainer uses). mlflow is imported
lazily everywhere: the operator's CLI imports `sync_storage` without the training stack.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from xstilts.trainer.config import RunConfig
from xstilts.trainer.tracking.buffer import TERMINAL_STATUSES, Buffer, RunIdentity, now_ms, redact_uri
from xstilts.trainer.tracking.mlflow_client import (
    Counts,
    RunWriter,
    artifact_location,
    find_or_create_parent_run,
    first_line,
    is_rejection,
    local_tracking_uri,
    open_client,
    resolve_run,
    resolve_tracking_uri,
)
from xstilts.trainer.tracking.sync import RunSync, SyncReport, sync_run_dir, sync_storage

__all__ = [
    "RunSync",
    "RunTracker",
    "SyncReport",
    "config_params",
    "find_or_create_parent_run",
    "local_run_dir",
    "local_tracking_uri",
    "sync_run_dir",
    "sync_storage",
]

log = logging.getLogger(__name__)

MAX_RETRY_INTERVAL = 600.0


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
    return Path(tempfile.gettempdir(), "xstilts-mlflow-buffer", str(config.run_id))


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
        self._run: RunWriter | None = None  # set while MLflow is reachable
        self._outage = False  # an outage has been reported and not yet its end
        self._started = self._finished = self._start_buffered = self._buffer_broken = False
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()  # metric records for the delivery thread
        self._delivery: threading.Thread | None = None

    @property
    def mlflow_run_id(self) -> str | None:
        self.flush()
        return self._run.run_id if self._run else None

    @property
    def online(self) -> bool:
        self.flush()
        return self._run is not None

    @property
    def buffer_path(self) -> Path:
        self.flush()
        return Path(self._buffer.path)

    def flush(self) -> None:
        """Wait until the metrics logged so far are delivered (to MLflow or the buffer)."""
        if self._delivery is not None and threading.current_thread() is not self._delivery:
            self._queue.join()

    def start(self) -> str | None:
        """Find or create this run's MLflow run (and the experiment and parent run) and mark it
        RUNNING; records an earlier attempt left buffered are replayed first. Returns the
        MLflow run id, or None when MLflow is unreachable: the start is then buffered, and so
        is every call until MLflow can be reached again."""
        if not self.enabled:
            return None
        self.flush()
        if not self._started:
            self._started = True
            self._connect(starting=True)
            if self._run is None:
                self._append_start()
        return self.mlflow_run_id

    def log_params(self, params: dict[str, Any]) -> None:
        self.flush()
        self._record({"kind": "params", "params": {str(k): "" if v is None else str(v) for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log metric values at `step` (None: step 0). A (key, step) already logged keeps its
        first value; a later one is skipped. Returns at once: the delivery thread writes it."""
        if not self.enabled:
            return
        if self._delivery is None:
            self._delivery = threading.Thread(target=self._deliver, name="xstilts-mlflow", daemon=True)
            self._delivery.start()
        self._queue.put({"kind": "metrics", "metrics": {str(k): float(v) for k, v in metrics.items()},
                         "step": int(step or 0), "timestamp": now_ms()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.flush()
        self._record({"kind": "tags", "tags": {str(k): str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a directory. Buffered by path: a replay uploads the file as it is
        then. Paths inside the run directory are buffered relative to it."""
        self.flush()
        path = Path(path).resolve()
        record: dict[str, Any] = {"kind": "artifact", "path": str(path), "artifact_path": artifact_path}
        with contextlib.suppress(ValueError):
            record |= {"path": str(path.relative_to(self._buffer.run_dir.resolve())), "relative": True}
        self._record(record)

    def finish(self, status: str = "FINISHED") -> None:
        """Set the run's terminal status, then try to replay whatever is still buffered; not
        for KILLED (a preempted run within its grace period: the retry replays at its start)."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(TERMINAL_STATUSES)}")
        if not self.enabled or self._finished:
            return
        self.flush()
        self._record({"kind": "finish", "status": status, "time": now_ms()})
        self._finished = True
        if status != "KILLED" and self._buffer.has_pending():
            self._connect(starting=False)
        if self._buffer.has_pending():
            log.warning("MLflow records of run %s stay buffered in %s; run `xstilts sync` once %s is reachable",
                        self._identity.run_id, self._buffer.path, redact_uri(self._uri))

    # --- delivery ---

    def _deliver(self) -> None:
        """The delivery thread: metric records from the queue, in order, for the life of the
        process (a daemon: a process that dies loses only what it had not delivered yet)."""
        while True:
            record = self._queue.get()
            try:
                self._record(record)
            except Exception:  # _record contains MLflow's failures; anything else must not stop delivery
                log.exception("cannot deliver a metrics record of run %s", self._identity.run_id)
            finally:
                self._queue.task_done()

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
                if is_rejection(e):
                    log.warning("MLflow refused a %s record of run %s: %s", record["kind"], self._identity.run_id,
                                first_line(e, self._uri))
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
            run_id = resolve_run(client, self._identity, artifact_location(self._uri))
            if starting:
                client.update_run(run_id, status="RUNNING")
            self._run = RunWriter(client, run_id)
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
                        redact_uri(self._uri), first_line(error, self._uri), self._identity.run_id, self._buffer.path)
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
