"""Each of the paper's two variants, end to end on the demo world: `xstilts run` trains the
variant arm's phase-2 run with the real trainer on a tiny model of the world (its own tokenizer,
an MLM head from its pretraining architecture), then its target run from that checkpoint, and
the baseline's; MLflow holds the variant's params and tags; `xstilts report` shows the arm as an
arm of its own.

Small on purpose (one seed, one target in two languages, an epoch of 128 English examples):
each test is three short runs, well under a minute on two cores."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from xstilts.operator.experiment.plan import Plan, plan
from xstilts.operator.experiment.spec import load_spec_text
from xstilts.trainer.config import RunResult
from xstilts.trainer.rundir import RunDir

pytestmark = pytest.mark.slow

MNLI_TRAIN = 128
BATCH = 32


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo world's task files (small), two translations of its mnli training set, a
    multilingual corpus, and a tiny model of its architecture with random weights."""
    from xstilts.demo.generate import DataSizes, write_mlm_corpus, write_task_data, write_translations
    from xstilts.demo.pretrain import MODEL_SIZES, save_random_model
    from xstilts.demo.world import World

    root = tmp_path_factory.mktemp("demo-world")
    world = World.build(0)
    sizes = DataSizes(xnli_train=16, pawsx_train=64, target_eval=16, target_test=16, mnli_train=MNLI_TRAIN,
                      hellaswag_train=16, intermediate_eval=32)
    dirs = write_task_data(world, root / "data", sizes)
    write_translations(world, dirs["mnli"], "mnli", ["de", "fr"], MNLI_TRAIN)
    write_mlm_corpus(world, root / "corpus" / "sentences.txt", 500)
    save_random_model(MODEL_SIZES[0], world, root / "model")
    return root


def spec_text(root: Path, arm: str) -> str:
    stage = f"{{learningRate: 3.0e-3, batchSize: {BATCH}, epochs: 1, maxSeqLength: 32, maxEvalExamples: 16}}"
    return f"""
name: variant-test
models:
  - {{name: tiny, pretrained: {root / "model"}, parameters: 63000, resources: {{gpus: 0}}}}
multiTaskGroups:
  - {arm}
targets: [pawsx]
evalLanguages: {{pawsx: [en, de]}}
data: {{mnli: {root / "data" / "mnli"}, pawsx: {root / "data" / "pawsx"}}}
hyperparameters:
  intermediate: {stage}
  target: {stage}
"""


def run_spec(tmp_path: Path, text: str) -> tuple[Plan, Path]:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    p = plan(load_spec_text(text, str(spec_path)), str(out))
    env = {**os.environ, "XSTILTS_CACHE": str(tmp_path / "cache")}
    cli = [sys.executable, "-m", "xstilts.operator.cli"]
    done = subprocess.run([*cli, "run", str(spec_path), "--output-dir", str(out), "--parallel", "2"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report = subprocess.run([*cli, "report", str(spec_path), "--output-dir", str(out), "--format", "md,json"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert report.returncode == 0, report.stdout + report.stderr
    return p, out


def results(p: Plan) -> dict[tuple[str, str], RunResult]:
    """(arm, stage) → the run's result; every planned run must have one."""
    out = {}
    for r in p.runs:
        out[(r.labels.intermediate, r.config.stage.value)] = RunResult.model_validate_json(
            RunDir.of(r.config).result.read_text(encoding="utf-8"))
    return out


def check_tracked_and_reported(p: Plan, out: Path, arm: str, variant: str, params: dict[str, str]) -> None:
    from mlflow import MlflowClient
    from xstilts.trainer.tracking.mlflow_client import local_tracking_uri

    client = MlflowClient(local_tracking_uri(out))
    experiment = client.get_experiment_by_name("variant-test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], f"tags.`xstilts.variant` = '{variant}'")
    stages = sorted(r.data.tags["xstilts.stage"] for r in runs)
    assert stages == ["intermediate", "target"] and {r.data.tags["xstilts.intermediate"] for r in runs} == {arm}
    phase2 = next(r for r in runs if r.data.tags["xstilts.stage"] == "intermediate")
    assert params.items() <= phase2.data.params.items()
    record = json.loads((out / "report" / "report.json").read_text(encoding="utf-8"))
    assert arm in json.dumps(record)
    markdown = (out / "report" / "report.md").read_text(encoding="utf-8")
    assert arm in markdown


def test_translate_train_trains_english_and_each_translation(world_dir: Path, tmp_path: Path) -> None:
    arm = "mnli-tt"
    p, out = run_spec(tmp_path, spec_text(world_dir, f"{{name: {arm}, tasks: [mnli], translateTrain: [de, fr]}}"))
    done = results(p)
    phase2 = done[(arm, "intermediate")]
    assert phase2.config.train_languages == ("de", "fr")
    # one epoch over English and its two translations: three times the English steps
    assert phase2.train_steps == math.ceil(3 * MNLI_TRAIN / BATCH)
    tokenized = {json.loads(m.read_text())["split"] for m in (tmp_path / "cache").glob("*/meta.json")}
    assert {"mnli/train", "mnli/train/de", "mnli/train/fr"} <= tokenized
    target = done[(arm, "target")]
    assert target.config.init_from_run == phase2.run_id and set(target.languages) == {"en", "de"}
    assert done[("baseline", "target")].config.init_from_run is None
    check_tracked_and_reported(p, out, arm, "translate-train", {"train_languages": "de,fr"})


def test_continued_mlm_takes_its_share_of_the_steps_from_the_corpus(world_dir: Path, tmp_path: Path) -> None:
    arm = "mnli-mlm"
    corpus = world_dir / "corpus"
    p, out = run_spec(tmp_path, spec_text(world_dir, f"{{name: {arm}, tasks: [mnli], mlm: {{ratio: 0.25,"
                                                     f" corpus: {corpus}}}}}"))
    done = results(p)
    phase2 = done[(arm, "intermediate")]
    assert phase2.config.mlm is not None and phase2.config.mlm.corpus == str(corpus)
    # the task keeps its epoch (4 steps of 32); MLM steps come on top, a quarter of all
    assert phase2.train_steps == math.ceil(math.ceil(MNLI_TRAIN / BATCH) / 0.75)
    log = RunDir.of(next(r.config for r in p.runs if r.run_id == phase2.run_id)).train_log.read_text(
        encoding="utf-8", errors="replace")
    assert "MLM corpus: " in log and str(corpus) in log
    assert "starts untrained" not in log  # the head came from the model's own lm_head
    model_dir = RunDir.of(next(r.config for r in p.runs if r.run_id == phase2.run_id)).model
    assert json.loads((model_dir / "heads.json").read_text())["heads"][0]["task"] == "mnli"  # no MLM head saved
    target = done[(arm, "target")]
    assert target.config.init_from_run == phase2.run_id and target.config.mlm is None
    check_tracked_and_reported(p, out, arm, "mlm", {"mlm.ratio": "0.25", "mlm.corpus": str(corpus)})
    from mlflow import MlflowClient
    from xstilts.trainer.tracking.mlflow_client import local_tracking_uri

    client = MlflowClient(local_tracking_uri(out))
    run = client.search_runs([client.get_experiment_by_name("variant-test").experiment_id],  # type: ignore[union-attr]
                             "tags.`xstilts.variant` = 'mlm' and tags.`xstilts.stage` = 'intermediate'")[0]
    mlm_loss = [m.value for m in client.get_metric_history(run.info.run_id, "train.mlm_loss")]
    assert mlm_loss and all(3.0 < v < 12.0 for v in mlm_loss)  # about log(vocabulary) for a random model
