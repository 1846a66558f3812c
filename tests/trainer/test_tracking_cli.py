"""`xstilts sync`: uploads what runs buffered during an outage, rebuilds from result.json the
runs MLflow never saw, says what it did, exits 1 while MLflow is still down, and is a no-op
when repeated."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_tracking import XNLI_LANGUAGES, history, plan_runs, with_parent
from typer.testing import CliRunner
from xstilts.operator.cli import app
from xstilts.operator.report.storage import load_mlflow_results
from xstilts.trainer.config import RunConfig, RunResult, Stage
from xstilts.trainer.rundir import RunDir, write_config, write_result
from xstilts.trainer.tracking.rebuild import REBUILT_TAG
from xstilts.trainer.tracking.tracker import RunTracker, config_params

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


FINISHED_AT = "2026-03-01T12:00:00Z"
FINISHED_MS = 1772366400000


def finish_without_mlflow(config: RunConfig, accuracy: float) -> RunResult:
    """The files a run leaves when it succeeds (config.json, result.json), with no MLflow at all."""
    languages = ({lang: {"accuracy": accuracy + i / 100} for i, lang in enumerate(XNLI_LANGUAGES)}
                 if config.stage is Stage.TARGET else {})
    metrics = {"dev.accuracy": accuracy} | {f"xnli.test.accuracy.{k}": v["accuracy"] for k, v in languages.items()}
    result = RunResult(run_id=config.run_id, config=config, metrics=metrics, languages=languages,
                       parameter_count=1_000_123, tokens_seen=5000, train_steps=40, wall_seconds=90.0,
                       tokens_per_second=250.0, finished_at=FINISHED_AT)
    write_config(config)
    write_result(result)
    return result


def xstilts_runs(client: MlflowClient, experiment_name: str) -> list:
    experiment = client.get_experiment_by_name(experiment_name)
    return client.search_runs([experiment.experiment_id], "tags.`xstilts.run_id` != ''") if experiment else []


def test_sync_rebuilds_from_result_files_the_runs_mlflow_never_saw_and_only_once(mlflow_server, unique_experiment,
                                                                                  tmp_path):
    root = tmp_path / "from-cluster"
    # Copied from a cluster: the parent id they were given belongs to the cluster's MLflow.
    configs = [with_parent(c, "f" * 32) for c in plan_runs(root, unique_experiment, "http://mlflow.xstilts:5000")]
    tracked, *untracked = configs
    live = RunTracker(tracked.model_copy(update={"tracking": tracked.tracking.model_copy(
        update={"tracking_uri": mlflow_server.uri, "parent_run_id": None})}))
    live_id = live.start()
    live.finish()
    results = {c.run_id: finish_without_mlflow(c, 0.6 + i / 10) for i, c in enumerate(configs)}

    out = CliRunner().invoke(app, ["sync", str(root), "--tracking-uri", mlflow_server.uri])
    assert out.exit_code == 0, out.output
    assert "no buffered MLflow records found" in out.output
    assert f"{len(configs)} result file(s): {len(untracked)} rebuilt in MLflow, 1 already there" in out.output
    for config in untracked:
        assert f"{config.run_dir}: rebuilt MLflow run" in out.output

    client = MlflowClient(mlflow_server.uri)
    runs = {r.data.tags["xstilts.run_id"]: r for r in xstilts_runs(client, unique_experiment)}
    assert sorted(runs) == sorted(results)
    assert runs[tracked.run_id].info.run_id == live_id and REBUILT_TAG not in runs[tracked.run_id].data.tags
    assert runs[tracked.run_id].data.params == {}  # a run MLflow holds is left as it is
    parent = client.get_run(live_id).data.tags["mlflow.parentRunId"]
    for config in untracked:
        run, result = runs[config.run_id], results[config.run_id]
        assert run.info.status == "FINISHED"
        assert (run.info.start_time, run.info.end_time) == (FINISHED_MS - 90_000, FINISHED_MS)
        assert run.data.params == config_params(config) | {"parameter_count": "1000123"}
        assert run.data.metrics == pytest.approx(result.metrics | {"tokens_seen": 5000.0, "tokens_per_second": 250.0})
        assert history(client, run.info.run_id, "dev.accuracy") == [(40, result.metrics["dev.accuracy"])]
        tags = run.data.tags
        assert (tags["mlflow.parentRunId"], tags["xstilts.stage"], tags["xstilts.model"]) == (
            parent, config.stage.value, "tiny")
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"result.json", "config.json"}
    target = next(c for c in untracked if c.stage is Stage.TARGET)
    assert runs[target.run_id].data.metrics["xnli.test.accuracy.de"] == pytest.approx(
        results[target.run_id].languages["de"]["accuracy"])
    # `xstilts report --from-mlflow` reads the rebuilt runs' result records back.
    from_mlflow = load_mlflow_results(mlflow_server.uri, unique_experiment, [c.run_id for c in untracked])
    assert from_mlflow.problems == []
    assert sorted(r.model_dump_json() for r in from_mlflow.results) == sorted(
        results[c.run_id].model_dump_json() for c in untracked)

    again = CliRunner().invoke(app, ["sync", str(root), "--tracking-uri", mlflow_server.uri])
    assert again.exit_code == 0, again.output
    assert f"{len(configs)} result file(s): 0 rebuilt in MLflow, {len(configs)} already there" in again.output
    assert len(xstilts_runs(client, unique_experiment)) == len(configs)


def test_sync_completes_a_rebuild_that_was_cut_short(mlflow_server, unique_experiment, tmp_path):
    config = next(c for c in plan_runs(tmp_path, unique_experiment, mlflow_server.uri) if c.stage is Stage.TARGET)
    result = finish_without_mlflow(config, 0.7)
    client = MlflowClient(mlflow_server.uri)
    # What an earlier sync that died after creating the run left: the run, no data, RUNNING.
    experiment_id = client.create_experiment(unique_experiment)
    cut = client.create_run(experiment_id, tags={"xstilts.run_id": config.run_id, REBUILT_TAG: "result.json"})

    out = CliRunner().invoke(app, ["sync", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert f"rebuilt MLflow run {cut.info.run_id}" in out.output
    (run,) = xstilts_runs(client, unique_experiment)
    assert run.info.run_id == cut.info.run_id and run.info.status == "FINISHED"
    assert run.data.metrics["xnli.test.accuracy.de"] == pytest.approx(result.metrics["xnli.test.accuracy.de"])


def test_sync_exits_1_while_result_files_wait_for_mlflow_and_skips_unreadable_ones(unreachable_mlflow_uri, tmp_path):
    waiting, broken = plan_runs(tmp_path, "down", unreachable_mlflow_uri)[:2]
    finish_without_mlflow(waiting, 0.5)
    Path(broken.run_dir).mkdir(parents=True)
    RunDir.of(broken).result.write_text('{"run_id": "abc"}')

    out = CliRunner().invoke(app, ["sync", str(tmp_path)])
    assert out.exit_code == 1, out.output
    assert f"{waiting.run_dir}: FAILED to rebuild its MLflow run from result.json" in out.output
    assert f"{broken.run_dir}: result.json skipped: not a valid result record (config: Field required" in out.output
    assert "2 result file(s): 0 rebuilt in MLflow, 0 already there, 1 failed, 1 unreadable" in out.output


def test_importing_the_cli_loads_neither_mlflow_nor_torch():
    probe = "import sys, xstilts.operator.cli; print(sorted({'mlflow', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
