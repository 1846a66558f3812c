"""The MLflow buffer without a server: which lines are records, what the synced marker
covers, where object-store runs buffer, and that no credential reaches a file or a log line."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pytest
from test_tracking import target_run
from xstilts.trainer.tracking.buffer import Buffer, RunIdentity, parse_record, redact_uri, scrub
from xstilts.trainer.tracking.tracker import RunTracker, config_params, local_run_dir

START = RunIdentity(run_id="0123456789ab", experiment_name="exp", experiment="exp", parent_run_id=None,
                    run_name="tiny/mnli/xnli/seed1/0123456789ab", tags={"xstilts.run_id": "0123456789ab"},
                    tracking_uri=None, time=1).to_record()


def line(record: object) -> bytes:
    return json.dumps(record).encode()


@pytest.mark.parametrize("record", [
    START,
    {"kind": "params", "params": {"seed": "1"}},
    {"kind": "metrics", "metrics": {"loss": 0.5, "acc": 1}, "step": 3, "timestamp": 1700000000000},
    {"kind": "tags", "tags": {"a": "b"}},
    {"kind": "artifact", "path": "result.json", "relative": True, "artifact_path": None},
    {"kind": "finish", "status": "FAILED", "time": 5},
])
def test_well_formed_records_parse(record):
    assert parse_record(line(record)) == record


@pytest.mark.parametrize("raw", [
    b'{"kind":"metrics","metrics":{"train.lo',  # torn write
    b"[1, 2]",
    line({"kind": "unknown"}),
    line({"kind": "params", "params": {"seed": 1}}),  # values are strings once buffered
    line({"kind": "metrics", "metrics": {"loss": "low"}, "step": 1, "timestamp": 1}),
    line({"kind": "metrics", "metrics": {"loss": 0.1}, "step": True, "timestamp": 1}),
    line({"kind": "metrics", "metrics": {"loss": 0.1}, "timestamp": 1}),
    line({"kind": "artifact", "artifact_path": None}),
    line({"kind": "finish", "status": "RUNNING", "time": 1}),
    line(START | {"run_id": "../../etc"}),
    line(START | {"tracking_uri": 7}),
    line({k: v for k, v in START.items() if k != "experiment_name"}),
])
def test_malformed_lines_are_not_records(raw):
    assert parse_record(raw) is None


def test_the_marker_covers_what_was_synced_and_only_in_its_own_buffer_file(tmp_path):
    buffer = Buffer(tmp_path)
    buffer.append(START)
    buffer.append({"kind": "metrics", "metrics": {"loss": 1.0}, "step": 1, "timestamp": 1})
    pending = buffer.pending()
    assert [r["kind"] for _, r in pending.records] == ["start", "metrics"] and pending.context is None
    buffer.mark_synced(pending.records[-1][0])
    assert not buffer.has_pending()

    buffer.append({"kind": "finish", "status": "FINISHED", "time": 2})
    pending = buffer.pending()
    assert [r["kind"] for _, r in pending.records] == ["finish"]
    assert pending.context == START  # the run these records belong to, from before the marker

    # The buffer is deleted and a later attempt begins a new one: the old marker does not apply.
    buffer.path.unlink()
    later = Buffer(tmp_path)
    later.append(START | {"time": 99})
    assert [r["kind"] for _, r in later.pending().records] == ["start"]


def test_a_torn_last_line_is_ended_before_the_next_record(tmp_path):
    first = Buffer(tmp_path)
    first.append(START)
    with open(first.path, "ab") as handle:
        handle.write(b'{"kind":"metr')
    assert first.pending().corrupt == 0  # an unfinished line is not read at all
    Buffer(tmp_path).append({"kind": "finish", "status": "KILLED", "time": 3})
    pending = Buffer(tmp_path).pending()
    assert [r["kind"] for _, r in pending.records] == ["start", "finish"]
    assert pending.corrupt == 1


def test_credentials_are_removed_from_uris_and_error_text():
    uri = "https://alice:s3cret@mlflow.example:8443/base"
    assert redact_uri(uri) == "https://mlflow.example:8443/base"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    error = f"API request to {uri}/api/2.0/mlflow/runs/log-batch failed (password s3cret)"
    assert "s3cret" not in scrub(error, uri) and "alice" not in scrub(error, uri)
    assert scrub("no uri here", None) == "no uri here"


def test_no_credential_of_the_tracking_uri_reaches_the_buffer_or_the_logs(unreachable_mlflow_uri, tmp_path, caplog,
                                                                         capsys):
    secret = "pl4nted-s3cret"
    # The spec refuses a password in the URI; a RunConfig written by hand can still carry one.
    config = target_run(tmp_path, "secrets")
    config = config.model_copy(update={"tracking": config.tracking.model_copy(
        update={"tracking_uri": unreachable_mlflow_uri.replace("http://", f"http://alice:{secret}@")})})
    caplog.set_level(logging.DEBUG)
    tracker = RunTracker(config)
    assert tracker.start() is None
    tracker.log_params(config_params(config))
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.finish()
    produced = [p.read_text(errors="replace") for p in Path(config.run_dir).rglob("*") if p.is_file()]
    assert produced  # the buffer and its lock
    captured = capsys.readouterr()
    for text in [*produced, caplog.text, captured.out, captured.err]:
        assert secret not in text
    assert "unreachable" in caplog.text


def test_config_params_are_flat_strings_without_locations(tmp_path):
    config = target_run(tmp_path, "params")
    params = config_params(config)
    assert params["run_id"] == config.run_id
    assert params["hyperparameters.learning_rate"] == str(config.hyperparameters.learning_rate)
    assert params["labels.model"] == "tiny" and params["tasks"] == "xnli"
    assert params["hyperparameters.max_steps"] == ""  # None
    assert not any(k.startswith(("storage_root", "task_data", "tracking")) for k in params)
    assert all(isinstance(v, str) for v in params.values())


def test_runs_stored_in_an_object_store_buffer_in_the_local_temp_dir(unreachable_mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    config = target_run(tmp_path, "objects").model_copy(update={"storage_root": "s3://bucket/exp"})
    assert local_run_dir(config) == tmp_path / "tmp" / "xstilts-mlflow-buffer" / config.run_id
    down = config.model_copy(update={"tracking": config.tracking.model_copy(
        update={"tracking_uri": unreachable_mlflow_uri})})
    tracker = RunTracker(down)
    tracker.start()
    tracker.finish()
    assert tracker.buffer_path == local_run_dir(config) / "mlflow-buffer.jsonl"
    assert [json.loads(x)["kind"] for x in tracker.buffer_path.read_text().splitlines()] == ["start", "finish"]
