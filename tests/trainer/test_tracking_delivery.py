"""Metric logs leave the training thread: a background thread delivers them, so a step never
waits for MLflow, even a hung server; every other call waits for the metrics before it, so
nothing is lost or reordered."""

from __future__ import annotations

import json
import time

import pytest
from test_tracking import history, target_run
from xstilts.trainer.tracking.tracker import RunTracker

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402


def test_logging_metrics_never_waits_for_a_hung_server_and_loses_nothing(mlflow_server, unique_experiment,
                                                                         tmp_path):
    config = target_run(tmp_path, unique_experiment, mlflow_server.uri)
    tracker = RunTracker(config, retry_after_seconds=0)
    mlflow_run_id = tracker.start()
    assert mlflow_run_id is not None
    mlflow_server.pause()  # accepts connections, answers nothing
    try:
        slowest = 0.0
        for step in range(1, 11):
            began = time.monotonic()
            tracker.log_metrics({"train.loss": float(step)}, step=step)
            slowest = max(slowest, time.monotonic() - began)
        assert slowest < 0.5  # a live write would wait for the server's timeout, seconds
    finally:
        mlflow_server.resume()
    tracker.log_metrics({"train.loss": 11.0}, step=11)
    tracker.finish()  # waits for the delivery, then replays what the outage buffered

    client = MlflowClient(mlflow_server.uri)
    assert history(client, mlflow_run_id, "train.loss") == [(s, float(s)) for s in range(1, 12)]
    assert client.get_run(mlflow_run_id).info.status == "FINISHED"


def test_other_calls_wait_for_the_metrics_logged_before_them(unreachable_mlflow_uri, tmp_path):
    config = target_run(tmp_path, "delivery-order", unreachable_mlflow_uri)
    tracker = RunTracker(config)
    assert tracker.start() is None  # offline: every record goes to the buffer, in call order
    for step in (1, 2, 3):
        tracker.log_metrics({"train.loss": float(step)}, step=step)
    tracker.set_tags({"xstilts.note": "after three steps"})
    tracker.log_metrics({"train.loss": 4.0}, step=4)
    tracker.finish()
    records = [json.loads(line) for line in tracker.buffer_path.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["start", "metrics", "metrics", "metrics", "tags", "metrics", "finish"]
    assert [r["step"] for r in records if r["kind"] == "metrics"] == [1, 2, 3, 4]
