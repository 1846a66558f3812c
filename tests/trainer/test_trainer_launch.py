"""The torchrun launcher passes the trainer's exit codes on: torchrun alone exits 1 for an
invalid run (which the Job's podFailurePolicy must fail at once) and for a preempted one (which a
retry resumes). SIGTERM under the launcher: tests/faults/test_preemption.py's two-rank run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from xstilts.trainer.config import ExitCode
from xstilts.trainer.launch import exit_code_of


@pytest.mark.parametrize(("codes", "expected"), [
    ([ExitCode.INVALID, ExitCode.INVALID], ExitCode.INVALID),
    ([ExitCode.INTERRUPTED, 1], ExitCode.INTERRUPTED),
    ([ExitCode.INTERRUPTED, ExitCode.INVALID], ExitCode.INVALID),  # a retry cannot fix an invalid rank
    ([1, -9], 1),
    ([-15], 1),
])
def test_the_workers_codes_become_one_code(codes: list[int], expected: int) -> None:
    assert exit_code_of(codes) == expected


def test_an_invalid_run_on_two_ranks_exits_invalid_not_1(tmp_path: Path) -> None:
    run_json = tmp_path / "run.json"
    run_json.write_text('{"model": "tiny"}')  # a RunConfig without most of its fields
    env = {**os.environ, "XSTILTS_CACHE": str(tmp_path / "cache"), "DS_ACCELERATOR": "cpu",
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "xstilts.trainer.launch", "--standalone", "--nproc_per_node=2",
                          "--max_restarts=0", "-m", "xstilts.trainer", str(run_json)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == ExitCode.INVALID, out.stderr[-4000:]
    assert "xstilts.trainer: invalid run: " in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["run.json"]
