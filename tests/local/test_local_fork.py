"""`xstilts run` on a machine without GPUs forks its single-process runs from a server that has
imported the training stack once (operator/local/forkserver.py). A forked run must compute exactly
what a run in a fresh interpreter computes, and must keep the process contract: when the
executor dies, even by SIGKILL and alone, the run checkpoints, exits and lets go of its lock.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fixtures.tiny_hub import TinyHub
from test_local import (
    attempts,
    finished,
    result_path,
    run_command,
    run_dir,
    spec_text,
    training_midway,
    wait_for,
    write_spec,
)
from xstilts.operator.experiment.spec import load_spec_text
from xstilts.operator.local.display import PlainDisplay
from xstilts.operator.local.executor import FORKED, LocalOptions, run_experiment, try_lock
from xstilts.trainer.config import ExitCode
from xstilts.trainer.rundir import RunDir
from xstilts.trainer.tracking.tracker import local_tracking_uri

pytestmark = pytest.mark.slow  # trains tiny runs, 10-40 s each on 2 cores


def _run(text: str, root: Path, preload: bool) -> dict[str, dict[str, float]]:
    """Run the spec in-process into `root`; the metrics of each run by run id."""
    from rich.console import Console
    from xstilts.operator.experiment.plan import plan

    spec = load_spec_text(text, "spec.yaml")
    p = plan(spec, str(root))
    display = PlainDisplay(Console(file=io.StringIO()))
    outcome = run_experiment(spec, p, root, local_tracking_uri(root),
                             LocalOptions(parallel=2, preload_trainer=preload), display)
    assert outcome.ok, outcome.failed
    for r in p.runs:
        marks = attempts(p, r.run_id)
        assert len(marks) == 1 and (FORKED in marks[0]) == preload, marks
    return {r.run_id: json.loads(result_path(p, r.run_id).read_text())["metrics"] for r in p.runs}


def test_a_forked_run_computes_what_a_fresh_interpreter_computes(
        tiny_hub: TinyHub, tiny_cache: Path, tmp_path: Path) -> None:
    text = spec_text(tiny_hub, name="fork-test", steps=12)
    forked = _run(text, tmp_path / "forked", preload=True)
    fresh = _run(text, tmp_path / "fresh", preload=False)
    assert len(forked) == 3 and forked == fresh


def test_a_forked_run_checkpoints_and_lets_go_when_the_executor_alone_is_killed(
        tiny_hub: TinyHub, tiny_cache: Path, tmp_path: Path) -> None:
    spec, p = write_spec(tmp_path, spec_text(tiny_hub, name="fork-kill-test", steps=200))
    proc = subprocess.Popen(run_command(spec, tmp_path, "--parallel", "1"), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    training = wait_for(lambda: training_midway(p, set()), "a run trains", proc)
    lock = RunDir(run_dir(p, training)).lock
    assert try_lock(lock) is None  # the forked run holds its lock, not the executor alone
    assert FORKED in attempts(p, training)[-1]
    proc.send_signal(signal.SIGKILL)  # the executor only: its fork server and the run live on
    proc.communicate(timeout=60)

    deadline = time.monotonic() + 120
    while (fd := try_lock(lock)) is None:  # the run holds it until it has exited
        assert time.monotonic() < deadline, "the forked run did not exit after the executor died"
        time.sleep(0.2)
    os.close(fd)
    log = RunDir(run_dir(p, training)).train_log.read_text(encoding="utf-8", errors="replace")
    assert "a retry resumes from its last checkpoint" in log  # it got SIGTERM and checkpointed
    assert training not in finished(p)

    rerun = subprocess.run(run_command(spec, tmp_path, "--parallel", "1"), cwd=tmp_path, capture_output=True,
                           text=True, timeout=900, check=False)
    assert rerun.returncode == ExitCode.OK, rerun.stdout + rerun.stderr
    log = RunDir(run_dir(p, training)).train_log.read_text(encoding="utf-8", errors="replace")
    assert "resuming from" in log.split(attempts(p, training)[-1])[1]
    assert len(finished(p)) == len(p.runs)
