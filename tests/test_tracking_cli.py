"""`xstilts sync`: uploads what runs buffered during an outage, says what it did, exits 1 while
MLflow is still down, and is a no-op when repeated."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_tracking import history, plan_runs
from typer.testing import CliRunner
from xstilts.operator.cli import app
from xstilts.trainer.tracking import RunTracker

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402


def buffer_runs(root: Path, experiment: str, uri: str) -> list:
    """Every run of a small grid trains while MLflow at `uri` is unreachable."""
    configs = plan_runs(root, experiment, uri)
    for config in configs:
        tracker = RunTracker(config)
        assert tracker.start() is None
        tracker.log_metrics({"train.loss": 0.5}, step=1)
        tracker.finish()
    return configs


def test_sync_uploads_every_buffered_run_and_repeating_it_does_nothing(mlflow_server, unreachable_mlflow_uri,
                                                                      unique_experiment, tmp_path):
    root = tmp_path / "out"
    configs = buffer_runs(root, unique_experiment, unreachable_mlflow_uri)

    result = CliRunner().invoke(app, ["sync", str(root), "--tracking-uri", mlflow_server.uri])
    assert result.exit_code == 0, result.output
    for config in configs:
        assert f"{config.run_dir}: synced" in result.output
    assert f"{len(configs)} buffered run(s): {len(configs)} synced" in result.output
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(unique_experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.`xstilts.run_id` != ''")
    assert sorted(r.data.tags["xstilts.run_id"] for r in runs) == sorted(c.run_id for c in configs)
    assert all(r.info.status == "FINISHED" for r in runs)

    again = CliRunner().invoke(app, ["sync", str(root), "--tracking-uri", mlflow_server.uri])
    assert again.exit_code == 0, again.output
    assert f"{len(configs)} up to date" in again.output
    assert all(history(client, r.info.run_id, "train.loss") == [(1, 0.5)] for r in runs)


def test_sync_of_a_spec_syncs_its_default_storage_root(mlflow_server, unreachable_mlflow_uri, unique_experiment,
                                                      tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: {unique_experiment}
        models: [{{name: tiny, pretrained: tiny/xlmr, parameters: 1000000}}]
        intermediateTasks: [mnli]
        targets: [xnli]
        mlflow: {{trackingUri: '{unreachable_mlflow_uri}'}}
        """))
    configs = buffer_runs(Path("xstilts-out") / unique_experiment, unique_experiment, unreachable_mlflow_uri)
    buffer_runs(tmp_path / "elsewhere", "other", unreachable_mlflow_uri)  # not this spec's: left alone

    result = CliRunner().invoke(app, ["sync", str(spec), "--tracking-uri", mlflow_server.uri])
    assert result.exit_code == 0, result.output
    assert f"{len(configs)} buffered run(s): {len(configs)} synced" in result.output
    assert "elsewhere" not in result.output
    assert MlflowClient(mlflow_server.uri).get_experiment_by_name(unique_experiment) is not None


def test_sync_exits_1_and_keeps_the_records_while_mlflow_is_down(unreachable_mlflow_uri, tmp_path):
    root = tmp_path / "out"
    configs = buffer_runs(root, "down", unreachable_mlflow_uri)
    buffers = {c.run_id: (Path(c.run_dir) / "mlflow-buffer.jsonl").read_bytes() for c in configs}

    result = CliRunner().invoke(app, ["sync", str(root)])
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and "stays buffered" in result.output
    assert f"{len(configs)} failed" in result.output
    assert {c.run_id: (Path(c.run_dir) / "mlflow-buffer.jsonl").read_bytes() for c in configs} == buffers


def test_sync_of_a_missing_target_says_so(tmp_path):
    result = CliRunner().invoke(app, ["sync", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "neither a storage root nor a spec file" in result.output


def test_sync_with_nothing_buffered_says_so(tmp_path):
    result = CliRunner().invoke(app, ["sync", str(tmp_path)])
    assert result.exit_code == 0
    assert "no buffered MLflow records found" in result.output


def test_importing_the_cli_loads_neither_mlflow_nor_torch():
    probe = "import sys, xstilts.operator.cli; print(sorted({'mlflow', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
