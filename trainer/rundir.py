"""The run directory, `<storage root>/runs/<run id>/`: every file a run leaves there has its
name here and nowhere else (`RunDir`), and the files that readers poll are replaced atomically
(temp file in the same directory, fsync, os.replace), so a reader never sees half a file:

    run.json        the RunConfig the local executor hands to the trainer (on a cluster, the
                    ConfigMap mounted into the pod)
    config.json     the resolved RunConfig, written by the trainer when the run starts
    progress.json   {"step", "total_steps", "epoch", "loss", "tokens_seen", "elapsed_s", "eta_s",
                    "phase": "train" | "eval"}, every few steps (the local executor's progress bars)
    resume/         the Trainer's checkpoint-N directories: what a retry resumes from (removed
                    once result.json is written); see checkpoints.py
    model/          the final model (model.save_model): what a phase-3 run starts from
    result.json     the RunResult, written once, only when the run succeeded; read by
                    `read_result` alone
    failed.json     a final failure the local executor recorded (not retried without --retry-failed)
    train.log       the run's stdout and stderr under the local executor, every attempt appended
    .lock           held by the run's local process while it lives
    mlflow-buffer.* tracking calls made while MLflow was unreachable (tracking/buffer.py)

Under torchrun only rank 0 writes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # config.py builds its locations from the names here: imported when used
    from xstilts.trainer.config import RunConfig, RunResult

RUNS_DIR = "runs"


def run_dir(storage_root: str, run_id: str) -> str:
    """A run's directory as a string: the storage root may be a URI, which a Path would mangle."""
    return f"{storage_root.rstrip('/')}/{RUNS_DIR}/{run_id}"


@dataclass(frozen=True)
class RunDir:
    """One run's directory on this machine's file system, and the path of everything in it."""

    path: Path

    RUN_CONFIG: ClassVar[str] = "run.json"
    CONFIG: ClassVar[str] = "config.json"
    PROGRESS: ClassVar[str] = "progress.json"
    RESUME: ClassVar[str] = "resume"
    MODEL: ClassVar[str] = "model"
    RESULT: ClassVar[str] = "result.json"
    FAILURE: ClassVar[str] = "failed.json"
    TRAIN_LOG: ClassVar[str] = "train.log"
    PREDICTIONS: ClassVar[str] = "predictions.parquet"  # per-example test outcomes of a target run
    SELECTION: ClassVar[str] = "selection.json"  # dev and test scores per evaluation step (target-dev selection)
    LOCK: ClassVar[str] = ".lock"
    TRACKING_BUFFER: ClassVar[str] = "mlflow-buffer.jsonl"
    TRACKING_SYNCED: ClassVar[str] = "mlflow-buffer.synced.json"
    TRACKING_LOCK: ClassVar[str] = "mlflow-buffer.lock"

    @classmethod
    def at(cls, storage_root: str | Path, run_id: str) -> RunDir:
        return cls(Path(run_dir(str(storage_root), run_id)))

    @classmethod
    def of(cls, config: RunConfig) -> RunDir:
        return cls(Path(config.run_dir))

    @property
    def run_config(self) -> Path:
        return self.path / self.RUN_CONFIG

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def predictions(self) -> Path:
        return self.path / self.PREDICTIONS

    @property
    def selection(self) -> Path:
        return self.path / self.SELECTION

    @property
    def progress(self) -> Path:
        return self.path / self.PROGRESS

    @property
    def resume(self) -> Path:
        return self.path / self.RESUME

    @property
    def model(self) -> Path:
        return self.path / self.MODEL

    @property
    def result(self) -> Path:
        return self.path / self.RESULT

    @property
    def failure(self) -> Path:
        return self.path / self.FAILURE

    @property
    def train_log(self) -> Path:
        return self.path / self.TRAIN_LOG

    @property
    def lock(self) -> Path:
        return self.path / self.LOCK

    @property
    def tracking_buffer(self) -> Path:
        return self.path / self.TRACKING_BUFFER

    @property
    def tracking_synced(self) -> Path:
        return self.path / self.TRACKING_SYNCED

    @property
    def tracking_lock(self) -> Path:
        return self.path / self.TRACKING_LOCK

    def has_result(self) -> bool:
        """Whether the run finished: its result.json exists (a run that has one is never
        trained again; whether the file is sound is `read_result`'s question)."""
        return self.result.exists()


def run_dirs_holding(root: Path, name: str) -> list[RunDir]:
    """The run directories holding `name` under a storage root (`<root>/runs/*`) or under a
    directory of storage roots (`<dir>/*/runs/*`)."""
    files = {*root.glob(f"{RUNS_DIR}/*/{name}"), *root.glob(f"*/{RUNS_DIR}/*/{name}")}
    return [RunDir(f.parent) for f in sorted(files)]


# --- writing ------------------------------------------------------------------------------------


def write_atomic(path: str | Path, data: str | bytes, durable: bool = True) -> None:
    """Replace `path` with `data` so that a reader sees the old or the new file, never a part,
    and (`durable`) so that the new file survives a crash right after: the file is fsynced
    before the rename and the directory after it (the project's one atomic-write helper).
    Not durable, the rename alone keeps readers from seeing a part: for a file rewritten every
    second whose loss in a crash costs nothing, the fsyncs would only stall the writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries (a rename in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive flock on `path` (created if missing) for the block; yields False if
    `blocking` is False and another process holds it (the project's one lock-file helper)."""
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


def write_config(config: RunConfig) -> Path:
    path = RunDir.of(config).config
    write_atomic(path, config.to_json() + "\n")
    return path


def write_result(result: RunResult) -> Path:
    path = RunDir.of(result.config).result
    write_atomic(path, result.model_dump_json(indent=2) + "\n")
    return path


# --- reading result.json --------------------------------------------------------------------------


class ResultProblem(Exception):
    """A result.json that cannot be used. `str()` names the file and what is wrong with it;
    `what` is the second part alone."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        super().__init__(f"{path}: {what}")


class ResultMissing(ResultProblem):
    """No result.json: the run has not finished (most readers skip such a run quietly)."""


def read_result(path: str | Path, run_id: str | None = None) -> RunResult:
    """The RunResult in `path` (of run `run_id`, when given). Raises ResultMissing when there is
    no such file, ResultProblem when it cannot be read, is empty, is cut short or corrupt JSON,
    is not a result record, or is another run's: every reader of result.json goes through here."""
    from pydantic import ValidationError
    from xstilts.trainer.config import RunResult, first_error

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ResultMissing(path, "no such file (the run has not finished)") from None
    except OSError as e:
        raise ResultProblem(path, f"cannot read it ({e.strerror or e})") from None
    if not data.strip():
        raise ResultProblem(path, "not a valid result record (the file is empty: its writing was cut short);"
                                  " delete it to train the run again") from None
    try:
        result = RunResult.model_validate_json(data)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            detail = str(first.get("ctx", {}).get("error") or first["msg"])
            raise ResultProblem(path, f"not a valid result record (not JSON: {detail}; the file is cut short or"
                                      " corrupt); delete it to train the run again") from None
        raise ResultProblem(path, f"not a valid result record ({first_error(e)})") from None
    if run_id is not None and result.run_id != run_id:
        raise ResultProblem(path, f"holds the result of run {result.run_id}, not {run_id}")
    return result


# --- progress -----------------------------------------------------------------------------------


class ProgressFile:
    """progress.json, rewritten at most every `min_interval` seconds unless forced. Written
    without fsync: it is rewritten on the training thread about once a second, where two
    fsyncs cost a shared disk up to tens of milliseconds each, and a crash that loses the
    last version loses nothing (the next attempt writes it anew; readers take the newest)."""

    def __init__(self, path: str | Path, min_interval: float = 1.0, enabled: bool = True) -> None:
        self.path = Path(path)
        self.min_interval = min_interval
        self.enabled = enabled
        self.started = time.monotonic()
        self._last_write = float("-inf")
        self.fields: dict[str, Any] = {"step": 0, "total_steps": 0, "epoch": 0.0, "loss": None,
                                       "tokens_seen": 0, "elapsed_s": 0.0, "eta_s": None, "phase": "train"}

    def update(self, force: bool = False, **fields: Any) -> None:
        self.fields.update(fields)
        now = time.monotonic()
        self.fields["elapsed_s"] = round(now - self.started, 1)
        if not self.enabled or (not force and now - self._last_write < self.min_interval):
            return
        self._last_write = now
        write_atomic(self.path, json.dumps(self.fields) + "\n", durable=False)


def read_progress(path: Path, since: float = 0.0) -> dict[str, Any] | None:
    """A progress.json if written after `since` (epoch seconds: an earlier attempt's file is
    stale), or None while there is none or it is being replaced."""
    try:
        if path.stat().st_mtime < since:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def eta_seconds(elapsed: float, done: int, total: int) -> float | None:
    """Remaining seconds at the rate so far; None before the first step of this attempt."""
    if done <= 0 or total <= done:
        return None if done <= 0 else 0.0
    return round(elapsed / done * (total - done), 1)


def versions() -> dict[str, str]:
    out = {}
    for package in ("xstilts", "torch", "transformers", "datasets", "accelerate", "deepspeed", "tokenizers"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return out


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
