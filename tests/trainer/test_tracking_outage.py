"""MLflow outages: a real `mlflow server` is stopped and restarted (or never there, or hung)
while runs log. Training never waits long, nothing is lost, and replaying the buffer any
number of times, or after a crash halfway, duplicates nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_tracking import XNLI_LANGUAGES, history, target_run
from xstilts.trainer.rundir import RunDir, file_lock
from xstilts.trainer.tracking.buffer import Buffer
from xstilts.trainer.tracking.tracker import RunTracker, config_params, sync_run_dir, sync_storage

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

LANGUAGE_METRICS = {f"xnli.test.accuracy.{lang}": 0.5 + i / 100 for i, lang in enumerate(XNLI_LANGUAGES)}


def runs_tagged(client: MlflowClient, experiment_name: str, run_id: str) -> list:
    experiment = client.get_experiment_by_name(experiment_name)
    return client.search_runs([experiment.experiment_id], f"tags.`xstilts.run_id` = '{run_id}'")


def offline_run(tmp_path: Path, experiment: str, uri: str, steps: range) -> tuple:
    """A run whose MLflow is unreachable throughout: everything goes to its buffer."""
    config = target_run(tmp_path, experiment, uri)
    tracker = RunTracker(config)
    assert tracker.start() is None
    tracker.log_params(config_params(config))
    for step in steps:
        tracker.log_metrics({"train.loss": 1.0 / step}, step=step)
    tracker.log_metrics(LANGUAGE_METRICS)
    tracker.finish()
    return config, tracker


def test_outage_at_start_loses_nothing_and_sync_duplicates_nothing(mlflow_server, unique_experiment, tmp_path):
    config = target_run(tmp_path, unique_experiment, mlflow_server.uri)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({"run_id": config.run_id}))
    mlflow_server.stop()

    began = time.monotonic()
    tracker = RunTracker(config)
    assert tracker.start() is None
    tracker.log_params(config_params(config))
    for step in (1, 2, 3):
        tracker.log_metrics({"train.loss": 1.0 / step}, step=step)
    tracker.log_metrics(LANGUAGE_METRICS)
    tracker.log_artifact(run_dir / "result.json")
    tracker.finish()  # tries to sync: MLflow is still down, so the records stay buffered
    assert time.monotonic() - began < 15  # seconds, not MLflow's minutes of retries
    assert tracker.buffer_path.is_file() and not RunDir(run_dir).tracking_synced.exists()

    mlflow_server.start()
    report = sync_run_dir(run_dir)  # to the URI the run was configured with
    assert report.ok
    (done,) = report.runs
    assert done.status == "synced"
    assert done.counts.params_logged == len(config_params(config))
    assert done.counts.metrics_logged == 3 + len(LANGUAGE_METRICS)
    assert done.counts.artifacts_logged == 1 and done.counts.finished == "FINISHED"

    client = MlflowClient(mlflow_server.uri)
    (run,) = runs_tagged(client, config.tracking.experiment_name, config.run_id)
    assert run.info.run_id == done.mlflow_run_id
    assert run.info.status == "FINISHED"
    assert run.data.params == config_params(config)
    assert {k: run.data.metrics[k] for k in LANGUAGE_METRICS} == pytest.approx(LANGUAGE_METRICS)
    assert history(client, run.info.run_id, "train.loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["xstilts.parent"] == "true"
    assert run.data.tags["xstilts.target"] == "xnli"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["result.json"]

    again = sync_storage(tmp_path)  # the same buffer, found from the storage root
    assert [r.status for r in again.runs] == ["up-to-date"]
    assert again.counts.metrics_logged == again.counts.params_logged == 0
    assert history(client, run.info.run_id, "train.loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3)]


def test_outage_mid_run_is_replayed_when_mlflow_returns(mlflow_server, unique_experiment, tmp_path):
    config = target_run(tmp_path, unique_experiment, mlflow_server.uri)
    tracker = RunTracker(config, retry_after_seconds=0)  # try to reconnect on every call
    mlflow_run_id = tracker.start()
    assert mlflow_run_id is not None
    for step in (1, 2, 3):
        tracker.log_metrics({"train.loss": float(step)}, step=step)
    tracker.flush()  # metrics are delivered in the background: these three reach MLflow before the outage

    mlflow_server.stop()
    began = time.monotonic()
    for step in (4, 5, 6):
        tracker.log_metrics({"train.loss": float(step)}, step=step)
    tracker.log_params({"train.examples": 1000})
    tracker.set_tags({"xstilts.note": "logged during the outage"})
    assert time.monotonic() - began < 15
    assert not tracker.online
    kinds = [json.loads(line)["kind"] for line in tracker.buffer_path.read_text().splitlines()]
    assert kinds == ["start", "metrics", "metrics", "metrics", "params", "tags"]

    mlflow_server.start()
    tracker.log_metrics({"train.loss": 7.0}, step=7)  # reconnects: the buffer first, then this
    assert tracker.online and tracker.mlflow_run_id == mlflow_run_id
    tracker.finish()

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert history(client, mlflow_run_id, "train.loss") == [(s, float(s)) for s in range(1, 8)]
    assert run.data.params["train.examples"] == "1000"
    assert run.data.tags["xstilts.note"] == "logged during the outage"
    assert sync_run_dir(Path(config.run_dir)).runs[0].status == "up-to-date"
    assert len(runs_tagged(client, config.tracking.experiment_name, config.run_id)) == 1


def test_a_sync_that_crashed_halfway_is_replayed_without_duplicates(mlflow_server, unreachable_mlflow_uri,
                                                                    unique_experiment, tmp_path):
    config, tracker = offline_run(tmp_path, unique_experiment, unreachable_mlflow_uri, range(1, 7))
    run_dir = Path(config.run_dir)
    full = tracker.buffer_path.read_bytes()
    lines = full.splitlines(keepends=True)
    assert [json.loads(line)["kind"] for line in lines] == ["start", "params", *["metrics"] * 7, "finish"]

    # The crashed sync got the start, the params and three steps into MLflow, then died
    # before it could move the marker.
    tracker.buffer_path.write_bytes(b"".join(lines[:5]))
    assert sync_run_dir(run_dir, tracking_uri=mlflow_server.uri).ok
    RunDir(run_dir).tracking_synced.unlink()
    tracker.buffer_path.write_bytes(full)

    report = sync_run_dir(run_dir, tracking_uri=mlflow_server.uri)
    (done,) = report.runs
    assert done.status == "synced"
    assert done.counts.params_skipped == len(config_params(config)) and done.counts.params_logged == 0
    assert done.counts.metrics_skipped == 3
    assert done.counts.metrics_logged == 3 + len(LANGUAGE_METRICS)
    client = MlflowClient(mlflow_server.uri)
    (run,) = runs_tagged(client, config.tracking.experiment_name, config.run_id)
    assert history(client, run.info.run_id, "train.loss") == [(s, 1.0 / s) for s in range(1, 7)]
    assert run.info.status == "FINISHED"

    assert sync_run_dir(run_dir, tracking_uri=mlflow_server.uri).runs[0].status == "up-to-date"


def test_a_run_resumed_while_mlflow_is_down_logs_each_step_once(mlflow_server, unreachable_mlflow_uri,
                                                                unique_experiment, tmp_path):
    config = target_run(tmp_path, unique_experiment, mlflow_server.uri)
    first = RunTracker(config)
    mlflow_run_id = first.start()
    for step in range(1, 6):
        first.log_metrics({"train.loss": float(step)}, step=step)
    first.flush()  # steps 1-5 have reached MLflow (a daemon thread delivers them)
    # The process dies after step 5 (no finish); the retry starts from the step-2 checkpoint
    # while MLflow cannot be reached.
    down = config.model_copy(update={"tracking": config.tracking.model_copy(
        update={"tracking_uri": unreachable_mlflow_uri})})
    assert down.run_id == config.run_id
    retry = RunTracker(down)
    assert retry.start() is None
    for step in range(3, 9):
        retry.log_metrics({"train.loss": 100.0 + step}, step=step)
    retry.finish()

    (done,) = sync_run_dir(Path(config.run_dir), tracking_uri=mlflow_server.uri).runs
    assert done.mlflow_run_id == mlflow_run_id
    assert (done.counts.metrics_logged, done.counts.metrics_skipped) == (3, 3)
    client = MlflowClient(mlflow_server.uri)
    assert history(client, mlflow_run_id, "train.loss") == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 106.0), (7, 107.0), (8, 108.0)]
    assert client.get_run(mlflow_run_id).info.status == "FINISHED"


def test_two_attempts_buffered_in_one_outage_give_one_point_per_step(mlflow_server, unreachable_mlflow_uri,
                                                                    unique_experiment, tmp_path):
    config = target_run(tmp_path, unique_experiment, unreachable_mlflow_uri)
    first = RunTracker(config)
    first.start()
    for step in range(1, 5):
        first.log_metrics({"train.loss": float(step), "train.lr": 0.1}, step=step)
    first.finish("KILLED")
    retry = RunTracker(config)  # resumes from the step-2 checkpoint, MLflow still down
    retry.start()
    for step in range(3, 7):
        retry.log_metrics({"train.loss": 100.0 + step, "train.lr": 0.2}, step=step)
    retry.log_metrics({"train.loss": 999.0, "train.lr": 0.9}, step=6)  # step 6 again, same batch
    retry.finish()

    (done,) = sync_run_dir(Path(config.run_dir), tracking_uri=mlflow_server.uri).runs
    assert (done.counts.metrics_logged, done.counts.metrics_skipped) == (12, 6)
    client = MlflowClient(mlflow_server.uri)
    assert history(client, done.mlflow_run_id, "train.loss") == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0)]
    assert [s for s, _ in history(client, done.mlflow_run_id, "train.lr")] == [1, 2, 3, 4, 5, 6]
    assert client.get_run(done.mlflow_run_id).info.status == "FINISHED"  # the last attempt's status


def test_a_torn_buffer_line_is_skipped_and_nothing_after_it_is_lost(mlflow_server, unreachable_mlflow_uri,
                                                                   unique_experiment, tmp_path):
    config = target_run(tmp_path, unique_experiment, unreachable_mlflow_uri)
    first = RunTracker(config)
    first.start()
    first.log_metrics({"train.loss": 1.0}, step=1)
    with open(first.buffer_path, "ab") as handle:  # killed in the middle of writing a record
        handle.write(b'{"kind":"metrics","metrics":{"train.lo')
    retry = RunTracker(config)
    retry.start()
    retry.log_metrics({"train.loss": 2.0}, step=2)
    retry.finish()

    (done,) = sync_run_dir(Path(config.run_dir), tracking_uri=mlflow_server.uri).runs
    assert done.status == "synced" and done.corrupt_lines == 1
    client = MlflowClient(mlflow_server.uri)
    assert history(client, done.mlflow_run_id, "train.loss") == [(1, 1.0), (2, 2.0)]
    assert client.get_run(done.mlflow_run_id).info.status == "FINISHED"


def test_records_mlflow_refuses_are_reported_and_do_not_block_the_rest(mlflow_server, unreachable_mlflow_uri,
                                                                       unique_experiment, tmp_path):
    config = target_run(tmp_path, unique_experiment, mlflow_server.uri)
    online = RunTracker(config)
    mlflow_run_id = online.start()
    online.log_params({"seed": 1})
    down = config.model_copy(update={"tracking": config.tracking.model_copy(
        update={"tracking_uri": unreachable_mlflow_uri})})
    offline = RunTracker(down)
    offline.start()
    offline.log_params({"seed": 2, "train.examples": 10})  # MLflow params cannot change
    offline.log_metrics({"dev.accuracy": 0.8}, step=1)
    offline.finish()

    report = sync_run_dir(Path(config.run_dir), tracking_uri=mlflow_server.uri)
    (done,) = report.runs
    assert report.ok and done.status == "synced"
    assert done.counts.rejected == ["param seed: MLflow has '1', not '2'"]
    assert "1 refused by MLflow (param seed" in done.describe()
    run = MlflowClient(mlflow_server.uri).get_run(mlflow_run_id)
    assert run.data.params == {"seed": "1", "train.examples": "10"}
    assert run.data.metrics == {"dev.accuracy": 0.8}
    assert sync_run_dir(Path(config.run_dir), tracking_uri=mlflow_server.uri).runs[0].status == "up-to-date"


def test_a_sync_of_a_buffer_another_sync_holds_is_skipped(unreachable_mlflow_uri, tmp_path):
    config, _ = offline_run(tmp_path, "busy", unreachable_mlflow_uri, range(1, 3))
    run_dir = Path(config.run_dir)
    with file_lock(RunDir(run_dir).tracking_lock) as held:
        assert held
        report = sync_run_dir(run_dir)
    assert [r.status for r in report.runs] == ["busy"] and report.ok
    assert Buffer(run_dir).has_pending()


def test_sync_while_mlflow_is_still_down_keeps_everything(unreachable_mlflow_uri, tmp_path):
    config, tracker = offline_run(tmp_path, "down", unreachable_mlflow_uri, range(1, 3))
    before = tracker.buffer_path.read_bytes()
    began = time.monotonic()
    report = sync_storage(tmp_path)
    assert time.monotonic() - began < 15
    (failed,) = report.runs
    assert not report.ok and failed.status == "failed"
    assert "Connection refused" in (failed.error or "") or "Max retries" in (failed.error or "")
    assert tracker.buffer_path.read_bytes() == before
    assert not RunDir.of(config).tracking_synced.exists()


@pytest.mark.slow
def test_a_hung_server_costs_seconds_not_minutes(mlflow_server, unique_experiment, tmp_path):
    config = target_run(tmp_path, unique_experiment, mlflow_server.uri)
    mlflow_server.pause()
    try:
        began = time.monotonic()
        tracker = RunTracker(config)  # MLflow's defaults would retry for minutes
        assert tracker.start() is None
        for step in range(1, 20):
            tracker.log_metrics({"train.loss": float(step)}, step=step)
        assert time.monotonic() - began < 60
    finally:
        mlflow_server.resume()
    tracker.finish()  # the server answers again: finish syncs
    assert not Buffer(Path(config.run_dir)).has_pending()
    client = MlflowClient(mlflow_server.uri)
    (run,) = runs_tagged(client, config.tracking.experiment_name, config.run_id)
    assert [s for s, _ in history(client, run.info.run_id, "train.loss")] == list(range(1, 20))
    assert run.info.status == "FINISHED"
