"""A reduced demo through the real pipeline (`python -m xstilts.demo` pieces, `xstilts run`,
`xstilts report`), and the guard that makes the demo's transfer numbers mean something: the
same tiny model with random weights, fine-tuned on English, transfers at chance, while the
MLM-pretrained one transfers clearly better.

Slow: it pretrains a model and trains a small grid (CI runs it with `pytest -m slow`).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from xstilts.demo.generate import DataSizes
from xstilts.demo.prepare import prepare
from xstilts.demo.pretrain import MODEL_SIZES, save_random_model
from xstilts.demo.world import World

pytestmark = pytest.mark.slow

SEEDS = (1, 2, 3)
CHANCE = 1 / 3  # xnli: three balanced labels


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Pretrain the medium model, save its random-weight twin, and run baseline and mnli cells
    for xnli and pawsx with three seeds through `xstilts run`, then `xstilts report`."""
    root = tmp_path_factory.mktemp("demo")
    sizes = DataSizes(target_eval=150, target_test=150, mnli_train=1500, hellaswag_train=10, intermediate_eval=150)
    prepared = prepare(root / "world", sizes=[MODEL_SIZES[1]], data_sizes=sizes)
    random_dir = save_random_model(MODEL_SIZES[1], World.build(0), root / "world" / "models" / "random")
    spec = yaml.safe_load(Path("examples/demo.yaml").read_text())
    spec.update(
        name="demo-guard",
        models=[{"name": "pretrained", "pretrained": prepared.models["medium"]["dir"], "resources": {"gpus": 0}},
                {"name": "random", "pretrained": str(random_dir), "resources": {"gpus": 0}}],
        intermediateTasks=["mnli"], multiTaskGroups=[], seeds=list(SEEDS),
        data={task: str(path) for task, path in prepared.data.items() if task != "hellaswag"},
    )
    spec.pop("replication")  # a fixed seed list: the guard compares the same three seeds
    spec["hyperparameters"].pop("perModel", None)  # every model takes the stages' settings
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = root / "out"
    cli = [sys.executable, "-m", "xstilts.operator.cli"]
    run = subprocess.run([*cli, "run", str(spec_path), "--output-dir", str(out), "--parallel", "2"],
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = subprocess.run([*cli, "report", str(spec_path), "--output-dir", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in out.glob("runs/*/result.json")]
    return {"results": results, "out": out}


def _targets(results: list[dict[str, Any]], model: str, intermediate: str, target: str) -> list[dict[str, Any]]:
    return [r for r in results
            if r["config"]["labels"]["model"] == model and r["config"]["labels"]["intermediate"] == intermediate
            and r["config"]["labels"]["target"] == target]


def _zero_shot(result: dict[str, Any]) -> float:
    """Mean test accuracy over the languages other than English."""
    return statistics.fmean(v["accuracy"] for lang, v in result["languages"].items() if lang != "en")


def test_the_reduced_demo_learns_through_the_real_pipeline(experiment: dict[str, Any]) -> None:
    results = experiment["results"]
    assert len(results) == 2 * len(SEEDS) * (1 + 2 * 2)  # mnli runs + (baseline, mnli) x (xnli, pawsx)
    for target, chance in (("xnli", 1 / 3), ("pawsx", 1 / 2)):
        for intermediate in ("baseline", "mnli"):
            runs = _targets(results, "pretrained", intermediate, target)
            english = statistics.fmean(r["metrics"]["dev.accuracy"] for r in runs)
            assert english > chance + 0.1, (target, intermediate, english)
    report = experiment["out"] / "report"
    assert (report / "report.md").stat().st_size > 500
    assert any(p.stat().st_size > 5000 for p in report.glob("*.png"))


def test_only_the_pretrained_model_transfers(experiment: dict[str, Any]) -> None:
    """The guard: if the random-weight model transferred as well, the label would leak through
    something every language shares, and the demo would say nothing about transfer."""
    pretrained = [_zero_shot(r) for r in _targets(experiment["results"], "pretrained", "baseline", "xnli")]
    random = [_zero_shot(r) for r in _targets(experiment["results"], "random", "baseline", "xnli")]
    assert abs(statistics.fmean(random) - CHANCE) < 0.04, random
    margin = statistics.fmean(pretrained) - statistics.fmean(random)
    noise = (statistics.variance(pretrained) / len(pretrained) + statistics.variance(random) / len(random)) ** 0.5
    assert margin > max(0.03, 3 * noise), (pretrained, random)
