"""The MLflow buffer of one run: an append-only JSONL log of the tracking calls a run made
while MLflow was unreachable, and the atomically replaced marker of how much of it has reached
MLflow since. The design (what is buffered, how replay stays idempotent) is described in
xstilts.trainer.tracking.tracker. No mlflow import: `xstilts sync` can read buffers without it.

Records, one JSON object a line, by `kind`:
  start     the run's identity (RunIdentity): what finds or creates its MLflow run
  params    {"params": {name: value}}
  metrics   {"metrics": {key: value}, "step": int, "timestamp": ms}
  tags      {"tags": {name: value}}
  artifact  {"path": str, "relative": bool (to the run directory), "artifact_path": str | null}
  finish    {"status": FINISHED | FAILED | KILLED, "time": ms}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from xstilts.trainer.config import RunConfig
from xstilts.trainer.rundir import RunDir, write_atomic

RUN_ID_TAG = "xstilts.run_id"
STAGE_TAG = "xstilts.stage"
MODEL_TAG = "xstilts.model"
INTERMEDIATE_TAG = "xstilts.intermediate"
TARGET_TAG = "xstilts.target"
VARIANT_TAG = "xstilts.variant"  # an arm's variant (mlm, translate-train): on its runs only
SEED_TAG = "xstilts.seed"
EXPERIMENT_TAG = "xstilts.experiment"
PARENT_TAG = "xstilts.parent"
MLFLOW_PARENT_TAG = "mlflow.parentRunId"

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
_HEX_RUN_ID = re.compile(r"^[0-9a-f]{6,64}$")


def now_ms() -> int:
    return int(time.time() * 1000)


def redact_uri(uri: str) -> str:
    """The URI without user:password, for files and log lines."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def scrub(text: str, uri: str | None) -> str:
    """`text` (an MLflow error quotes the URL it called) without the credentials of `uri`."""
    if not uri:
        return text
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        text = text.replace(parts.netloc.rsplit("@", 1)[0] + "@", "")
    if parts.password:
        text = text.replace(parts.password, "***")
    return text


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
    time: int = field(default_factory=now_ms)

    @classmethod
    def of(cls, config: RunConfig) -> RunIdentity:
        labels = config.labels
        # model, intermediate, target and seed as tags: the UI's run table groups by them
        tags = {RUN_ID_TAG: config.run_id, STAGE_TAG: config.stage.value, SEED_TAG: str(config.seed)}
        if labels:
            tags |= {EXPERIMENT_TAG: labels.experiment, MODEL_TAG: labels.model,
                     INTERMEDIATE_TAG: labels.intermediate}
            if labels.target:
                tags[TARGET_TAG] = labels.target
            if labels.variant:
                tags[VARIANT_TAG] = labels.variant
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
        for name in ("parent_run_id", "tracking_uri"):
            if not isinstance(record.get(name), str | None):
                raise ValueError(f"{name} {record[name]!r} is not a string")
        return cls(run_id=run_id, experiment_name=str(record["experiment_name"]),
                   experiment=str(record["experiment"]), parent_run_id=record.get("parent_run_id"),
                   run_name=str(record["run_name"]), tags={str(k): str(v) for k, v in record["tags"].items()},
                   tracking_uri=record.get("tracking_uri"), time=int(record["time"]))


@dataclass
class Pending:
    context: dict[str, Any] | None  # the last start record before the first pending one
    records: list[tuple[int, dict[str, Any]]]  # (byte offset just after the record, record)
    corrupt: int  # complete lines that are not records (a torn write later appended to)


class Buffer:
    """`<run_dir>/mlflow-buffer.jsonl`: an append-only log of tracking calls made while MLflow
    was unreachable, and the atomically replaced marker of how much of it reached MLflow."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = RunDir(run_dir).tracking_buffer
        self.marker = RunDir(run_dir).tracking_synced
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

    def _synced_offset(self, data: bytes) -> int:
        """How much of `data` (the buffer's bytes) has reached MLflow. A marker left by an
        earlier buffer file (deleted, then begun again) names another first line: it does
        not apply."""
        try:
            marker = json.loads(self.marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return 0
        if not isinstance(marker, dict) or marker.get("head") != _head(data):
            return 0
        offset = marker.get("offset")
        return offset if isinstance(offset, int) and 0 <= offset <= len(data) else 0

    def mark_synced(self, offset: int) -> None:
        with open(self.path, "rb") as handle:
            head = _head(handle.readline())
        body = json.dumps({"offset": offset, "head": head, "synced_at": now_ms()})
        write_atomic(self.marker, body)

    def pending(self) -> Pending:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return Pending(None, [], 0)
        synced = self._synced_offset(data)
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
        return Pending(context, records, corrupt)

    def has_pending(self) -> bool:
        return bool(self.pending().records)


def _head(data: bytes) -> str:
    """A fingerprint of the buffer's first line (its first start record, which holds the time
    the run started): it tells one buffer file from a later one at the same path."""
    return hashlib.sha256(data[: data.find(b"\n") + 1] if b"\n" in data else data).hexdigest()[:16]


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
