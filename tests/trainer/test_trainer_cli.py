"""`python -m xstilts.trainer RUN.json` as the cluster runs it: a run that can never work exits
with ExitCode.INVALID, one line on stderr saying why, and leaves nothing that looks like a
result; a finished run is not trained again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fixtures.tiny_hub import TinyHub, tiny_run_config
from xstilts.trainer.config import ExitCode, RunResult
from xstilts.trainer.rundir import RunDir


def trainer(run_json: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xstilts.trainer", str(run_json), *args], capture_output=True,
                          text=True, timeout=300, env=os.environ | {"CUDA_VISIBLE_DEVICES": ""} | (env or {}),
                          check=False)


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(doc))
    return path


def valid_doc(hub: TinyHub, storage: Path, **overrides: Any) -> dict[str, Any]:
    return json.loads(tiny_run_config(hub, storage, ("mnli",)).to_json()) | overrides


def assert_invalid(done: subprocess.CompletedProcess[str], reason: str, storage: Path) -> None:
    assert done.returncode == ExitCode.INVALID, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("xstilts.trainer: invalid run: ") and reason in lines[0], lines[0]
    assert not list(storage.rglob("result.json")) and not list(storage.rglob("checkpoint"))
    assert not storage.exists() or not any(storage.iterdir())  # not even a run directory


def test_an_unknown_task_is_invalid(tiny_hub: TinyHub, tmp_path: Path) -> None:
    storage = tmp_path / "out"
    done = trainer(write(tmp_path / "run.json", valid_doc(tiny_hub, storage, tasks=["mnli", "nope"], task_data={})))
    assert_invalid(done, "tasks: Value error, unknown task 'nope'; known tasks: mnli,", storage)


def test_a_missing_local_data_file_is_invalid(tiny_hub: TinyHub, tmp_path: Path) -> None:
    storage, data = tmp_path / "out", tmp_path / "mnli-data"
    data.mkdir()
    (data / "train.jsonl").write_text((tiny_hub.data["mnli"] / "train.jsonl").read_text())  # no validation.jsonl
    done = trainer(write(tmp_path / "run.json", valid_doc(tiny_hub, storage, task_data={"mnli": str(data)})))
    assert_invalid(done, f"missing data file {data / 'validation.jsonl'} for mnli/validation", storage)


@pytest.mark.parametrize(("deepspeed", "reason"), [
    ({"zero_stage": 2, "offload": "all"}, "deepspeed: Value error, offload 'all' (parameters and optimizer) needs"
                                          " zero_stage 3"),
    ({"zero_stage": 0, "offload": "optimizer"}, "offload 'optimizer' needs zero_stage 1, 2 or 3"),
    # valid on paper, but this machine has no GPU memory to offload from (found after torch loads)
    ({"zero_stage": 2, "offload": "optimizer"}, "deepspeed.offload 'optimizer' moves state from GPU to CPU memory"),
])
def test_incompatible_zero_settings_are_invalid(deepspeed: dict[str, Any], reason: str, tiny_hub: TinyHub,
                                                tmp_path: Path) -> None:
    storage = tmp_path / "out"
    done = trainer(write(tmp_path / "run.json", valid_doc(tiny_hub, storage, deepspeed=deepspeed)))
    assert_invalid(done, reason, storage)


def test_a_global_batch_the_processes_cannot_share_is_invalid(tiny_hub: TinyHub, tmp_path: Path) -> None:
    storage = tmp_path / "out"
    run_json = write(tmp_path / "run.json", valid_doc(tiny_hub, storage))
    done = trainer(run_json, env={"WORLD_SIZE": "3", "RANK": "0"})
    assert_invalid(done, "hyperparameters.batch_size 8 is not a multiple of the 3 processes", storage)
    assert trainer(run_json, "--check").returncode == ExitCode.OK
    assert trainer(run_json, "--check", env={"WORLD_SIZE": "3"}).returncode == ExitCode.INVALID


def test_unreadable_json_is_invalid(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("{not json")
    done = trainer(tmp_path / "run.json")
    assert done.returncode == ExitCode.INVALID and "run.json: (root): Invalid JSON" in done.stderr
    done = trainer(tmp_path / "absent.json")
    assert done.returncode == ExitCode.INVALID and "cannot read run config" in done.stderr
    (tmp_path / "latin1.json").write_bytes(b'{"model": "caf\xe9"}')
    done = trainer(tmp_path / "latin1.json")
    assert done.returncode == ExitCode.INVALID, done.stderr
    assert done.stderr.strip().endswith("latin1.json is not UTF-8 text (byte 0xe9 at offset 14)")


def test_a_run_with_a_result_is_not_trained_again(tiny_hub: TinyHub, tmp_path: Path) -> None:
    config = tiny_run_config(tiny_hub, tmp_path / "out", ("mnli",))
    result = RunResult(run_id=config.run_id, config=config, metrics={"dev.accuracy": 0.5}, parameter_count=1,
                       tokens_seen=1, train_steps=1, wall_seconds=1.0, tokens_per_second=1.0,
                       finished_at="2026-01-01T00:00:00Z")
    RunDir.of(config).result.parent.mkdir(parents=True)
    RunDir.of(config).result.write_text(result.model_dump_json())
    done = trainer(write(tmp_path / "run.json", json.loads(config.to_json())))
    assert done.returncode == ExitCode.OK
    assert f"run {config.run_id} already has" in done.stderr
    assert sorted(p.name for p in Path(config.run_dir).iterdir()) == ["result.json"]
