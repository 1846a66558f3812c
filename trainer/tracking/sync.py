"""`xstilts sync`: replay the MLflow buffers of runs into MLflow, idempotently, then rebuild
from its result.json the MLflow run of every finished run MLflow does not hold
(`rebuild`), and report what was done. The run's own tracker replays its buffer the same way
when MLflow comes back and when the run finishes; the local executor and the controller do
not replay buffers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from xstilts.trainer.rundir import RunDir, file_lock, run_dirs_holding
from xstilts.trainer.tracking.buffer import Buffer, RunIdentity
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
from xstilts.trainer.tracking.rebuild import RunRebuild, rebuild_runs

if TYPE_CHECKING:
    from mlflow import MlflowClient

# Bounds a replay request and how much is replayed again after a crash.
METRICS_RECORDS_PER_BATCH = 500


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
    rebuilds: list[RunRebuild] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing failed: every buffered record reached MLflow or was refused for good, and
        every result file's run is in MLflow (or the file is unreadable, which no retry fixes)."""
        return all(r.status != "failed" for r in self.runs) and all(r.status != "failed" for r in self.rebuilds)

    @property
    def counts(self) -> Counts:
        total = Counts()
        for r in self.runs:
            total.add(r.counts)
        return total

    def count(self, status: SyncStatus) -> int:
        return sum(1 for r in self.runs if r.status == status)

    def lines(self) -> list[str]:
        """One line per run that did anything, then a summary of buffers and of result files."""
        out = [r.describe() for r in self.runs if r.status != "up-to-date"]
        out += [r.describe() for r in self.rebuilds if r.status != "present"]
        if self.runs:
            out.append(f"{len(self.runs)} buffered run(s): {self.count('synced')} synced, {self.count('up-to-date')}"
                       f" up to date, {self.count('busy')} busy, {self.count('failed')} failed")
        else:
            out.append("no buffered MLflow records found")
        if self.rebuilds:
            n = {status: sum(1 for r in self.rebuilds if r.status == status)
                 for status in ("rebuilt", "present", "failed", "unreadable")}
            out.append(f"{len(self.rebuilds)} result file(s): {n['rebuilt']} rebuilt in MLflow, {n['present']}"
                       f" already there, {n['failed']} failed, {n['unreadable']} unreadable")
        return out


def sync_run_dir(run_dir: Path, tracking_uri: str | None = None) -> SyncReport:
    """Replay the run directory's buffer into MLflow (see the module docstring). The URI
    defaults to the one the run was configured with, else the storage root's local store."""
    return SyncReport([_sync_one(Path(run_dir), tracking_uri)])


def sync_storage(storage_root: Path, tracking_uri: str | None = None) -> SyncReport:
    """Sync every run that has a buffer under a storage root (`<root>/runs/*`), or under a
    directory of storage roots (`<dir>/*/runs/*`, e.g. the default `xstilts-out`); then
    rebuild the MLflow runs of result files MLflow lacks. A run whose buffer did not sync
    (MLflow down, or another sync replaying it) is not rebuilt: its buffer comes first."""
    root = Path(storage_root)
    report = SyncReport([_sync_one(d.path, tracking_uri) for d in run_dirs_holding(root, RunDir.TRACKING_BUFFER)])
    waiting = {r.run_dir for r in report.runs if r.status in ("busy", "failed")}
    report.rebuilds = rebuild_runs([d.path for d in run_dirs_holding(root, RunDir.RESULT) if d.path not in waiting],
                                   tracking_uri)
    return report


def _sync_one(run_dir: Path, tracking_uri: str | None) -> RunSync:
    buffer = Buffer(run_dir)
    if not buffer.path.exists():
        return RunSync(run_dir, "up-to-date")
    with file_lock(RunDir(run_dir).tracking_lock, blocking=False) as acquired:
        if not acquired:
            return RunSync(run_dir, "busy")
        pending = buffer.pending()
        result = RunSync(run_dir, "synced", corrupt_lines=pending.corrupt)
        if not pending.records:
            result.status = "up-to-date"
            return result
        storage_root = run_dir.parent.parent  # <root>/runs/<id>
        clients: dict[str, MlflowClient] = {}
        run: RunWriter | None = None
        context = pending.context
        synced_to: int | None = None
        try:
            for group in _batches(pending.records):
                end, first = group[-1][0], group[0][1]
                if first["kind"] == "start":
                    context, run = first, None
                if context is None:  # its start record was lost: no way to know the run
                    result.counts.rejected.append(f"{len(group)} {first['kind']} record(s) with no start record")
                    synced_to = end
                    continue
                try:
                    if run is None:
                        identity = RunIdentity.from_record(context)
                        uri = resolve_tracking_uri(tracking_uri or identity.tracking_uri, storage_root)
                        if uri not in clients:
                            clients[uri] = open_client(uri)
                        run = RunWriter(clients[uri], resolve_run(clients[uri], identity, artifact_location(uri)))
                        result.mlflow_run_id = run.run_id
                    if first["kind"] == "metrics":
                        run.log_metrics([record for _, record in group], result.counts)
                    elif first["kind"] != "start":
                        run.apply(first, run_dir, result.counts)
                except Exception as e:
                    if not is_rejection(e):
                        raise
                    result.counts.rejected.append(f"{first['kind']} record: {first_line(e, tracking_uri)}")
                synced_to = end
        except Exception as e:  # MLflow unreachable or failing: keep what is not yet synced
            result.status, result.error = "failed", first_line(e, tracking_uri)
        if synced_to is not None:
            buffer.mark_synced(synced_to)
        return result


def _batches(records: list[tuple[int, dict[str, Any]]]) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    """Runs of consecutive metrics records (replayed as one request each, up to
    METRICS_RECORDS_PER_BATCH records), and every other record on its own."""
    batch: list[tuple[int, dict[str, Any]]] = []
    for item in records:
        if item[1]["kind"] == "metrics" and len(batch) < METRICS_RECORDS_PER_BATCH:
            batch.append(item)
            continue
        if batch:
            yield batch
            batch = []
        if item[1]["kind"] == "metrics":
            batch.append(item)
        else:
            yield [item]
    if batch:
        yield batch
