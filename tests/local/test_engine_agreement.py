"""One orchestration engine (docs/decisions/one-orchestration-engine.md): the local executor
has no DAG logic of its own. It turns what it sees (results in run directories, failure files,
live processes, runs created but not started) into reconcile()'s `Observed` (`local_observed`)
and carries out the decision. These tests pin that mapping, and the rules the local executor
now gets from reconcile(): dependencies first, a failure blocks exactly its dependants,
--parallel is maxParallel, and ready runs start most-unblocking first."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st
from xstilts.operator.cluster.reconcile import ResultSummary, reconcile, start_order
from xstilts.operator.experiment.plan import plan
from xstilts.operator.experiment.spec import ExperimentSpec
from xstilts.operator.local.executor import blocked_reasons, local_observed
from xstilts.trainer.config import Stage

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


def with_parallel(n: int) -> ExperimentSpec:
    return SPEC.model_copy(update={"cluster": SPEC.cluster.model_copy(update={"max_parallel": n})})


@st.composite
def observations(draw: st.DrawFn) -> tuple[set[str], dict[str, str], set[str]]:
    """A consistent local history: a run has a result, failed, or has a live process only once
    its dependencies had results."""
    finished: set[str] = set()
    failed: dict[str, str] = {}
    running: set[str] = set()
    for run in PLAN.runs:  # dependencies first
        if all(d in finished for d in run.depends_on):
            outcome = draw(st.sampled_from(["finished", "failed", "running", "not run"]))
            if outcome == "finished":
                finished.add(run.run_id)
            elif outcome == "failed":
                failed[run.run_id] = "exit 42 (invalid config or data)"
            elif outcome == "running":
                running.add(run.run_id)
    return finished, failed, running


def downstream(run_ids: set[str]) -> set[str]:
    found: set[str] = set()
    for run in PLAN.runs:
        if any(d in run_ids or d in found for d in run.depends_on):
            found.add(run.run_id)
    return found


@settings(max_examples=200, deadline=None)
@given(observations(), st.integers(min_value=1, max_value=6))
def test_local_observations_drive_reconcile_by_the_dependency_and_failure_rules(
        history: tuple[set[str], dict[str, str], set[str]], parallel: int) -> None:
    finished, failed, running = history
    observed = local_observed(SPEC.name, running, (), {r: ResultSummary(r) for r in finished}, failed)
    decision = reconcile(with_parallel(parallel), PLAN, observed, NOW, render=False)
    states = decision.status["runs"]
    creates = [a.run_id for a in decision.creates]
    assert all(not a.objects for a in decision.creates)  # the local backend renders nothing
    assert {r for r, s in states.items() if s == "succeeded"} == finished
    assert {r for r, s in states.items() if s == "failed"} == set(failed)
    assert {r for r, s in states.items() if s == "running"} == running
    assert {r for r, s in states.items() if s == "blocked"} == downstream(set(failed)) - finished - running
    # a run starts only once every run it needs has a result; never twice; never beyond --parallel
    ready = [r.run_id for r in PLAN.runs if r.run_id not in finished | set(failed) | running
             and all(d in finished for d in r.depends_on)]
    assert set(creates) <= set(ready) and not set(creates) & running
    assert len(creates) == min(len(ready), max(0, parallel - len(running)))
    assert creates == start_order(PLAN, ready)[:len(creates)]
    assert decision.status["failures"] if failed else "failures" not in decision.status


def test_a_failed_intermediate_run_blocks_its_target_runs_and_says_why() -> None:
    intermediate = next(r for r in PLAN.runs if any(r.run_id in d.depends_on for d in PLAN.runs))
    dependants = {r.run_id for r in PLAN.runs if intermediate.run_id in r.depends_on}
    assert dependants
    observed = local_observed(SPEC.name, (), (), {}, {intermediate.run_id: "exit 42"})
    decision = reconcile(SPEC, PLAN, observed, NOW, render=False)
    states = decision.status["runs"]
    assert all(states[r] == "blocked" for r in dependants)
    assert not dependants & {a.run_id for a in decision.creates}
    assert decision.status["failures"] == {intermediate.run_id: "exit 42"}
    assert blocked_reasons(PLAN, states) == dict.fromkeys(dependants, f"needs run {intermediate.run_id}, which failed")


def test_a_created_run_waiting_for_its_gpus_holds_its_slot_and_is_not_created_twice() -> None:
    first = start_order(PLAN, [r.run_id for r in PLAN.runs if not r.depends_on])
    held = local_observed(SPEC.name, (), [first[0]], {}, {})
    decision = reconcile(with_parallel(2), PLAN, held, NOW, render=False)
    assert decision.status["runs"][first[0]] == "pending"
    assert [a.run_id for a in decision.creates] == [first[1]]


def test_phase_2_runs_start_before_baselines_because_target_runs_wait_on_them() -> None:
    decision = reconcile(with_parallel(4), PLAN, local_observed(SPEC.name, (), (), {}, {}), NOW, render=False)
    assert [PLAN.by_id[a.run_id].config.stage for a in decision.creates] == [Stage.INTERMEDIATE] * 4
    assert all(PLAN.by_id[a.run_id].labels.intermediate != "baseline" for a in decision.creates)
