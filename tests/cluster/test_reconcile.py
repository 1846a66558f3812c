"""reconcile: table-driven cases for each rule, and a property: any sequence of observations
(Jobs start, succeed, fail, get deleted; results appear; stray Jobs show up), with the
decisions applied in between, converges to every run done or blocked — never creating a run
twice, never exceeding maxParallel, never starting a run before its dependency's result,
and blocking exactly the dependants of failed phase-2 runs."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from xstilts.operator.cluster.reconcile import (
    FAILURES_KEPT,
    RUNS_IN_STATUS,
    CreateRun,
    Decision,
    DeleteJob,
    Observed,
    ObservedJob,
    ResultSummary,
    best_gain,
    gains,
    reconcile,
    start_order,
    summarised,
    with_refused,
    without_refusals,
)
from xstilts.operator.cluster.render import RUN_ID_LABEL, OwnerRef, job_name, render_run
from xstilts.operator.experiment.plan import PlannedRun, plan
from xstilts.operator.experiment.spec import MAX_RUNS, ExperimentSpec
from xstilts.trainer.config import RunResult, Stage

SPEC = ExperimentSpec.model_validate({
    "name": "grid",
    "models": [
        {"name": "small", "pretrained": "org/small", "parameters": 100_000_000,
         "resources": {"gpus": 1, "zeroStage": 0}},
        {"name": "big", "pretrained": "org/big", "parameters": 1_000_000_000,
         "resources": {"gpus": 2, "zeroStage": 0}},
    ],
    "intermediateTasks": ["mnli", "hellaswag"],
    "targets": ["xnli", "pawsx"],
    "seeds": [1, 2],
    "cluster": {"maxParallel": 3},
})
PLAN = plan(SPEC)
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
OWNER = OwnerRef(apiVersion="xstilts.dev/v1alpha1", kind="Experiment", name="grid", uid="uid-1")
ACTIVE = {"pending", "running"}


def with_max_parallel(n: int) -> ExperimentSpec:
    return SPEC.model_copy(update={"cluster": SPEC.cluster.model_copy(update={"max_parallel": n})})


def run(model: str, intermediate: str, target: str | None = None, seed: int = 1) -> PlannedRun:
    return next(r for r in PLAN.runs if r.labels.model == model and r.labels.intermediate == intermediate
                and r.labels.target == target and r.config.seed == seed)


def job(run_id: str, phase: Any, **kw: Any) -> ObservedJob:
    return ObservedJob(name=job_name(SPEC.name, run_id), run_id=run_id, phase=phase, **kw)


def result(run_id: str, avg: float | None = None, gpu_seconds: float = 0.0) -> ResultSummary:
    return ResultSummary(run_id, {"avg": avg} if avg is not None else {}, gpu_seconds=gpu_seconds)


def decide(jobs: Sequence[ObservedJob] = (), results: Sequence[ResultSummary] = (),
           previous: dict[str, Any] | None = None, spec: ExperimentSpec = SPEC, now: datetime = NOW) -> Decision:
    observed = Observed(jobs=list(jobs), results={r.run_id: r for r in results}, previous_status=previous)
    return reconcile(spec, PLAN, observed, now, owner=OWNER)


def created(decision: Decision) -> list[str]:
    return [a.run_id for a in decision.creates]


# --- the rules, case by case ----------------------------------------------------------------


def test_fresh_experiment_creates_runs_without_dependencies_up_to_max_parallel_most_unblocking_first() -> None:
    d = decide()
    independent = [r.run_id for r in PLAN.runs if not r.depends_on]
    # phase-2 runs (each unblocks a target run per target) take the slots before baselines
    # (which unblock nothing); among equals, plan order
    phase2 = [r for r in independent if PLAN.by_id[r].config.stage is Stage.INTERMEDIATE]
    assert created(d) == phase2[:3]
    assert created(d) != independent[:3]  # plan order would have started a baseline third
    assert all(isinstance(a, CreateRun) for a in d.actions)
    first = d.creates[0]
    assert first.job_name == job_name("grid", first.run_id)
    assert [o["kind"] for o in first.objects] == ["ConfigMap", "Job"]
    assert first.objects[-1]["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert d.status["phase"] == "Pending"
    assert d.status["counts"] == {"total": 32, "pending": 32, "running": 0, "succeeded": 0, "failed": 0, "blocked": 0}
    states = Counter(d.status["runs"].values())
    assert states == {"creating": 3, "queued": len(independent) - 3, "waiting": 32 - len(independent)}


def test_active_jobs_use_up_the_parallelism_budget() -> None:
    a, b, c = start_order(PLAN, [r.run_id for r in PLAN.runs if not r.depends_on])[:3]
    assert created(decide([job(a, "running"), job(b, "pending")])) == [c]
    assert created(decide([job(a, "running"), job(b, "pending"), job(c, "running")])) == []
    # Finished Jobs hold no GPUs: they do not count.
    assert len(created(decide([job(a, "succeeded"), job(b, "failed")]))) == 3


def test_a_run_whose_job_exists_is_never_created_again() -> None:
    runs = [r.run_id for r in PLAN.runs if not r.depends_on]
    for phase in ("pending", "running", "succeeded", "failed"):
        d = decide([job(runs[0], phase)], spec=with_max_parallel(100))
        assert runs[0] not in created(d)


def test_phase_3_waits_for_the_phase_2_result_not_for_the_job() -> None:
    parent = run("small", "mnli")
    child = run("small", "mnli", "xnli")
    wide = with_max_parallel(100)
    d = decide([job(parent.run_id, "running")], spec=wide)
    assert child.run_id not in created(d) and d.status["runs"][child.run_id] == "waiting"
    # The Job succeeded but result.json is not visible yet: finishing, nothing created, nothing redone.
    d = decide([job(parent.run_id, "succeeded")], spec=wide)
    assert d.status["runs"][parent.run_id] == "finishing"
    assert parent.run_id not in created(d) and child.run_id not in created(d)
    d = decide([job(parent.run_id, "succeeded")], [result(parent.run_id)], spec=wide)
    assert d.status["runs"][parent.run_id] == "succeeded"
    assert {r.run_id for r in PLAN.dependants(parent.run_id)} <= set(created(d))


def test_a_run_with_a_result_is_done_even_when_its_job_is_gone() -> None:
    parent = run("small", "mnli")
    d = decide([], [result(parent.run_id)], spec=with_max_parallel(100))
    assert parent.run_id not in created(d)
    assert d.status["runs"][parent.run_id] == "succeeded"


def test_a_finished_run_is_left_to_its_job_ttl_and_asks_for_no_deletion() -> None:
    """A finished run's Job stays until ttlSecondsAfterFinished (its logs with it), and once
    the TTL removed it reconcile cannot see whether the ConfigMap is still there: a delete
    asked for then would repeat on every reconcile (k8s/README.md, "What stays after a run
    finishes")."""
    finished = [r.run_id for r in PLAN.runs if not r.depends_on][:2]
    results = [result(rid) for rid in finished]
    for jobs in ([job(rid, "succeeded") for rid in finished], [job(finished[0], "succeeded")], []):
        d = decide(jobs, results, spec=with_max_parallel(100))
        assert d.deletes == []
        assert [d.status["runs"][rid] for rid in finished] == ["succeeded", "succeeded"]


def test_a_failed_phase_2_run_blocks_exactly_its_dependants() -> None:
    parent = run("small", "mnli", seed=1)
    d = decide([job(parent.run_id, "failed", failure_reason="BackoffLimitExceeded")], spec=with_max_parallel(100))
    dependants = {r.run_id for r in PLAN.dependants(parent.run_id)}
    blocked = {rid for rid, state in d.status["runs"].items() if state == "blocked"}
    assert blocked == dependants
    assert not dependants & set(created(d))
    assert d.status["runs"][parent.run_id] == "failed"
    assert d.status["failures"] == {parent.run_id: "BackoffLimitExceeded"}
    degraded = next(c for c in d.status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and parent.run_id in degraded["message"]
    assert d.status["counts"]["blocked"] == len(dependants) == 2


def test_a_job_deleted_by_hand_is_recreated() -> None:
    target = run("small", "baseline", "xnli")
    previous = decide([job(target.run_id, "running")]).status
    d = decide([], previous=previous, spec=with_max_parallel(100))
    assert target.run_id in created(d)


def test_a_failed_run_stays_failed_after_its_job_expires() -> None:
    parent = run("small", "mnli")
    previous = decide([job(parent.run_id, "failed", failure_reason="PodFailurePolicy")]).status
    d = decide([], previous=previous, spec=with_max_parallel(100))
    assert parent.run_id not in created(d)
    assert d.status["runs"][parent.run_id] == "failed"
    assert d.status["failures"][parent.run_id] == "PodFailurePolicy"
    assert all(d.status["runs"][r.run_id] == "blocked" for r in PLAN.dependants(parent.run_id))


def test_orphan_and_duplicate_jobs_are_deleted_and_still_count_while_active() -> None:
    first = PLAN.runs[0].run_id
    orphan = ObservedJob(name="grid-0123456789ab", run_id="0123456789ab", phase="running")
    duplicate = ObservedJob(name="old-name", run_id=first, phase="succeeded")
    d = decide([orphan, duplicate, job(first, "running")])
    deletes = [a for a in d.actions if isinstance(a, DeleteJob)]
    assert [x.name for x in deletes] == ["grid-0123456789ab", "old-name"]
    assert "no longer in the plan" in deletes[0].reason
    assert "duplicate" in deletes[1].reason
    assert d.actions[: len(deletes)] == deletes  # deletes come first
    assert len(created(d)) == 1  # 3 - the orphan - the run's own running Job


def test_status_phases() -> None:
    everything = [result(r.run_id, 0.7) for r in PLAN.runs]
    d = decide([], everything)
    assert d.actions == []
    assert d.status["phase"] == "Succeeded"
    ready = next(c for c in d.status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["reason"] == "AllRunsSucceeded"

    failed_parent = run("small", "mnli")
    rest = [r for r in everything if r.run_id != failed_parent.run_id
            and r.run_id not in {x.run_id for x in PLAN.dependants(failed_parent.run_id)}]
    d = decide([job(failed_parent.run_id, "failed")], rest)
    assert d.status["phase"] == "PartiallyFailed"
    assert d.actions == []

    jobs = [job(r.run_id, "failed") for r in PLAN.runs if not r.depends_on]
    d = decide(jobs)
    assert d.status["phase"] == "Failed"
    assert d.status["counts"]["failed"] + d.status["counts"]["blocked"] == 32

    d = decide([job(PLAN.runs[0].run_id, "running")])
    assert d.status["phase"] == "Running"


def test_condition_transition_times_move_only_when_the_status_changes() -> None:
    first = decide(now=NOW).status
    later = NOW + timedelta(hours=1)
    second = decide(previous=first, now=later).status
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert times == dict.fromkeys(("Ready", "Progressing", "Degraded"), "2025-06-01T12:00:00Z")
    third = decide([job(PLAN.runs[0].run_id, "failed")], previous=second, now=later).status
    degraded = next(c for c in third["conditions"] if c["type"] == "Degraded")
    assert degraded["lastTransitionTime"] == "2025-06-01T13:00:00Z"


def test_gpu_hours_used_counts_results_and_job_lifetimes() -> None:
    done, running, failed, pending = (r.run_id for r in PLAN.runs[:4])
    d = decide(
        [job(running, "running", start_time=NOW - timedelta(hours=2), gpus=2),
         job(pending, "pending", start_time=NOW - timedelta(hours=7), gpus=2),  # holds no GPU yet
         job(failed, "failed", start_time=NOW - timedelta(hours=5), completion_time=NOW - timedelta(hours=4), gpus=2),
         job(done, "succeeded", start_time=NOW - timedelta(hours=9), completion_time=NOW, gpus=2)],
        [result(done, gpu_seconds=3 * 3600)],
    )
    assert d.status["gpuHoursUsed"] == pytest.approx(3 + 4 + 2)
    assert d.status["gpuHoursEstimated"] == pytest.approx(PLAN.gpu_hours, rel=1e-3)


def test_best_gain_is_the_largest_mean_gain_over_seeds() -> None:
    scores = {
        ("small", "baseline", "xnli", 1): 0.70, ("small", "mnli", "xnli", 1): 0.73,
        ("small", "baseline", "xnli", 2): 0.70, ("small", "mnli", "xnli", 2): 0.75,
        ("small", "hellaswag", "xnli", 1): 0.71,
        ("big", "baseline", "pawsx", 1): 0.80, ("big", "mnli", "pawsx", 1): 0.79,
        ("small", "hellaswag", "pawsx", 1): 0.95,  # no small baseline on pawsx yet: not a gain
    }
    results = {run(m, i, t, s).run_id: result(run(m, i, t, s).run_id, v) for (m, i, t, s), v in scores.items()}
    by_arm = {(g.model, g.intermediate, g.target): (round(g.points, 6), g.seeds) for g in gains(PLAN, results)}
    assert by_arm == {("small", "mnli", "xnli"): (4.0, 2), ("small", "hellaswag", "xnli"): (1.0, 1),
                      ("big", "mnli", "pawsx"): (-1.0, 1)}
    best = best_gain(PLAN, results)
    assert str(best) == "+4.0 xnli/mnli@small"
    assert decide([], list(results.values())).status["bestGain"] == "+4.0 xnli/mnli@small"
    assert best_gain(PLAN, {}) is None
    assert "bestGain" not in decide().status


def test_gains_agree_with_the_report() -> None:
    from xstilts.operator.report.build import AVG, build_report, grid_of
    from xstilts.trainer.tasks import TASKS

    def run_result(planned: PlannedRun, accuracy: float) -> RunResult:
        languages = TASKS[planned.labels.target or ""].languages
        return RunResult(
            run_id=planned.run_id, config=planned.config, metrics={},
            languages={lang: {"accuracy": accuracy + i / 1000} for i, lang in enumerate(languages)},
            parameter_count=10**8, tokens_seen=1, train_steps=1, wall_seconds=1.0, tokens_per_second=1.0,
            finished_at="2025-06-01T10:00:00Z")

    accuracies = {("baseline", 1): 0.70, ("baseline", 2): 0.72, ("mnli", 1): 0.74, ("mnli", 2): 0.73,
                  ("hellaswag", 2): 0.69}
    records = [run_result(run("small", arm, "xnli", seed), acc) for (arm, seed), acc in accuracies.items()]
    found = gains(PLAN, {r.run_id: ResultSummary.from_result(r) for r in records})
    report = build_report(records, grid_of(SPEC))
    assert {(g.intermediate, g.seeds) for g in found} == {("mnli", 2), ("hellaswag", 1)}
    for gain in found:
        cell = report.cell(gain.model, gain.intermediate, gain.target, AVG)
        assert cell is not None and gain.points == pytest.approx(cell.gain.mean)


def test_mlflow_experiment_link() -> None:
    assert decide().status["mlflowExperiment"] == "grid"
    spec = SPEC.model_copy(update={"mlflow": SPEC.mlflow.model_copy(update={"tracking_uri": "http://mlflow:5000"})})
    assert decide(spec=spec).status["mlflowTrackingUri"] == "http://mlflow:5000"


def test_reconcile_is_deterministic() -> None:
    jobs = [job(PLAN.runs[0].run_id, "running"), job(PLAN.runs[1].run_id, "failed")]
    assert decide(jobs) == decide(list(reversed(jobs)))


# --- reading Jobs and results back -----------------------------------------------------------


def rendered_job(status: dict[str, Any], suspend: bool = False) -> dict[str, Any]:
    target = run("big", "mnli")
    job_dict = render_run(target, SPEC)[-1]
    if suspend:
        job_dict["spec"]["suspend"] = True
    job_dict["status"] = status
    return job_dict


def condition(kind: str, reason: str = "", message: str = "", at: str = "2025-06-01T10:00:00Z") -> dict[str, Any]:
    return {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": at}


@pytest.mark.parametrize(("status", "suspend", "phase", "reason"), [
    ({}, False, "pending", None),
    ({}, True, "pending", None),
    ({"active": 1, "startTime": "2025-06-01T09:00:00Z"}, False, "pending", None),
    ({"active": 1, "ready": 1, "startTime": "2025-06-01T09:00:00Z"}, False, "running", None),
    ({"active": 1, "failed": 2, "ready": 1}, False, "running", None),  # retrying within backoffLimit
    ({"succeeded": 1, "completionTime": "2025-06-01T11:00:00Z", "conditions": [
        condition("SuccessCriteriaMet"), condition("Complete")]}, False, "succeeded", None),
    ({"succeeded": 1, "conditions": [condition("SuccessCriteriaMet")]}, False, "succeeded", None),
    ({"failed": 4, "conditions": [condition("FailureTarget", "BackoffLimitExceeded", "Job has reached the limit")]},
     False, "failed", "BackoffLimitExceeded: Job has reached the limit"),
    ({"failed": 4, "conditions": [condition("FailureTarget", "BackoffLimitExceeded", "Job has reached the limit"),
                                  condition("Failed", "BackoffLimitExceeded", "Job has reached the limit")]},
     False, "failed", "BackoffLimitExceeded: Job has reached the limit"),
    ({"failed": 1, "conditions": [condition("Failed", "PodFailurePolicy", "Container trainer exited with 42")]},
     False, "failed", "PodFailurePolicy: Container trainer exited with 42"),
    ({"conditions": [{"type": "Failed", "status": "False"}], "active": 1, "ready": 1}, False, "running", None),
])
def test_observed_job_phase_from_its_status(status: dict[str, Any], suspend: bool, phase: str,
                                            reason: str | None) -> None:
    observed = ObservedJob.from_k8s(rendered_job(status, suspend))
    assert observed.phase == phase
    assert observed.failure_reason == reason
    assert observed.run_id == run("big", "mnli").run_id
    assert observed.name == job_name("grid", observed.run_id)
    assert observed.gpus == 2


def test_observed_job_times() -> None:
    failed = condition("Failed", "DeadlineExceeded", at="2025-06-01T10:30:00Z")
    observed = ObservedJob.from_k8s(rendered_job({"startTime": "2025-06-01T09:00:00Z", "conditions": [failed]}))
    assert observed.start_time == datetime(2025, 6, 1, 9, tzinfo=UTC)
    assert observed.completion_time == datetime(2025, 6, 1, 10, 30, tzinfo=UTC)


def test_observed_job_needs_the_run_id_label() -> None:
    job_dict = rendered_job({})
    del job_dict["metadata"]["labels"][RUN_ID_LABEL]
    with pytest.raises(ValueError, match=r"no xstilts\.dev/run-id label"):
        ObservedJob.from_k8s(job_dict)


def test_multi_node_job_gpus_are_per_pod_times_parallelism() -> None:
    scaling_spec = SPEC.model_copy(update={"models": [SPEC.models[0].model_copy(update={
        "resources": SPEC.models[0].resources.model_copy(update={"gpus": 8, "nodes": 2})})]})
    target = plan(scaling_spec).runs[0]
    assert ObservedJob.from_k8s(render_run(target, scaling_spec)[-1]).gpus == 16


def test_result_summary_from_a_run_result() -> None:
    target = run("big", "mnli", "xnli")
    summary = ResultSummary.from_result(RunResult(
        run_id=target.run_id, config=target.config, metrics={"xnli.test.accuracy.avg": 0.8},
        languages={"en": {"accuracy": 0.9, "loss": 0.3}, "de": {"accuracy": 0.7}},
        parameter_count=10**9, tokens_seen=10**6, train_steps=100, wall_seconds=1800.0,
        tokens_per_second=555.0, finished_at="2025-06-01T10:00:00Z"))
    assert summary.scores == pytest.approx({"de": 0.7, "en": 0.9, "avg": 0.8, "zero-shot": 0.7})
    assert summary.gpu_seconds == 1800.0 * 2
    intermediate = run("big", "mnli")
    summary = ResultSummary.from_result(RunResult(
        run_id=intermediate.run_id, config=intermediate.config, metrics={"dev.accuracy": 0.8},
        parameter_count=10**9, tokens_seen=10**6, train_steps=100, wall_seconds=10.0,
        tokens_per_second=1.0, finished_at="2025-06-01T10:00:00Z"))
    assert summary.scores == {}


# --- the property: any observation sequence converges ----------------------------------------


@dataclass
class SimulatedCluster:
    """Jobs and result files as a cluster would show them; reconcile's decisions are applied
    to it exactly as the controller applies them."""

    spec: ExperimentSpec
    jobs: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (run id, phase)
    results: set[str] = field(default_factory=set)
    status: dict[str, Any] | None = None
    creations: Counter[str] = field(default_factory=Counter)
    orphans_made: int = 0

    def observed(self) -> Observed:
        return Observed(
            jobs=[ObservedJob(name, rid, phase, failure_reason="BackoffLimitExceeded" if phase == "failed" else None)
                  for name, (rid, phase) in sorted(self.jobs.items())],
            results={rid: ResultSummary(rid, {"avg": 0.5}) for rid in self.results},
            previous_status=self.status,
        )

    def step(self) -> Any:
        decision = reconcile(self.spec, PLAN, self.observed(), NOW)
        self.check(decision)
        for delete in decision.deletes:
            del self.jobs[delete.name]
        for create in decision.creates:
            assert create.job_name not in self.jobs
            self.jobs[create.job_name] = (create.run_id, "pending")
            self.creations[create.run_id] += 1
        self.status = decision.status
        return decision

    def check(self, decision: Any) -> None:
        live_runs = {rid for rid, _ in self.jobs.values()}
        active = sum(1 for _, phase in self.jobs.values() if phase in ACTIVE)
        creates = decision.creates
        # maxParallel: observed active Jobs plus this decision's creations.
        assert len(creates) <= max(0, self.spec.cluster.max_parallel - active)
        for create in creates:
            planned = PLAN.by_id[create.run_id]
            assert create.run_id not in live_runs, "created a run whose Job exists"
            assert create.run_id not in self.results, "created a run that has a result"
            assert set(planned.depends_on) <= self.results, "created a run before its dependency's result"
            job_object = create.objects[-1]
            assert job_object["kind"] == "Job" and job_object["metadata"]["name"] == create.job_name
            assert job_object["metadata"]["labels"][RUN_ID_LABEL] == create.run_id
        orphans = {name for name, (rid, _) in self.jobs.items() if rid not in PLAN.by_id}
        assert orphans <= {d.name for d in decision.deletes}
        counts = decision.status["counts"]
        assert counts["total"] == len(PLAN.runs)
        assert sum(v for k, v in counts.items() if k != "total") == counts["total"]

    # --- events ---

    def names_in(self, *phases: str) -> list[str]:
        return sorted(name for name, (_, phase) in self.jobs.items() if phase in phases)

    def apply(self, event: str, pick: int, also: bool) -> None:
        def choose(names: list[str]) -> str | None:
            return names[pick % len(names)] if names else None

        if event == "start" and (name := choose(self.names_in("pending"))):
            self.jobs[name] = (self.jobs[name][0], "running")
        elif event == "succeed" and (name := choose(self.names_in("running"))):
            self.jobs[name] = (self.jobs[name][0], "succeeded")
        elif event == "result" and (name := choose(self.names_in("succeeded"))):
            rid = self.jobs[name][0]
            if rid in PLAN.by_id:
                self.results.add(rid)
            if also:  # ttlSecondsAfterFinished deletes the finished Job
                del self.jobs[name]
        elif event == "fail" and (name := choose(self.names_in("pending", "running"))):
            self.jobs[name] = (self.jobs[name][0], "failed")
        elif event == "delete" and (name := choose(sorted(self.jobs))):
            del self.jobs[name]  # by hand, or by the TTL
        elif event == "orphan":
            self.orphans_made += 1
            rid = f"{self.orphans_made:012x}"
            self.jobs[f"grid-{rid}"] = (rid, "running" if also else "succeeded")

    def finish(self) -> None:
        """Let everything run to success: no more failures, deletions or strays."""
        for name, (rid, phase) in list(self.jobs.items()):
            if phase == "pending":
                self.jobs[name] = (rid, "running")
            elif phase == "running":
                self.jobs[name] = (rid, "succeeded")
            elif phase == "succeeded":
                self.results.add(rid)


EVENTS = st.tuples(st.sampled_from(["start", "succeed", "result", "fail", "delete", "orphan", "nothing"]),
                   st.integers(0, 1000), st.booleans())


@settings(max_examples=150, deadline=None)
@given(max_parallel=st.integers(1, 6), events=st.lists(st.lists(EVENTS, max_size=4), max_size=40))
def test_any_observation_sequence_converges_without_duplicates(max_parallel: int,
                                                               events: list[list[tuple[str, int, bool]]]) -> None:
    cluster = SimulatedCluster(with_max_parallel(max_parallel))
    failed_ever: set[str] = set()
    for batch in events:
        cluster.step()
        for event, pick, also in batch:
            cluster.apply(event, pick, also)
            failed_ever |= {rid for rid, phase in cluster.jobs.values() if phase == "failed"}

    for _ in range(4 * len(PLAN.runs)):
        decision = cluster.step()
        states = decision.status["runs"]
        if not decision.actions and set(states.values()) <= {"succeeded", "failed", "blocked"}:
            break
        cluster.finish()
    else:
        pytest.fail(f"did not converge: {Counter(cluster.status['runs'].values()) if cluster.status else None}")

    failed = {rid for rid, s in states.items() if s == "failed"}
    blocked = {rid for rid, s in states.items() if s == "blocked"}
    assert failed <= failed_ever
    assert blocked == {r.run_id for r in PLAN.runs if set(r.depends_on) & failed}
    assert not any(cluster.creations[rid] for rid in blocked), "a blocked run was created"
    assert {rid for rid, s in states.items() if s == "succeeded"} <= cluster.results
    assert decision.status["phase"] == ("Succeeded" if not failed else
                                        "PartiallyFailed" if len(failed) + len(blocked) < len(PLAN.runs) else "Failed")
    # Converged means stable: reconciling again changes nothing.
    again = cluster.step()
    assert again.actions == [] and again.status["runs"] == states


def test_undisturbed_run_creates_each_run_exactly_once() -> None:
    cluster = SimulatedCluster(with_max_parallel(3))
    for _ in range(200):
        decision = cluster.step()
        if not decision.actions and decision.status["phase"] == "Succeeded":
            break
        cluster.finish()
    assert decision.status["phase"] == "Succeeded"
    assert cluster.creations == Counter({r.run_id: 1 for r in PLAN.runs})
    # Dependencies first: every phase-3 run was created after its phase-2 run had a result
    # (checked at each step by SimulatedCluster.check).
    assert {r.config.stage for r in PLAN.runs} == {Stage.INTERMEDIATE, Stage.TARGET}


def test_runs_whose_objects_are_refused_fail_and_are_not_created_again_until_the_spec_changes() -> None:
    first = decide(spec=with_max_parallel(100))
    small = run("small", "mnli")  # a phase-2 run: its target runs depend on it
    answer = "create Job x: Job.batch \"x\" is invalid: " + "spec: too much " * 200
    status = with_refused(PLAN, first.status, {small.run_id: answer}, NOW)
    assert status["runs"][small.run_id] == "failed"
    assert status["failures"][small.run_id].startswith("refused by the API server: create Job x")
    assert len(status["failures"][small.run_id]) <= 256
    dependants = [r.run_id for r in PLAN.runs if small.run_id in r.depends_on]
    assert dependants and all(status["runs"][rid] == "blocked" for rid in dependants)
    assert status["phase"] == "Degraded"  # the other runs go on
    assert len(status["message"]) <= 1024 and "refused the objects of 1 runs" in status["message"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Degraded"]["reason"] == "ObjectsRefused" and len(conditions["Degraded"]["message"]) <= 1024
    # The next reconcile keeps it failed and creates nothing for it...
    again = decide(spec=with_max_parallel(100), previous=status)
    assert small.run_id not in created(again) and again.status["runs"][small.run_id] == "failed"
    assert again.status["phase"] == "Degraded"
    # ...until the spec changes: then the refusal is forgotten and the run is created again.
    fresh = decide(spec=with_max_parallel(100), previous=without_refusals(status))
    assert small.run_id in created(fresh)


def test_every_run_refused_is_failed() -> None:
    first = decide(spec=with_max_parallel(100))
    status = with_refused(PLAN, first.status, {rid: "no" for rid in created(first)}, NOW)
    assert status["phase"] == "Failed"
    assert status["counts"]["pending"] == status["counts"]["running"] == 0


def test_a_status_past_the_threshold_lists_only_failed_runs_and_stays_small() -> None:
    """20,000 runs (MAX_RUNS), every one failed with a long reason: the stored status holds the
    failed runs, the first reasons and counts per state, well under etcd's 1.5 MiB."""
    states = {f"{i:012x}": "failed" for i in range(MAX_RUNS)}
    status = {"phase": "Failed", "runs": states, "failures": dict.fromkeys(states, "x" * 256)}
    stored = summarised(status)
    assert stored["runsSummarised"] is True and stored["runs"] == states
    assert len(stored["failures"]) == FAILURES_KEPT and stored["runStates"] == {"failed": MAX_RUNS}
    assert len(json.dumps(stored)) < 700_000
    # Mixed states: only the failed ones are listed, the rest counted.
    mixed = {f"{i:012x}": ("failed" if i % 10 == 0 else "succeeded") for i in range(RUNS_IN_STATUS + 1)}
    stored = summarised({"runs": mixed})
    assert set(stored["runs"].values()) == {"failed"} and len(stored["runs"]) == 501
    assert stored["runStates"] == {"failed": 501, "succeeded": RUNS_IN_STATUS - 500}
    # Below the threshold the status is whole.
    small = decide(spec=with_max_parallel(100)).status
    assert summarised(small)["runs"] == small["runs"] and "runsSummarised" not in summarised(small)


def test_a_failed_run_stays_failed_when_the_status_was_summarised() -> None:
    first = decide(spec=with_max_parallel(100))
    rid = created(first)[0]
    failed = decide(jobs=[job(r, "failed" if r == rid else "running") for r in created(first)],
                    spec=with_max_parallel(100))
    stored = {**failed.status, "runs": {rid: "failed"}, "runsSummarised": True}  # what summarised() keeps
    later = decide(previous=stored, spec=with_max_parallel(100))  # the Jobs are gone (TTL)
    assert later.status["runs"][rid] == "failed" and rid not in created(later)
