"""The files a run leaves in its run directory, each replaced atomically (temp file in the
same directory + os.replace), so a reader never sees half a file:

    config.json    the resolved RunConfig, written when the run starts
    progress.json  {"step", "total_steps", "epoch", "loss", "tokens_seen", "elapsed_s", "eta_s",
                    "phase": "train" | "eval"}, every few steps (the local executor's progress bars)
    result.json    the RunResult, written once, only when the run succeeded

Under torchrun only rank 0 writes them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from xstilts.trainer.config import RunConfig, RunResult

CONFIG_FILE = "config.json"
PROGRESS_FILE = "progress.json"


def write_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` so that a reader sees the old or the new file, never a part,
    and so that the new file survives a crash right after: the file is fsynced before the
    rename and the directory after it (the project's one atomic-write helper)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_config(config: RunConfig) -> Path:
    path = Path(config.run_dir) / CONFIG_FILE
    write_atomic(path, config.to_json() + "\n")
    return path


def write_result(result: RunResult) -> Path:
    path = Path(result.config.result_path)
    write_atomic(path, result.model_dump_json(indent=2) + "\n")
    return path


def read_result(config: RunConfig) -> RunResult | None:
    try:
        return RunResult.model_validate_json(Path(config.result_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class ProgressFile:
    """progress.json, rewritten at most every `min_interval` seconds unless forced."""

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
        write_atomic(self.path, json.dumps(self.fields) + "\n")


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
