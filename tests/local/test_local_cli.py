"""`xstilts run` refusing what cannot run here, and `xstilts ui` serving the experiment's
local MLflow store (a real `mlflow ui` process on a loopback port)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner
from xstilts.operator.cli import app
from xstilts.operator.local.executor import EXECUTOR_LOCK, executor_lock
from xstilts.trainer.tracking.tracker import find_or_create_parent_run, local_tracking_uri

SPEC = """
name: cli-test
models:
  - {name: tiny, pretrained: local/tiny, parameters: 1000, resources: {gpus: 0}}
intermediateTasks: [mnli]
targets: [pawsx]
seeds: [1]
"""


def write_spec(tmp_path: Path, text: str = SPEC) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_run_refuses_a_multi_node_spec_before_starting_anything(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, SPEC.replace("resources: {gpus: 0}", "resources: {gpus: 8, nodes: 2}"))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(spec), "--output-dir", str(out)])
    assert result.exit_code == 2, result.output
    assert "asks for 2 nodes" in result.output and "xstilts submit" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_run_refuses_while_another_run_holds_the_storage_root(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    out = tmp_path / "out"
    with executor_lock(out):
        result = CliRunner().invoke(app, ["run", str(spec), "--output-dir", str(out)])
    assert result.exit_code == 2, result.output
    assert f"another `xstilts run` (pid {os.getpid()})" in result.output
    assert (out / EXECUTOR_LOCK).exists() and not (out / "runs").exists()


def test_run_rejects_an_invalid_spec_with_its_field_path(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, SPEC.replace("seeds: [1]", "seeds: [-1]"))
    result = CliRunner().invoke(app, ["run", str(spec), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "seeds[0]" in result.output and "Traceback" not in result.output


def test_ui_needs_a_store(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["ui", "--output-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no MLflow store" in result.output and "xstilts run" in result.output
    result = CliRunner().invoke(app, ["ui"])
    assert result.exit_code == 2 and "give a SPEC or --output-dir" in result.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow  # MLflow store creation and server start: 15-25 s
def test_ui_serves_the_local_store(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    out = tmp_path / "xstilts-out" / "cli-test"  # the default storage root, relative to the working directory
    parent = find_or_create_parent_run(local_tracking_uri(out), "cli-test", "cli-test")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "xstilts.operator.cli", "ui", str(spec), "--port", str(port)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=cli-test"
        deadline = time.monotonic() + 90
        body = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    body = json.loads(response.read())
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert body is not None, f"mlflow ui did not answer: exit {proc.poll()}"
        experiment_id = body["experiment"]["experiment_id"]
        run_url = f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={parent}"
        with urllib.request.urlopen(run_url, timeout=5) as response:
            run = json.loads(response.read())["run"]
        assert run["info"]["experiment_id"] == experiment_id
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert f"http://127.0.0.1:{port}" in output.splitlines()[0]


def test_the_cli_imports_neither_torch_nor_matplotlib_nor_mlflow() -> None:
    """`xstilts --help`, validate and plan stay fast and work in the slim controller image:
    run, report and ui import their heavy parts only when called."""
    code = ("import sys, xstilts.operator.cli; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
