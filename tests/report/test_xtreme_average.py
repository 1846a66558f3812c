"""The XTREME average: from generated results shaped like real ones (every XTREME target with
its full language list and its own metric names), each task's mean over languages, then the
mean over tasks, per seed; mean and interval over seeds; gain over the baseline."""

from __future__ import annotations

import random
import statistics

import pytest
from xstilts.operator.experiment.plan import plan
from xstilts.operator.experiment.spec import load_spec_text
from xstilts.operator.report.build import build_report, grid_of, to_markdown
from xstilts.operator.report.stats import mean_interval
from xstilts.trainer.config import RunResult, Stage
from xstilts.trainer.evaluate import test_metrics as flat_metrics
from xstilts.trainer.tasks import TASKS, Format

XTREME = ["xnli", "pawsx", "udpos", "panx", "xquad", "mlqa", "tydiqa", "bucc2018", "tatoeba"]
SPEC = f"""
name: xtreme-avg
models:
  - {{name: base, pretrained: local/base, parameters: 270000000, resources: {{gpus: 0}}}}
intermediateTasks: [mnli]
targets: [{", ".join(XTREME)}]
seeds: [1, 2, 3]
"""


def language_scores(task: str, rng: random.Random, shift: float) -> dict[str, dict[str, float]]:
    """What a real run's result holds per language: the task's metrics, as fractions."""
    out = {}
    for lang in TASKS[task].languages:
        f1 = min(1.0, rng.uniform(0.3, 0.9) + shift)
        if TASKS[task].format is Format.SPAN_QA:
            out[lang] = {"f1": f1, "exact_match": f1 * 0.7}
        elif TASKS[task].format is Format.TAGGING:
            out[lang] = {"f1": f1, "accuracy": min(1.0, f1 + 0.05)}
        elif task == "bucc2018":
            out[lang] = {"f1": f1, "threshold": 1.1}
        else:
            out[lang] = {"accuracy": f1}
    return out


def generated() -> tuple[list[RunResult], dict[tuple[str, int], float]]:
    """Results of every target run, and the XTREME average of each (arm, seed) by hand."""
    spec = load_spec_text(SPEC)
    rng = random.Random(7)
    results, by_hand = [], {}
    for r in plan(spec).runs:
        if r.config.stage is not Stage.TARGET:
            continue
        task, arm, seed = r.config.tasks[0], r.labels.intermediate, r.config.seed
        languages = language_scores(task, rng, 0.03 if arm == "mnli" else 0.0)
        metric = TASKS[task].metric
        results.append(RunResult(
            run_id=r.run_id, config=r.config, metrics=flat_metrics(task, languages), languages=languages,
            primary_metric=metric, parameter_count=270_000_000, tokens_seen=0, train_steps=0, wall_seconds=1.0,
            tokens_per_second=0.0, finished_at="2026-01-01T00:00:00+00:00"))
        by_hand.setdefault((arm, seed), {})[task] = 100 * statistics.fmean(v[metric] for v in languages.values())
    return results, {k: statistics.fmean(v.values()) for k, v in by_hand.items()}


def test_the_xtreme_average_is_the_mean_over_tasks_of_the_mean_over_languages() -> None:
    results, by_hand = generated()
    report = build_report(results, grid_of(load_spec_text(SPEC)))
    for arm in ("baseline", "mnli"):
        expected = mean_interval([by_hand[(arm, s)] for s in (1, 2, 3)])
        got = report.xtreme[("base", arm)]
        assert got.mean == pytest.approx(expected.mean) and got.half_width == pytest.approx(expected.half_width)
    gain = report.xtreme_gains[("base", "mnli")]
    diffs = [by_hand[("mnli", s)] - by_hand[("baseline", s)] for s in (1, 2, 3)]
    assert gain.mean == pytest.approx(statistics.fmean(diffs))
    assert gain.half_width == pytest.approx(mean_interval(diffs).half_width)
    text = to_markdown(report)
    assert "## XTREME average (all 9 tasks" in text
    assert f"{report.xtreme[('base', 'mnli')].mean:.2f} ± " in text


def test_a_seed_missing_one_task_leaves_the_average_to_the_complete_seeds() -> None:
    results, by_hand = generated()
    results = [r for r in results if not (r.config.seed == 3 and r.config.tasks[0] == "tatoeba"
                                          and r.config.labels and r.config.labels.intermediate == "mnli")]
    report = build_report(results, grid_of(load_spec_text(SPEC)))
    assert report.xtreme[("base", "mnli")].mean == pytest.approx(statistics.fmean(
        [by_hand[("mnli", 1)], by_hand[("mnli", 2)]]))
    assert report.xtreme_gains[("base", "mnli")].n == 2


def test_a_grid_without_xtreme_targets_has_no_xtreme_average() -> None:
    spec = load_spec_text(SPEC.replace(f"targets: [{', '.join(XTREME)}]", "targets: [xnli]"))
    report = build_report([], grid_of(spec))
    assert "XTREME average (1 of its 9 tasks: xnli)" in to_markdown(report)
    assert report.xtreme == {}
