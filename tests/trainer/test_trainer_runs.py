"""Whole runs on the tiny hub, in this process: a run per task format, the intermediate →
target pipeline (phase 3 from a phase-2 checkpoint), zero-shot evaluation of every XNLI and
PAWS-X language logged to a real MLflow server, and a multi-task run over four formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fixtures.tiny_hub import PAWSX_LANGUAGES, XNLI_LANGUAGES, TinyHub, tiny_run_config
from xstilts.trainer.config import RunConfig, RunResult
from xstilts.trainer.rundir import RunDir
from xstilts.trainer.tasks import TASKS, Format
from xstilts.trainer.train import run


def mlflow_client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(uri)


@pytest.fixture(scope="module")
def mnli(tiny_hub: TinyHub, tiny_cache: Path, tiny_tracking_uri: str,
         tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, RunResult]:
    """An intermediate MNLI run long enough to learn the generated task: 3 epochs of 30 steps."""
    config = tiny_run_config(tiny_hub, tmp_path_factory.mktemp("runs"), ("mnli",), tracking_uri=tiny_tracking_uri,
                             experiment="trainer-mnli", hyperparameters={"epochs": 3})
    return config, run(config)


def train_tokens(hub: TinyHub, task: str, max_length: int) -> int:
    """Non-pad tokens in one pass over the task's training rows, tokenized independently."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hub.model)
    rows = [json.loads(line) for line in (hub.data[task] / "train.jsonl").read_text().splitlines()]
    ids = tokenizer([r["premise"] for r in rows], [r["hypothesis"] for r in rows], truncation=True,
                    max_length=max_length)["input_ids"]
    return sum(len(i) for i in ids)


def test_a_classification_run_writes_a_complete_result(mnli: tuple[RunConfig, RunResult], tiny_hub: TinyHub,
                                                      tiny_tracking_uri: str) -> None:
    from transformers import AutoModel

    config, result = mnli
    run_dir = Path(config.run_dir)
    assert RunResult.model_validate_json(RunDir.of(config).result.read_text()) == result
    assert result.run_id == config.run_id and result.config == config and result.status == "succeeded"
    assert set(result.metrics) == {"dev.accuracy"} and result.primary_metric == "accuracy"
    assert result.languages == {}
    assert result.train_steps == 3 * 30  # 240 rows / batch 8, three epochs
    assert result.tokens_seen == 3 * train_tokens(tiny_hub, "mnli", 64)  # every row once per epoch, no padding
    encoder = AutoModel.from_pretrained(RunDir.of(config).model, add_pooling_layer=False)  # the heads pool
    assert result.parameter_count == sum(p.numel() for p in encoder.parameters())
    assert result.wall_seconds > 0 and result.tokens_per_second > 0 and "torch" in result.versions
    # CPU seconds of the training steps: some, and never more than the wall seconds of all
    # of them allow (one torch thread here; tokens over seconds gives those seconds back)
    train_wall = result.tokens_seen / result.tokens_per_second
    assert result.train_cpu_seconds is not None and 0 < result.train_cpu_seconds <= 1.5 * train_wall + 0.1
    assert json.loads((run_dir / "config.json").read_text()) == json.loads(config.to_json())
    progress = json.loads((run_dir / "progress.json").read_text())
    assert progress["step"] == progress["total_steps"] == 90 and progress["tokens_seen"] == result.tokens_seen
    assert progress["phase"] == "eval" and progress["eta_s"] == 0.0 and progress["loss"] > 0
    assert {"config.json", "model.safetensors", "heads.safetensors", "heads.json", "tokenizer.json"} <= {
        p.name for p in RunDir.of(config).model.iterdir()}
    assert not RunDir(run_dir).resume.exists()  # resume state is dropped once the result is written

    client = mlflow_client(tiny_tracking_uri)
    logged = client.get_run(result.mlflow_run_id)
    assert logged.data.tags["xstilts.run_id"] == config.run_id and logged.info.status == "FINISHED"
    assert logged.data.params["hyperparameters.learning_rate"] == "0.003"
    assert logged.data.params["parameter_count"] == str(result.parameter_count)
    assert logged.data.tags["xstilts.world_size"] == "1"
    assert logged.data.metrics["dev.accuracy"] == pytest.approx(result.metrics["dev.accuracy"])
    assert {"result.json", "config.json"} <= {a.path for a in client.list_artifacts(result.mlflow_run_id)}


def test_the_loss_goes_down_and_dev_accuracy_beats_chance(mnli: tuple[RunConfig, RunResult],
                                                          tiny_tracking_uri: str) -> None:
    _, result = mnli
    losses = [m.value for m in sorted(mlflow_client(tiny_tracking_uri).get_metric_history(
        result.mlflow_run_id, "train.loss"), key=lambda m: m.step)]
    assert len(losses) >= 10
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses
    assert result.metrics["dev.accuracy"] >= 0.6  # three classes: chance is 1/3


def test_the_saved_checkpoint_is_the_model_that_was_scored(mnli: tuple[RunConfig, RunResult],
                                                           tiny_cache: Path) -> None:
    """load_model rebuilds encoder and heads; on the dev set it scores what the run did."""
    from transformers import AutoTokenizer
    from xstilts.trainer.batching import Collator
    from xstilts.trainer.data import SplitRef, open_split
    from xstilts.trainer.evaluate import Predictor, evaluate_split
    from xstilts.trainer.features import load_encoded, tokenizer_fingerprint
    from xstilts.trainer.model import load_model

    config, result = mnli
    model = load_model(RunDir.of(config).model).eval()
    tokenizer = AutoTokenizer.from_pretrained(RunDir.of(config).model)
    dev = load_encoded(open_split(config, SplitRef("mnli", "validation")), tokenizer,
                       tokenizer_fingerprint(tokenizer), 64, tiny_cache)
    predictor = Predictor(lambda batch: model(**batch), Collator(tokenizer.pad_token_id), torch.device("cpu"))
    assert evaluate_split(predictor, dev, 0)["accuracy"] == pytest.approx(result.metrics["dev.accuracy"])


def test_phase3_starts_from_the_phase2_encoder_and_a_fresh_head(mnli: tuple[RunConfig, RunResult],
                                                                tiny_hub: TinyHub) -> None:
    from safetensors.torch import load_file
    from xstilts.trainer.model import HeadSpec, build_model

    phase2, _ = mnli
    target = tiny_run_config(tiny_hub, Path(phase2.storage_root), ("xnli",), stage="target",
                             init_from_run=phase2.run_id)
    assert target.init_model_dir == str(RunDir.of(phase2).model)
    specs = [HeadSpec("xnli", Format.CLASSIFICATION, TASKS["xnli"].labels)]
    model = build_model(target.init_model_dir, specs, seed=target.seed)
    trained = load_file(str(RunDir.of(phase2).model / "model.safetensors"))
    encoder = model.encoder.state_dict()
    assert set(encoder) == set(trained)
    assert all(torch.equal(encoder[k], trained[k]) for k in trained)
    pretrained = load_file(str(tiny_hub.model / "model.safetensors"))
    assert any(not torch.equal(pretrained[k], trained[k]) for k in trained)  # phase 2 did change the encoder
    assert set(model.heads) == {"xnli"}  # the phase-2 MNLI head stays behind
    baseline = build_model(tiny_hub.model, specs, seed=target.seed)  # the same target head, from scratch
    for name, tensor in model.heads.state_dict().items():
        assert torch.equal(tensor, baseline.heads.state_dict()[name])


def test_xnli_from_phase2_evaluates_every_language_and_logs_each_to_mlflow(
        mnli: tuple[RunConfig, RunResult], tiny_hub: TinyHub, mlflow_server: Any, unique_experiment: str) -> None:
    from xstilts.trainer.tracking.tracker import find_or_create_parent_run

    phase2, _ = mnli
    parent = find_or_create_parent_run(mlflow_server.uri, unique_experiment, unique_experiment)
    target = tiny_run_config(
        tiny_hub, Path(phase2.storage_root), ("xnli",), stage="target", init_from_run=phase2.run_id,
        hyperparameters={"max_steps": 8}, tracking={"tracking_uri": mlflow_server.uri,
                                                    "experiment_name": unique_experiment, "parent_run_id": parent})
    result = run(target)
    assert list(result.languages) == list(XNLI_LANGUAGES)
    for lang in XNLI_LANGUAGES:
        assert result.metrics[f"xnli.test.accuracy.{lang}"] == result.languages[lang]["accuracy"]
        assert 0.0 <= result.languages[lang]["accuracy"] <= 1.0
    mean = sum(v["accuracy"] for v in result.languages.values()) / len(XNLI_LANGUAGES)
    assert result.metrics["xnli.test.accuracy.avg"] == pytest.approx(mean)
    assert "dev.accuracy" in result.metrics and result.primary_metric == "accuracy"

    client = mlflow_client(mlflow_server.uri)
    logged = client.get_run(result.mlflow_run_id)
    for lang in XNLI_LANGUAGES:
        assert logged.data.metrics[f"xnli.test.accuracy.{lang}"] == pytest.approx(result.languages[lang]["accuracy"])
    assert logged.data.tags["mlflow.parentRunId"] == parent
    assert logged.data.params["init_from_run"] == phase2.run_id
    assert "result.json" in {a.path for a in client.list_artifacts(result.mlflow_run_id)}


def test_pawsx_baseline_evaluates_its_seven_languages(tiny_hub: TinyHub, tiny_cache: Path, tiny_tracking_uri: str,
                                                      tmp_path: Path) -> None:
    config = tiny_run_config(tiny_hub, tmp_path, ("pawsx",), stage="target", tracking_uri=tiny_tracking_uri,
                             hyperparameters={"max_steps": 6, "max_eval_examples": 20})
    result = run(config)
    assert list(result.languages) == list(PAWSX_LANGUAGES)
    assert {f"pawsx.test.accuracy.{lang}" for lang in PAWSX_LANGUAGES} < set(result.metrics)
    # max_eval_examples caps each split: 20 rows, so accuracies are multiples of 1/20
    assert all(round(v["accuracy"] * 20, 6).is_integer() for v in result.languages.values())
    # both model-selection protocols: every language's dev set was scored at each evaluation step,
    # and its test score at the step its dev set liked best is kept beside the English-dev one
    history = json.loads(RunDir.of(config).selection.read_text(encoding="utf-8"))
    assert history and all(set(h["dev"]) == set(PAWSX_LANGUAGES) for h in history)
    assert set(result.oracle_languages) == set(PAWSX_LANGUAGES)
    # English is selected by the English dev set under both: the same checkpoint, the same score
    assert result.oracle_languages["en"]["accuracy"] == pytest.approx(result.languages["en"]["accuracy"])
    for lang in PAWSX_LANGUAGES:
        best = max(history, key=lambda h: (h["dev"][lang], -h["step"]))
        assert result.oracle_languages[lang] == best["test"][lang]
        assert result.metrics[f"pawsx.test_oracle.accuracy.{lang}"] == best["test"][lang]["accuracy"]
    # per-example test predictions: every language's accuracy recomputes from them
    import pyarrow.parquet as pq

    table = pq.read_table(RunDir.of(config).predictions).to_pylist()
    for lang in PAWSX_LANGUAGES:
        rows = [r for r in table if r["language"] == lang]
        assert len(rows) == 20 and len({r["example"] for r in rows}) == 20
        assert sum(r["score"] for r in rows) / sum(r["weight"] for r in rows) == pytest.approx(
            result.languages[lang]["accuracy"])
        assert all(r["score"] == float(json.loads(r["prediction"]) == json.loads(r["gold"])) for r in rows)


@pytest.mark.parametrize(("task", "metrics"), [
    ("hellaswag", {"dev.accuracy"}),
    ("squad_v2", {"dev.exact_match", "dev.f1"}),
    ("ccg", {"dev.accuracy"}),
])
def test_a_run_per_format_trains_and_writes_its_metrics(task: str, metrics: set[str], tiny_hub: TinyHub,
                                                       tiny_cache: Path, tiny_tracking_uri: str,
                                                       tmp_path: Path) -> None:
    config = tiny_run_config(tiny_hub, tmp_path, (task,), tracking_uri=tiny_tracking_uri,
                             hyperparameters={"epochs": 2})
    result = run(config)
    assert set(result.metrics) == metrics and result.primary_metric == TASKS[task].metric
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    # an epoch is a pass over the rows: 240 / 8 = 30 steps, more for span QA, whose long
    # contexts take several windows each
    assert (result.train_steps > 60) if task == "squad_v2" else (result.train_steps == 60)
    assert result.tokens_seen > 0
    # these generated tasks are learnable in 60 steps: well above chance (MC 1/4, tags 1/3, spans ~0)
    assert result.metrics[f"dev.{TASKS[task].metric}"] >= 0.6
    heads = json.loads((RunDir.of(config).model / "heads.json").read_text())["heads"]
    assert [(h["task"], h["format"]) for h in heads] == [(task, TASKS[task].format.value)]
    if task == "ccg":  # a tagging task learns its tag set from its training data
        assert heads[0]["labels"] == ["A", "N", "V"]


def test_a_multi_task_run_trains_one_encoder_with_a_head_per_task(tiny_hub: TinyHub, tiny_cache: Path,
                                                                  tiny_tracking_uri: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from xstilts.trainer.model import build_model, read_head_specs

    tasks = ("mnli", "hellaswag", "squad_v1", "ccg")
    config = tiny_run_config(tiny_hub, tmp_path, tasks, tracking_uri=tiny_tracking_uri,
                             hyperparameters={"max_steps": 24, "sampling_temperature": 100.0,
                                              "max_eval_examples": 20})
    result = run(config)
    expected = {"dev.mnli.accuracy", "dev.hellaswag.accuracy", "dev.squad_v1.exact_match", "dev.squad_v1.f1",
                "dev.ccg.accuracy", "dev.score"}
    assert set(result.metrics) == expected and result.primary_metric == "score"
    primaries = [result.metrics["dev.mnli.accuracy"], result.metrics["dev.hellaswag.accuracy"],
                 result.metrics["dev.squad_v1.f1"], result.metrics["dev.ccg.accuracy"]]
    assert result.metrics["dev.score"] == pytest.approx(sum(primaries) / 4)
    specs = read_head_specs(RunDir.of(config).model)
    assert [s.task for s in specs] == list(tasks)
    assert [s.format for s in specs] == [Format.CLASSIFICATION, Format.MULTIPLE_CHOICE, Format.SPAN_QA,
                                         Format.TAGGING]
    # every head was trained (near-uniform task sampling over 24 steps reaches all four)
    trained = load_file(str(RunDir.of(config).model / "heads.safetensors"))
    untrained = build_model(tiny_hub.model, specs, seed=config.seed).heads.state_dict()
    for task in tasks:
        weight = f"{task}.out_proj.weight"
        assert not torch.equal(trained[weight], untrained[weight]), task
