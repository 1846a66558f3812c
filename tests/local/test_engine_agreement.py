"""The local executor's bookkeeping (dag_state.Schedule) and the controller's reconcile() must
decide alike: from the same observations (which runs have a result, which failed), the same
runs may start, the same are blocked, the same stay failed. A first step towards one engine
(docs/decisions/one-orchestration-engine.md): until the local executor drives reconcile()
itself, this pins the two to the same dependency and failure rules."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st
from xstilts.operator.cluster.reconcile import CreateRun, Observed, ResultSummary, reconcile
from xstilts.operator.experiment.plan import plan
from xstilts.operator.experiment.spec import ExperimentSpec
from xstilts.operator.local.dag_state import Schedule, State

SPEC = ExperimentSpec.model_validate({
    "name": "grid",
    "models": [{"name": "small", "pretrained": "org/small", "parameters": 100_000_000,
                "resources": {"gpus": 1, "zeroStage": 0}}],
    "intermediateTasks": ["mnli", "hellaswag"],
    "targets": ["xnli", "pawsx"],
    "seeds": [1, 2],
    "cluster": {"maxParallel": 1000},  # no parallelism limit: compare which runs may start
})
PLAN = plan(SPEC)
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@st.composite
def observations(draw: st.DrawFn) -> tuple[set[str], dict[str, str]]:
    """A consistent history: a run has a result or failed only once its dependencies had results."""
    finished: set[str] = set()
    failed: dict[str, str] = {}
    for run in PLAN.runs:  # dependencies first
        if all(d in finished for d in run.depends_on):
            outcome = draw(st.sampled_from(["finished", "failed", "not run"]))
            if outcome == "finished":
                finished.add(run.run_id)
            elif outcome == "failed":
                failed[run.run_id] = "invalid config"
    return finished, failed


def decide_both(finished: set[str], failed: dict[str, str]) -> tuple[Schedule, dict[str, str], set[str]]:
    schedule = Schedule.from_plan(PLAN, finished=finished, failed_before=failed)
    observed = Observed(results={r: ResultSummary(r) for r in finished},
                        previous_status={"runs": dict.fromkeys(failed, "failed"), "failures": failed})
    decision = reconcile(SPEC, PLAN, observed, NOW)
    creates = {a.run_id for a in decision.actions if isinstance(a, CreateRun)}
    return schedule, decision.status["runs"], creates


@settings(max_examples=200, deadline=None)
@given(observations())
def test_local_bookkeeping_and_reconcile_agree(history: tuple[set[str], dict[str, str]]) -> None:
    finished, failed = history
    schedule, states, creates = decide_both(finished, failed)
    assert set(schedule.ready()) == creates
    assert set(schedule.runs_in(State.BLOCKED)) == {r for r, s in states.items() if s == "blocked"}
    assert set(schedule.runs_in(State.FAILED)) == {r for r, s in states.items() if s == "failed"}
    assert set(schedule.runs_in(State.SKIPPED)) == {r for r, s in states.items() if s == "succeeded"}


def test_a_failed_intermediate_run_blocks_its_target_runs_in_both() -> None:
    intermediate = next(r for r in PLAN.runs if any(r.run_id in d.depends_on for d in PLAN.runs))
    dependants = {r.run_id for r in PLAN.runs if intermediate.run_id in r.depends_on}
    assert dependants
    finished = set(intermediate.depends_on)
    schedule, states, creates = decide_both(finished, {intermediate.run_id: "invalid config"})
    assert dependants <= set(schedule.runs_in(State.BLOCKED))
    assert all(states[r] == "blocked" for r in dependants)
    assert not dependants & creates and not dependants & set(schedule.ready())
