"""Precision-driven replication (spec.replication), decided by reconcile() for the local
executor and the controller alike: a cell (model × intermediate arm × target) gets another
seed, a baseline and an arm run with it, while its paired gain interval is wider than the
target, up to maxSeeds; and the spec rejects a replication block next to a fixed seed list."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from xstilts.operator.cluster.reconcile import (
    ADDING,
    AT_MAX_SEEDS,
    MEASURING,
    REACHED,
    Observed,
    ResultSummary,
    reconcile,
    replicated,
    replication_cells,
)
from xstilts.operator.experiment.plan import Plan, PlannedRun, plan
from xstilts.operator.experiment.spec import BASELINE, ExperimentSpec, SpecError, load_spec_text
from xstilts.operator.local.executor import local_observed
from xstilts.trainer.config import Stage

SPEC = ExperimentSpec.model_validate({
    "name": "rep",
    "models": [{"name": "small", "pretrained": "org/small", "parameters": 100_000_000,
                "resources": {"gpus": 1, "zeroStage": 0}}],
    "intermediateTasks": ["mnli"],
    "targets": ["xnli"],
    "replication": {"targetHalfWidth": 1.0, "minSeeds": 3, "maxSeeds": 5},
    "cluster": {"maxParallel": 100},
})
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def target_run(p: Plan, arm: str, seed: int) -> PlannedRun:
    return next(r for r in (*p.runs, *p.reserve) if r.config.stage is Stage.TARGET
                and r.labels.intermediate == arm and r.config.seed == seed)


def finish(p: Plan, results: dict[str, ResultSummary], gains: dict[int, float], base: float = 0.5) -> None:
    """Results for every seed in `gains`: the baseline scores `base`, the arm `base + gain`
    (gains in points), and the phase-2 runs."""
    for seed, gain in gains.items():
        for run in (*p.runs, *p.reserve):
            if run.config.seed == seed and run.config.stage is Stage.INTERMEDIATE:
                results[run.run_id] = ResultSummary(run.run_id)
        results[target_run(p, BASELINE, seed).run_id] = ResultSummary("b", {"avg": base})
        results[target_run(p, "mnli", seed).run_id] = ResultSummary("a", {"avg": base + gain / 100})


def test_the_plan_starts_at_min_seeds_and_keeps_the_rest_in_reserve() -> None:
    p = plan(SPEC)
    assert sorted({r.config.seed for r in p.runs}) == [1, 2, 3]
    assert sorted({r.config.seed for r in p.reserve}) == [4, 5]
    assert len(p.runs) == 3 * 3 and len(p.reserve) == 2 * 3  # mnli, baseline→xnli, mnli→xnli per seed
    assert SPEC.run_count == 15  # planning.maxRuns guards the worst case


def test_a_narrow_cell_stops_at_min_seeds() -> None:
    p, results = plan(SPEC), {}
    finish(p, results, {1: 2.0, 2: 2.1, 3: 2.05})
    (cell,) = replication_cells(SPEC, p, results)
    assert cell.state == REACHED and cell.seeds == 3 and cell.half_width is not None and cell.half_width <= 1.0
    assert replicated(SPEC, p, results) is p
    decision = reconcile(SPEC, p, Observed(results=results), NOW)
    assert decision.status["replication"]["small/mnli/xnli"]["state"] == "reached"
    assert decision.status["phase"] == "Succeeded"


def test_a_wide_cell_gets_a_paired_seed_and_stops_at_max_seeds() -> None:
    p, results = plan(SPEC), {}
    finish(p, results, {1: -3.0, 2: 4.0, 3: 1.0})
    (cell,) = replication_cells(SPEC, p, results)
    assert cell.state == ADDING and cell.seeds == 4 and cell.half_width is not None and cell.half_width > 1.0
    decision = reconcile(SPEC, p, Observed(results=results), NOW)
    assert decision.plan is not None
    created = [decision.plan.by_id[a.run_id] for a in decision.creates]
    # seed 4: the phase-2 run, and the baseline target run (the arm's waits for the phase-2 run)
    assert {(r.config.stage, r.labels.intermediate, r.config.seed) for r in created} == {
        (Stage.INTERMEDIATE, "mnli", 4), (Stage.TARGET, BASELINE, 4)}
    assert decision.plan is not None and target_run(p, "mnli", 4).run_id in decision.plan.by_id
    assert decision.status["counts"]["total"] == 12 and decision.status["phase"] != "Succeeded"
    # still wide with seed 4 and 5: stop at maxSeeds
    finish(p, results, {4: -2.0, 5: 5.0})
    (cell,) = replication_cells(SPEC, p, results)
    assert cell.state == AT_MAX_SEEDS and cell.seeds == 5
    final = reconcile(SPEC, p, Observed(results=results), NOW)
    assert final.plan is not None and len(final.plan.runs) == 15 and not final.plan.reserve
    assert final.status["phase"] == "Succeeded" and not final.creates
    assert final.status["replication"]["small/mnli/xnli"] == {"seeds": 5, "state": "stoppedAtMaxSeeds",
                                                               "halfWidth": pytest.approx(cell.half_width, abs=1e-3)}


def test_unfinished_seeds_add_nothing_and_the_local_backend_decides_the_same() -> None:
    p, results = plan(SPEC), {}
    finish(p, results, {1: -3.0, 2: 4.0})
    (cell,) = replication_cells(SPEC, p, results)
    assert cell.state == MEASURING and cell.seeds == 3
    assert replicated(SPEC, p, results) is p
    finish(p, results, {3: 1.0})
    local = reconcile(SPEC, p, local_observed(SPEC.name, (), (), results, {}), NOW, render=False)
    cluster = reconcile(SPEC, p, Observed(results=results), NOW)
    assert [a.run_id for a in local.creates] == [a.run_id for a in cluster.creates] and local.creates
    assert local.status["runs"] == cluster.status["runs"]


def test_replication_and_a_seed_list_cannot_be_combined() -> None:
    text = """
name: both
models: [{name: s, pretrained: org/s, parameters: 1000000}]
targets: [xnli]
seeds: [1, 2]
replication: {targetHalfWidth: 1.0}
"""
    with pytest.raises(SpecError, match=r"replication: cannot be combined with seeds"):
        load_spec_text(text, "both.yaml")
    with pytest.raises(SpecError, match=r"maxSeeds.*must be at least minSeeds"):
        load_spec_text(text.replace("seeds: [1, 2]\n", "").replace("1.0}", "1.0, minSeeds: 5, maxSeeds: 4}"),
                       "bounds.yaml")


def test_a_cell_is_judged_on_its_zero_shot_gain_not_on_english() -> None:
    """English moves by tens of points from seed to seed here, the other languages by a tenth:
    the cell's headline, the zero-shot average, is precise, and the cell stops at minSeeds."""
    p, results = plan(SPEC), {}
    finish(p, results, {1: 2.0, 2: 2.1, 3: 2.05})
    for seed, english in {1: 0.2, 2: 0.9, 3: 0.5}.items():
        arm = target_run(p, "mnli", seed).run_id
        results[arm] = ResultSummary(arm, {**results[arm].scores, "en": english, "zero-shot": 0.52 + seed / 1000})
        base = target_run(p, BASELINE, seed).run_id
        results[base] = ResultSummary(base, {**results[base].scores, "en": 0.5, "zero-shot": 0.5})
    (cell,) = replication_cells(SPEC, p, results)
    assert cell.state == REACHED and cell.half_width is not None and cell.half_width < 0.5


MODEL_AVERAGE = SPEC.model_copy(update={
    "targets": ["xnli", "pawsx"],
    "replication": SPEC.replication.model_copy(update={"unit": "modelAverage"}) if SPEC.replication else None})


def finish_targets(p: Plan, results: dict[str, ResultSummary], gains: dict[int, dict[str, float]]) -> None:
    """Per seed, per target gain in points (the baseline scores 0.5), and the phase-2 runs."""
    for run in (*p.runs, *p.reserve):
        seed, target = run.config.seed, run.labels.target
        if seed not in gains:
            continue
        if run.config.stage is Stage.INTERMEDIATE:
            results[run.run_id] = ResultSummary(run.run_id)
        elif target in gains[seed]:
            score = 0.5 + (gains[seed][target] / 100 if run.labels.intermediate != BASELINE else 0.0)
            results[run.run_id] = ResultSummary(run.run_id, {"avg": score, "zero-shot": score})


def test_a_model_average_unit_is_judged_on_the_gain_averaged_over_targets() -> None:
    """Each target alone is wide (±10 points), their average is the same every seed: the unit
    model × arm has reached its precision at minSeeds, with one status entry for both targets."""
    p, results = plan(MODEL_AVERAGE), {}
    finish_targets(p, results, {1: {"xnli": 5.0, "pawsx": -1.0}, 2: {"xnli": -3.0, "pawsx": 7.0},
                                3: {"xnli": 1.0, "pawsx": 3.0}})
    (cell,) = replication_cells(MODEL_AVERAGE, p, results)
    assert (cell.key, cell.state, cell.seeds) == ("small/mnli", REACHED, 3)
    assert cell.half_width == pytest.approx(0.0, abs=1e-6)
    per_cell = MODEL_AVERAGE.model_copy(update={"replication": SPEC.replication})
    assert {c.state for c in replication_cells(per_cell, plan(per_cell), results)} == {ADDING}
    decision = reconcile(MODEL_AVERAGE, p, Observed(results=results), NOW)
    assert decision.status["replication"] == {"small/mnli": {"seeds": 3, "state": "reached", "halfWidth": 0.0}}


def test_a_wide_model_average_adds_its_seed_to_every_target() -> None:
    p, results = plan(MODEL_AVERAGE), {}
    finish_targets(p, results, {1: {"xnli": 5.0, "pawsx": 5.0}, 2: {"xnli": -3.0, "pawsx": -3.0},
                                3: {"xnli": 1.0}})  # pawsx of seed 3 is still running
    (cell,) = replication_cells(MODEL_AVERAGE, p, results)
    assert cell.state == MEASURING and replicated(MODEL_AVERAGE, p, results) is p
    finish_targets(p, results, {3: {"pawsx": 1.0}})
    (cell,) = replication_cells(MODEL_AVERAGE, p, results)
    assert cell.state == ADDING and cell.seeds == 4
    added = replicated(MODEL_AVERAGE, p, results)
    new = [added.by_id[r] for r in set(added.by_id) - set(p.by_id)]
    assert {(r.config.stage, r.labels.intermediate, r.labels.target, r.config.seed) for r in new} == {
        (Stage.INTERMEDIATE, "mnli", None, 4),
        *((Stage.TARGET, arm, t, 4) for arm in (BASELINE, "mnli") for t in ("xnli", "pawsx"))}
    assert replicated(MODEL_AVERAGE, added, results) is added  # idempotent


def test_the_unit_is_cell_or_model_average() -> None:
    text = """
name: unit
models: [{name: s, pretrained: org/s, parameters: 1000000}]
targets: [xnli]
replication: {targetHalfWidth: 1.0, unit: perLanguage}
"""
    with pytest.raises(SpecError, match=r"replication.unit"):
        load_spec_text(text, "unit.yaml")


def test_plan_prints_the_cost_range_and_what_must_reach_the_precision(tmp_path: Path) -> None:
    from typer.testing import CliRunner
    from xstilts.operator.cli import app

    path = tmp_path / "s.yaml"
    doc = MODEL_AVERAGE.model_dump(by_alias=True, exclude_none=True, mode="json")
    doc.pop("seeds")  # the dump writes out the seeds replication chooses
    path.write_text(yaml.safe_dump(doc))
    out = CliRunner().invoke(app, ["plan", str(path)], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    # per seed: mnli, and baseline and mnli target runs for xnli and pawsx
    assert ("replication to ±1 points per model × arm (over the targets): at least 15 runs" in text
            and "at most 25 runs" in text and "(every one needs 5 seeds)" in text)
