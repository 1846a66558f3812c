"""`xstilts ui` in a real browser: headless Chromium (Debian's package, installed by
scripts/setup-node-deps.sh) loads the address `xstilts ui` prints; the experiment opens on the
runs table of MLflow's "Model training" side; a screenshot is taken; and stopping `xstilts ui`
leaves no MLflow server process behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from xstilts.trainer.tracking.mlflow_client import EXPERIMENT_KIND_TAG, TRAINING_KIND, open_client
from xstilts.trainer.tracking.tracker import find_or_create_parent_run, local_tracking_uri

SPEC = """
name: cli-test
models:
  - {name: tiny, pretrained: local/tiny, parameters: 1000, resources: {gpus: 0}}
intermediateTasks: [mnli]
targets: [pawsx]
seeds: [1]
"""


def write_spec(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC, encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--window-size=1600,1000", "--virtual-time-budget=20000", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # an MLflow server and a browser: 30-60 s
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: bash scripts/setup-node-deps.sh")
def test_the_ui_opens_the_training_runs_and_stops_with_its_server(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    out = tmp_path / "xstilts-out" / "cli-test"
    uri = local_tracking_uri(out)
    parent = find_or_create_parent_run(uri, "cli-test", "cli-test")
    client = open_client(uri)
    experiment = client.get_experiment_by_name("cli-test")
    assert experiment is not None and experiment.tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    for arm in ("baseline", "mnli"):
        run = client.create_run(experiment.experiment_id, run_name=f"tiny/{arm}/pawsx/seed1",
                                tags={"mlflow.parentRunId": parent, "xstilts.model": "tiny",
                                      "xstilts.intermediate": arm, "xstilts.target": "pawsx", "xstilts.seed": "1"})
        client.log_param(run.info.run_id, "seed", "1")
        client.log_metric(run.info.run_id, "pawsx.test.accuracy.avg", 0.6 if arm == "mnli" else 0.5)
        client.set_terminated(run.info.run_id)

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "xstilts.operator.cli", "ui", str(spec), "--port", str(port)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    server: set[int] = set()
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()
        match = re.search(r"(http://127\.0\.0\.1:\d+/#/experiments/(\d+)/runs\?workflowType=machine_learning)",
                          first)
        assert match, first  # the printed address opens the experiment's runs table
        url, experiment_id = match.groups()
        assert experiment_id == experiment.experiment_id
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, "xstilts ui exited"
                time.sleep(0.5)
        server = descendants(proc.pid)
        assert server, "the MLflow server runs below xstilts ui"

        shot = tmp_path / "runs.png"
        assert chromium(f"--screenshot={shot}", url).returncode == 0
        assert shot.stat().st_size > 10_000
        dom = chromium("--dump-dom", url).stdout
        # the runs table of the "Model training" side, not the GenAI overview of traces: the
        # experiment's parent run and its two children counted
        assert re.search(r">\s*Runs\s*<", dom) and ">Model training<" in dom
        assert ">cli-test<" in dom
        assert "<strong>3</strong> matching runs" in dom
    finally:
        proc.send_signal(signal.SIGTERM)  # xstilts ui alone: its server must go with it
        try:
            proc.wait(timeout=60)
        finally:
            leftover = {pid for pid in server if alive(pid)}
            for pid in leftover:  # leave nothing behind even when the assertion below fails
                os.kill(pid, signal.SIGKILL)
    assert not leftover, f"MLflow server processes left running: {sorted(leftover)}"
