"""The learning-rate search (hyperparameters.<stage>.search): the spec accepts and checks it,
plan makes one run per rate (a phase-2 search holds the arms' target runs back), `plan`
prints its cost, reconcile starts the target runs of the phase-2 rate selected on English
dev once every candidate has its result, and the report uses the selected runs only and
shows every candidate's English dev score, in its tables and its MLflow metrics."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner
from xstilts.operator.cli import app
from xstilts.operator.cluster.reconcile import Observed, ResultSummary, reconcile, searched
from xstilts.operator.experiment.plan import Plan, PlannedRun, plan, search_cost
from xstilts.operator.experiment.search import select
from xstilts.operator.experiment.spec import BASELINE, ExperimentSpec, SpecError, load_spec_text
from xstilts.operator.report.build import AVG, build_report, grid_of, to_markdown
from xstilts.operator.report.storage import parent_metrics, report_record
from xstilts.trainer.config import RunResult, Stage

SPEC = """
name: lr-search
models:
  - {name: small, pretrained: org/small, parameters: 100000000, resources: {gpus: 1, zeroStage: 0}}
intermediateTasks: [mnli]
targets: [pawsx, tatoeba]
evalLanguages: {pawsx: [en, de], tatoeba: [de]}
seeds: [1, 2]
hyperparameters:
  intermediate: {learningRate: 2.0e-5, search: {learningRate: [1.0e-5, 3.0e-5]}}
  target: {search: {learningRate: [1.0e-5, 2.0e-5, 5.0e-5]}}
cluster: {maxParallel: 100}
"""
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def spec_of(text: str = SPEC) -> ExperimentSpec:
    return load_spec_text(text, "lr-search.yaml")


def test_the_spec_reads_a_search_per_stage_and_checks_it() -> None:
    spec = spec_of()
    assert spec.hyperparameters.intermediate.learning_rates == (1e-5, 3e-5)
    assert spec.hyperparameters.target.learning_rates == (1e-5, 2e-5, 5e-5)
    for bad, where in (
        ("[1.0e-5, 1.0e-5]", "hyperparameters.target.search.learningRate"),
        ("[1.0e-5]", "hyperparameters.target.search.learningRate"),
        ("[0, 1.0e-5]", "hyperparameters.target.search.learningRate"),
    ):
        with pytest.raises(SpecError) as e:
            spec_of(SPEC.replace("[1.0e-5, 2.0e-5, 5.0e-5]", bad))
        assert where in str(e.value)
    replicated = SPEC.replace("seeds: [1, 2]", "replication: {targetHalfWidth: 1.0}")
    with pytest.raises(SpecError) as e:
        spec_of(replicated)
    assert "hyperparameters.intermediate.search" in str(e.value) and "replication" in str(e.value)


def test_plan_makes_a_run_per_rate_and_holds_the_arm_target_runs_for_the_selection() -> None:
    p = plan(spec_of())
    phase2 = [r for r in p.runs if r.config.stage is Stage.INTERMEDIATE]
    assert sorted((r.config.seed, r.config.hyperparameters.learning_rate) for r in phase2) == [
        (1, 1e-5), (1, 3e-5), (2, 1e-5), (2, 3e-5)]
    assert all(r.labels.learning_rates == (1e-5, 3e-5) for r in phase2)
    baseline = [r for r in p.runs if r.config.stage is Stage.TARGET]
    assert all(r.labels.intermediate == BASELINE for r in baseline)
    # pawsx: one run per target rate; tatoeba trains nothing, so it is not searched
    pawsx = sorted(r.config.hyperparameters.learning_rate for r in baseline
                   if r.labels.target == "pawsx" and r.config.seed == 1)
    assert pawsx == [1e-5, 2e-5, 5e-5]
    assert [r.labels.learning_rates for r in baseline if r.labels.target == "tatoeba"] == [(), ()]
    # each arm target run waits, per phase-2 candidate: 2 seeds × 2 candidates × (3 pawsx + 1 tatoeba)
    assert len(p.held) == 16 and not p.reserve
    assert {r.depends_on[0] for r in p.held} == {r.run_id for r in phase2}
    assert len(p.runs) == 4 + 2 * 4
    cost = search_cost(spec_of(), p)
    assert cost is not None
    assert cost.runs == 12 + 8 and cost.runs_without == 2 + 2 * 2 * 2
    assert cost.gpu_hours > cost.gpu_hours_without > 0
    # without a search the runs and their RUN.json stay as they were
    plain = plan(spec_of(SPEC.replace(", search: {learningRate: [1.0e-5, 3.0e-5]}", "")
                         .replace("target: {search: {learningRate: [1.0e-5, 2.0e-5, 5.0e-5]}}", "target: {}")))
    assert not plain.held and all("learning_rates" not in r.config.to_json() for r in plain.runs)


def test_plan_prints_what_the_search_costs(tmp_path: Path) -> None:
    runner = CliRunner()
    path = tmp_path / "s.yaml"
    path.write_text(SPEC)
    out = runner.invoke(app, ["plan", str(path)], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())  # the console wraps long lines
    assert "learning-rate search (intermediate 1e-05, 3e-05; target 1e-05, 2e-05, 5e-05): 20 runs" in text
    assert "without the search 10 runs" in text
    doc = json.loads(runner.invoke(app, ["plan", str(path), "-o", "json"]).output)
    assert doc["totals"]["search"]["runs"] == 20 and doc["totals"]["held_runs"] == 16


def test_select_takes_the_best_mean_once_every_candidate_has_every_seed() -> None:
    dev = {1e-5: {1: 0.70, 2: 0.74}, 3e-5: {1: 0.75, 2: 0.71}}
    assert select(dev, (1e-5, 3e-5), [1, 2]) == 3e-5  # means 0.72 and 0.73
    dev[1e-5][2] = 0.77  # 0.735 > 0.73
    assert select(dev, (1e-5, 3e-5), [1, 2]) == 1e-5
    assert select({1e-5: {1: 0.7}, 3e-5: {1: 0.7}}, (3e-5, 1e-5), [1]) == 3e-5  # a tie: the first listed
    assert select({1e-5: {1: 0.7}}, (1e-5, 3e-5), [1]) is None


def phase2_runs(p: Plan) -> list[PlannedRun]:
    return [r for r in p.runs if r.config.stage is Stage.INTERMEDIATE]


def test_reconcile_starts_the_target_runs_of_the_selected_phase2_rate_only() -> None:
    spec = spec_of()
    p = plan(spec)
    results: dict[str, ResultSummary] = {}
    dev = {1e-5: 0.80, 3e-5: 0.85}
    for run in phase2_runs(p)[:-1]:  # one candidate's result still missing: nothing is selected
        results[run.run_id] = ResultSummary(run.run_id, dev=dev[run.config.hyperparameters.learning_rate])
    decision = reconcile(spec, p, Observed(results=results), NOW, render=False)
    assert decision.plan is not None and len(decision.plan.runs) == len(p.runs)
    assert decision.status["learningRateSearch"] == {"small/mnli": {"state": "searching"}}
    last = phase2_runs(p)[-1]
    results[last.run_id] = ResultSummary(last.run_id, dev=dev[last.config.hyperparameters.learning_rate])
    decision = reconcile(spec, p, Observed(results=results), NOW, render=False)
    assert decision.status["learningRateSearch"] == {"small/mnli": {"learningRate": 3e-5}}
    extended = decision.plan
    assert extended is not None
    added = [r for r in extended.runs if r.run_id not in p.by_id]
    winners = {r.run_id for r in phase2_runs(p) if r.config.hyperparameters.learning_rate == 3e-5}
    assert len(added) == 8 and all(r.depends_on[0] in winners for r in added)
    assert len(extended.held) == 8
    # the added runs are ready: every arm target run of the selected rate is created
    created = {c.run_id for c in decision.creates}
    assert {r.run_id for r in added} <= created
    assert searched(spec, extended, results) is extended  # idempotent


def result(run: PlannedRun, dev: float, en: float, de: float) -> RunResult:
    target = run.labels.target
    if target is None:
        languages: dict[str, dict[str, float]] = {}
        metrics = {"dev.accuracy": dev}
    elif target == "tatoeba":
        languages = {"de": {"accuracy": de}}
        metrics = {}
    else:
        languages = {"en": {"accuracy": en}, "de": {"accuracy": de}}
        metrics = {"dev.accuracy": dev}
    return RunResult(run_id=run.run_id, config=run.config, metrics=metrics, languages=languages,
                     parameter_count=100_000_000, tokens_seen=1, train_steps=1, wall_seconds=1.0,
                     tokens_per_second=1.0, finished_at="2025-01-01T00:00:00+00:00")


def test_the_report_uses_the_selected_runs_and_shows_the_alternatives() -> None:
    spec = spec_of()
    p = plan(spec)
    results: list[RunResult] = []
    # phase 2: 3e-5 wins on English dev (0.85 vs 0.80)
    for run in phase2_runs(p):
        results.append(result(run, 0.85 if run.config.hyperparameters.learning_rate == 3e-5 else 0.80, 0, 0))
    summaries = {r.run_id: ResultSummary(r.run_id, dev=r.metrics["dev.accuracy"]) for r in results}
    extended = searched(spec, p, summaries)
    target_rate_dev = {1e-5: 0.60, 2e-5: 0.70, 5e-5: 0.65}  # 2e-5 wins for every cell
    for run in [*extended.runs, *extended.held]:  # the held ones too: the report must leave them out
        if run.config.stage is not Stage.TARGET:
            continue
        lr = run.config.hyperparameters.learning_rate
        arm = 10 if run.labels.intermediate == "mnli" else 0
        # the selected rate scores 70/50 (+arm); the others score 90/90, so using them would show
        good = lr == 2e-5 or run.labels.target == "tatoeba"
        en, de = (0.70 + arm / 100, 0.50 + arm / 100) if good else (0.90, 0.90)
        if run in extended.held:  # a run from the unselected phase-2 rate
            en, de = 0.99, 0.99
        results.append(result(run, target_rate_dev[lr] if run.labels.target == "pawsx" else 0, en, de))
    report = build_report(results, grid_of(spec))
    cell = report.cell("small", "mnli", "pawsx", AVG)
    assert cell is not None and cell.gain.mean == pytest.approx(10.0) and cell.gain.n == 2
    tatoeba = report.cell("small", "mnli", "tatoeba", AVG)
    assert tatoeba is not None and tatoeba.gain.mean == pytest.approx(10.0)
    choices = {(c.stage, c.arm, c.target): c for c in report.search}
    assert choices[(Stage.INTERMEDIATE, "mnli", None)].selected == 3e-5
    assert dict(choices[(Stage.INTERMEDIATE, "mnli", None)].dev) == {1e-5: pytest.approx(80), 3e-5: pytest.approx(85)}
    assert choices[(Stage.TARGET, BASELINE, "pawsx")].selected == 2e-5
    assert choices[(Stage.TARGET, "mnli", "pawsx")].selected == 2e-5
    assert (Stage.TARGET, "mnli", "tatoeba") not in choices  # retrieval: nothing to search
    md = to_markdown(report)
    assert "## Learning-rate search" in md
    assert "| target | small | mnli | pawsx | 2e-05 | 1e-05: 60.00, 2e-05: 70.00, 5e-05: 65.00 |" in md
    metrics = parent_metrics(report)
    assert metrics["search.intermediate.small.mnli.learning_rate"] == 3e-5
    assert metrics["search.target.small.mnli.pawsx.dev.5e-05"] == pytest.approx(65)
    record: Any = report_record(report)
    assert {"stage": "intermediate", "model": "small", "intermediate": "mnli", "target": None,
            "selected": 3e-5, "english_dev": {"1e-05": pytest.approx(80), "3e-05": pytest.approx(85)}} in record[
        "learning_rate_search"]


def test_the_status_best_gain_counts_the_selected_target_rate_only() -> None:
    spec = spec_of(SPEC.replace(", search: {learningRate: [1.0e-5, 3.0e-5]}", "").replace("tatoeba]", "]")
                   .replace(", tatoeba: [de]", ""))
    p = plan(spec)
    results: dict[str, ResultSummary] = {}
    for run in p.runs:
        if run.config.stage is Stage.INTERMEDIATE:
            results[run.run_id] = ResultSummary(run.run_id, dev=0.5)
            continue
        lr = run.config.hyperparameters.learning_rate
        arm = run.labels.intermediate == "mnli"
        # 2e-5 is best on English dev and gains 5 points; 5e-5 would show a 40-point gain
        dev = {1e-5: 0.6, 2e-5: 0.7, 5e-5: 0.65}[lr]
        score = 0.5 + (0.05 if arm else 0) if lr != 5e-5 else (0.9 if arm else 0.5)
        results[run.run_id] = ResultSummary(run.run_id, {AVG: score}, dev=dev)
    best = reconcile(spec, p, Observed(results=results), NOW, render=False).status["bestGain"]
    assert best == "+5.0 pawsx/mnli@small"


def test_select_passes_over_failed_candidates() -> None:
    dev = {1e-5: {1: 0.70, 2: 0.72}, 3e-5: {1: 0.90}}
    assert select(dev, (1e-5, 3e-5), [1, 2]) is None  # 3e-5 lacks seed 2
    assert select(dev, (1e-5, 3e-5), [1, 2], failed={3e-5}) == 1e-5
    assert select(dev, (1e-5, 3e-5), [1, 2], failed={1e-5, 3e-5}) is None


def test_a_failed_phase2_candidate_does_not_hold_its_arm_back_forever() -> None:
    """One candidate's run fails: reconcile selects among the candidates that succeeded, starts
    the target runs of the selected one, and keeps that selection once they have started, even
    when the failed run is retried later and scores best; with every candidate failed the arm's
    state is 'failed'."""
    from xstilts.operator.cluster.reconcile import FAILED, ObservedJob
    from xstilts.operator.cluster.render import job_name

    spec = spec_of()
    p = plan(spec)
    broken = next(r for r in phase2_runs(p) if r.config.hyperparameters.learning_rate == 3e-5 and r.config.seed == 2)
    results = {r.run_id: ResultSummary(r.run_id, dev=0.90 if r.config.hyperparameters.learning_rate == 3e-5 else 0.80)
               for r in phase2_runs(p) if r is not broken}
    failed_job = ObservedJob(job_name(spec.name, broken.run_id), broken.run_id, "failed", failure_reason="OOMKilled")
    for observed in (Observed(jobs=[failed_job], results=results),
                     # the failed Job is gone: the failure is remembered in the status, as the local executor does
                     Observed(results=results, previous_status={"runs": {broken.run_id: FAILED}})):
        decision = reconcile(spec, p, observed, NOW, render=False)
        assert decision.status["learningRateSearch"] == {"small/mnli": {"learningRate": 1e-5}}
        assert decision.plan is not None
        added = [r for r in decision.plan.runs if r.run_id not in p.by_id]
        assert len(added) == 8 and all(p.by_id[r.depends_on[0]].config.hyperparameters.learning_rate == 1e-5
                                       for r in added)
        assert {r.run_id for r in added} <= {c.run_id for c in decision.creates}
    # later: the failed run is retried and scores best; the 1e-5 target runs have started, so 1e-5 stays
    retried = {**results, broken.run_id: ResultSummary(broken.run_id, dev=0.95)}
    running = [ObservedJob(job_name(spec.name, r.run_id), r.run_id, "running") for r in added[:1]]
    decision = reconcile(spec, p, Observed(jobs=running, results=retried), NOW, render=False)
    assert decision.status["learningRateSearch"] == {"small/mnli": {"learningRate": 1e-5}}
    assert decision.plan is not None and {r.run_id for r in decision.plan.runs if r.run_id not in p.by_id} == {
        r.run_id for r in added}
    # every candidate failed: nothing starts, and the status says so
    all_failed = {r.run_id: FAILED for r in phase2_runs(p) if r.config.seed == 2}
    decision = reconcile(spec, p, Observed(results={k: v for k, v in results.items() if k not in all_failed},
                                           previous_status={"runs": all_failed}), NOW, render=False)
    assert decision.status["learningRateSearch"] == {"small/mnli": {"state": "failed"}}
    assert decision.plan is not None and len(decision.plan.runs) == len(p.runs)


def test_the_report_uses_the_candidate_the_target_runs_started_from() -> None:
    """Results do not record failures: when a candidate's run failed, the report's phase-2
    selection is the candidate the arm's target runs started from (reconcile's)."""
    spec = spec_of()
    p = plan(spec)
    broken = next(r for r in phase2_runs(p) if r.config.hyperparameters.learning_rate == 3e-5 and r.config.seed == 2)
    results = [result(r, 0.90 if r.config.hyperparameters.learning_rate == 3e-5 else 0.80, 0, 0)
               for r in phase2_runs(p) if r is not broken]
    summaries = {r.run_id: ResultSummary(r.run_id, dev=r.metrics["dev.accuracy"]) for r in results}
    extended = searched(spec, p, summaries, failed={broken.run_id})
    for run in extended.runs:
        if run.config.stage is Stage.TARGET and run.labels.target == "pawsx" and \
                run.config.hyperparameters.learning_rate == 2e-5:
            results.append(result(run, 0.7, 0.7, 0.6))
    report = build_report(results, grid_of(spec))
    phase2 = [c for c in report.search if c.stage is Stage.INTERMEDIATE]
    assert [(c.arm, c.selected) for c in phase2] == [("mnli", 1e-5)]
