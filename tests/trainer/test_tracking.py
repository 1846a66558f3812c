"""MLflow tracking against a real `mlflow server`: what a run logs is there when read back
with MlflowClient (params, per-language metrics, tags, parent link, artifacts), a resumed run
reuses its MLflow run and logs each step once, and the local SQLite store works without a
server."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from xstilts.operator.experiment.plan import plan
from xstilts.operator.experiment.spec import load_spec_text
from xstilts.trainer.config import RunConfig, Stage
from xstilts.trainer.tasks import TASKS
from xstilts.trainer.tracking.tracker import RunTracker, config_params, find_or_create_parent_run, local_tracking_uri

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

XNLI_LANGUAGES = TASKS["xnli"].languages


def plan_runs(root: Path, experiment: str, tracking_uri: str | None = None) -> list[RunConfig]:
    """The runs of a one-model grid (mnli intermediate, baseline and mnli target on xnli)."""
    mlflow_block = f"mlflow: {{trackingUri: '{tracking_uri}'}}" if tracking_uri else ""
    spec = load_spec_text(textwrap.dedent(f"""
        name: {experiment}
        models: [{{name: tiny, pretrained: tiny/xlmr, parameters: 1000000}}]
        intermediateTasks: [mnli]
        targets: [xnli]
        seeds: [1]
        {mlflow_block}
        """), "test spec")
    return [r.config for r in plan(spec, str(root)).runs]


def target_run(root: Path, experiment: str, tracking_uri: str | None = None) -> RunConfig:
    """The xnli target run that starts from the mnli checkpoint."""
    return next(c for c in plan_runs(root, experiment, tracking_uri)
                if c.stage is Stage.TARGET and c.labels and c.labels.intermediate == "mnli")


def with_parent(config: RunConfig, parent_run_id: str) -> RunConfig:
    return config.model_copy(update={"tracking": config.tracking.model_copy(update={"parent_run_id": parent_run_id})})


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_run_is_in_mlflow_with_params_language_metrics_tags_parent_and_artifacts(mlflow_server, unique_experiment,
                                                                                  tmp_path):
    config = target_run(tmp_path, unique_experiment, mlflow_server.uri)
    parent = find_or_create_parent_run(mlflow_server.uri, config.tracking.experiment_name, unique_experiment)
    config = with_parent(config, parent)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({"run_id": config.run_id}))
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "predictions.de.jsonl").write_text('{"label": 1}\n')

    tracker = RunTracker(config)
    mlflow_run_id = tracker.start()
    assert mlflow_run_id is not None and tracker.online
    tracker.log_params(config_params(config))
    for step in (10, 20, 30):
        tracker.log_metrics({"train.loss": 1.0 / step, "train.learning_rate": 2e-5}, step=step)
    tracker.log_metrics({f"xnli.test.accuracy.{lang}": 0.5 + i / 100 for i, lang in enumerate(XNLI_LANGUAGES)}
                        | {"xnli.test.accuracy.avg": 0.57, "dev.accuracy": 0.6})
    tracker.log_artifact(run_dir / "result.json")
    tracker.log_artifact(run_dir / "eval")
    tracker.finish()

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(mlflow_run_id)
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == config.tracking.experiment_name
    assert run.data.params["hyperparameters.learning_rate"] == str(config.hyperparameters.learning_rate)
    assert run.data.params["tasks"] == "xnli"
    assert run.data.params["init_from_run"] == config.init_from_run
    assert run.data.params == config_params(config)
    for i, lang in enumerate(XNLI_LANGUAGES):
        assert run.data.metrics[f"xnli.test.accuracy.{lang}"] == pytest.approx(0.5 + i / 100)
    assert history(client, mlflow_run_id, "train.loss") == [(10, 0.1), (20, 0.05), (30, 1 / 30)]
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == parent
    assert tags["xstilts.run_id"] == config.run_id
    assert (tags["xstilts.stage"], tags["xstilts.model"], tags["xstilts.intermediate"], tags["xstilts.target"]) == (
        "target", "tiny", "mnli", "xnli")
    artifacts = {a.path for a in client.list_artifacts(mlflow_run_id)}
    assert artifacts == {"result.json", "eval"}
    assert [a.path for a in client.list_artifacts(mlflow_run_id, "eval")] == ["eval/predictions.de.jsonl"]
    downloaded = client.download_artifacts(mlflow_run_id, "result.json", str(tmp_path))
    assert json.loads(Path(downloaded).read_text()) == {"run_id": config.run_id}
    parent_run = client.get_run(parent)
    assert parent_run.data.tags["xstilts.parent"] == "true"
    assert parent_run.data.tags["xstilts.experiment"] == unique_experiment
    assert not tracker.buffer_path.exists()  # MLflow was up throughout: nothing buffered


def test_runs_without_a_parent_id_share_one_parent_found_or_created(mlflow_server, unique_experiment, tmp_path):
    configs = plan_runs(tmp_path, unique_experiment, mlflow_server.uri)
    ids = []
    for config in configs:
        tracker = RunTracker(config)
        ids.append(tracker.start())
        tracker.finish()
    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.get_experiment_by_name(unique_experiment).experiment_id
    parents = client.search_runs([experiment_id], "tags.`xstilts.parent` = 'true'")
    assert len(parents) == 1
    assert {client.get_run(i).data.tags["mlflow.parentRunId"] for i in ids} == {parents[0].info.run_id}
    assert find_or_create_parent_run(mlflow_server.uri, unique_experiment, unique_experiment) == parents[0].info.run_id
    assert len(client.search_runs([experiment_id], "tags.`xstilts.run_id` != ''")) == len(configs)


def test_a_resumed_run_reuses_its_mlflow_run_and_logs_each_step_once(mlflow_server, unique_experiment, tmp_path):
    config = target_run(tmp_path, unique_experiment, mlflow_server.uri)
    first = RunTracker(config)
    mlflow_run_id = first.start()
    first.log_params(config_params(config))
    for step in range(1, 6):
        first.log_metrics({"train.loss": float(step)}, step=step)
    first.finish("KILLED")  # preempted after step 5; the checkpoint is from step 2

    resumed = RunTracker(config)
    assert resumed.start() == mlflow_run_id
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(mlflow_run_id).info.status == "RUNNING"
    resumed.log_params(config_params(config))  # the same params again: accepted, not duplicated
    for step in range(3, 9):
        resumed.log_metrics({"train.loss": 100.0 + step}, step=step)
    resumed.finish()

    run = client.get_run(mlflow_run_id)
    assert run.info.status == "FINISHED"
    # One point per step; steps 3-5 keep the value first logged for them.
    assert history(client, mlflow_run_id, "train.loss") == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 106.0), (7, 107.0), (8, 108.0)]
    experiment_id = run.info.experiment_id
    assert len(client.search_runs([experiment_id], f"tags.`xstilts.run_id` = '{config.run_id}'")) == 1


def test_a_disabled_tracker_touches_nothing(mlflow_server, unique_experiment, tmp_path):
    config = target_run(tmp_path, unique_experiment, mlflow_server.uri)
    tracker = RunTracker(config, enabled=False)
    assert tracker.start() is None
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.finish()
    assert MlflowClient(mlflow_server.uri).get_experiment_by_name(unique_experiment) is None
    assert not tracker.buffer_path.exists()


def test_finish_refuses_a_status_that_is_not_terminal(tmp_path):
    tracker = RunTracker(target_run(tmp_path, "status"), enabled=False)
    with pytest.raises(ValueError, match=r"RUNNING.*FINISHED, FAILED, KILLED"):
        tracker.finish("RUNNING")


def test_without_a_tracking_uri_runs_log_to_sqlite_beside_the_results(tmp_path):
    config = target_run(tmp_path / "out", "local")
    assert config.tracking.tracking_uri is None
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text("{}")
    tracker = RunTracker(config)
    mlflow_run_id = tracker.start()
    assert mlflow_run_id is not None
    tracker.log_metrics({"xnli.test.accuracy.de": 0.7})
    tracker.log_artifact(run_dir / "result.json")
    tracker.finish()

    assert (tmp_path / "out" / "mlflow.db").is_file()
    client = MlflowClient(local_tracking_uri(tmp_path / "out"))
    assert client.get_run(mlflow_run_id).data.metrics == {"xnli.test.accuracy.de": 0.7}
    # Artifacts beside the store, not in ./mlruns of whatever directory the run started in.
    stored = list((tmp_path / "out" / "mlartifacts").rglob("result.json"))
    assert len(stored) == 1


_OPEN_FRESH_STORE = """
import sys
from pathlib import Path
from xstilts.trainer.tracking.tracker import RunTracker
from xstilts.trainer.config import RunConfig
config = RunConfig.model_validate_json(Path(sys.argv[1]).read_text())
tracker = RunTracker(config)
print(tracker.start())
tracker.finish()
"""


@pytest.mark.slow  # two interpreters importing mlflow: 7-20 s on a busy machine
def test_two_processes_can_open_a_fresh_local_store_at_once(tmp_path):
    # Without the lock, MLflow's schema migration of a new SQLite file races and one fails.
    configs = [c for c in plan_runs(tmp_path / "out", "race") if c.stage is Stage.TARGET]
    paths = []
    for i, config in enumerate(configs):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(config.to_json())
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_FRESH_STORE, str(p)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in paths]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, errors) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, errors
        assert out.strip() not in ("", "None"), errors  # got an MLflow run, was never offline
    client = MlflowClient(local_tracking_uri(tmp_path / "out"))
    for config in configs:
        assert not (Path(config.run_dir) / "mlflow-buffer.jsonl").exists()
    experiment = client.get_experiment_by_name("race")
    assert len(client.search_runs([experiment.experiment_id], "tags.`xstilts.run_id` != ''")) == len(configs)
