"""reconcile: (spec, plan, observed Jobs and results) → the actions to take and the
Experiment's new status (pure; the caller passes `now`).

The controller (and `xstilts submit --no-controller`) calls this on every event and resync:

    observed = Observed(jobs=[ObservedJob.from_k8s(j) for j in jobs_with_the_experiment_label],
                        results={r.run_id: ResultSummary.from_result(r) for r in results_found},
                        previous_status=experiment.get("status"))
    decision = reconcile(spec, plan(spec, ...), observed, now, owner=OwnerRef.of(experiment))
    for action in decision.actions:   # deletes first, then creates in start order
        DeleteJob → delete the Job and its ConfigMap/Service of the same name
        CreateRun → create action.objects in order (ConfigMap, [Service], Job);
                    AlreadyExists on any of them means an earlier attempt got there: fine
    patch the status subresource with decision.status

Rules, all derived from what is observed now (level-triggered):

- a run whose result.json exists is done, whether or not its Job still exists (Jobs are
  deleted ttlSecondsAfterFinished after they finish);
- a run whose Job exists is never created again; a run with neither a Job nor a result is
  (re)created once its dependencies have results: this recreates Jobs deleted by hand;
- a failed run stays failed: its Job is not retried by reconcile (the Job's own
  backoffLimit and podFailurePolicy already did that), and once the Job's TTL deletes it,
  the failure is remembered through the previous status's `runs` and `failures` maps. To
  retry failed runs, delete their Jobs and drop them from the status, e.g.
  `kubectl patch experiment NAME --subresource=status --type=json
  -p '[{"op": "remove", "path": "/status/runs/RUN_ID"}]'`;
- a phase-3 run is created only when its phase-2 run has a result; if the phase-2 run
  failed (or is blocked), the dependant is `blocked` and never created;
- ready runs take the free slots most-unblocking first (`start_order`), then in plan order;
- at most spec.cluster.maxParallel Jobs are active (pending or running), counting the Jobs
  observed active (orphans included: they hold GPUs until they are gone) plus this
  decision's creations;
- Jobs labelled with this experiment whose run id is not in the plan are deleted.

Only the runs created in this decision are rendered, so a reconcile of 10,000 runs costs
a pass over the plan, not 10,000 renders.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from statistics import fmean
from typing import Any, Literal

from xstilts.operator.cluster.render import (
    GPU_RESOURCE,
    RUN_ID_LABEL,
    OwnerRef,
    job_name,
    render_run,
)
from xstilts.operator.experiment.plan import Plan
from xstilts.operator.experiment.search import english_dev, select
from xstilts.operator.experiment.spec import BASELINE, ExperimentSpec
from xstilts.operator.report.build import AVG, POINTS, ZERO_SHOT, Cell, arm_gains
from xstilts.operator.report.stats import Interval, gain_interval
from xstilts.trainer.config import RunResult, Stage

JobPhase = Literal["pending", "running", "succeeded", "failed"]
ACTIVE_PHASES: frozenset[str] = frozenset({"pending", "running"})

# Per-run states in status.runs.
WAITING = "waiting"  # a dependency has no result yet
QUEUED = "queued"  # ready, held back by maxParallel
CREATING = "creating"  # created by this decision
PENDING = "pending"  # Job exists, no pod running yet (unscheduled, or suspended by Kueue)
RUNNING = "running"
FINISHING = "finishing"  # Job succeeded, result.json not visible yet
SUCCEEDED = "succeeded"
FAILED = "failed"
BLOCKED = "blocked"  # a dependency failed: never created

# Each run state is counted under one of the status counts.
COUNTED_AS = {
    WAITING: "pending", QUEUED: "pending", CREATING: "pending", PENDING: "pending",
    RUNNING: "running", FINISHING: "running",
    SUCCEEDED: "succeeded", FAILED: "failed", BLOCKED: "blocked",
}
COUNT_KEYS = ("total", "pending", "running", "succeeded", "failed", "blocked")

# Experiment phases.
PHASE_PENDING = "Pending"
PHASE_RUNNING = "Running"
PHASE_SUCCEEDED = "Succeeded"
PHASE_FAILED = "Failed"
PHASE_PARTIALLY_FAILED = "PartiallyFailed"
# Some runs' objects were refused by the API server (they count as failed, and are not
# created again until the spec changes) while the other runs go on.
PHASE_DEGRADED = "Degraded"
PHASES = (PHASE_PENDING, PHASE_RUNNING, PHASE_DEGRADED, PHASE_SUCCEEDED, PHASE_FAILED, PHASE_PARTIALLY_FAILED)

# A failure reason that starts with this is a refusal by the API server, not a failed Job: the
# controller creates the run again only once the spec's generation changes.
REFUSED = "refused by the API server: "
# Bounds on what a status holds, so that it can always be written (etcd's limit on an object is
# about 1.5 MiB): the message and each condition's message, and each run's failure reason.
MESSAGE_LIMIT = 1024
FAILURE_LIMIT = 256
# Past this many runs a stored status lists only the failed runs (what later reconciles need:
# a failed run whose Job is gone stays failed), and the reasons of the first FAILURES_KEPT;
# `runStates` counts runs per state. The per-run detail is in the Jobs and the result files.
RUNS_IN_STATUS = 5000
FAILURES_KEPT = 500

# How many failed runs the Degraded condition names before "and N more".
FAILURES_NAMED = 5


# --- what is observed --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObservedJob:
    """One Job of the experiment as the API shows it, reduced to what reconcile needs."""

    name: str
    run_id: str
    phase: JobPhase
    failure_reason: str | None = None
    start_time: datetime | None = None
    completion_time: datetime | None = None  # success time, or when the Job was marked failed
    gpus: int = 0  # GPUs the Job's pods hold in total (per pod × parallelism)

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE_PHASES

    @classmethod
    def from_k8s(cls, job: Mapping[str, Any]) -> ObservedJob:
        """From a Job in its JSON form (as `kubectl get -o json` or the Python client's
        `ApiClient().sanitize_for_serialization(job)` give it).

        Phase: a True `Complete` or `SuccessCriteriaMet` condition → succeeded; a True
        `Failed` or `FailureTarget` condition → failed (reason and message kept); else
        running when a pod is ready, pending otherwise (no pod yet, unscheduled, or
        suspended). Raises ValueError for a Job without the run-id label: it was not made
        by `render_run`."""
        meta = job.get("metadata") or {}
        name = str(meta.get("name") or "")
        run_id = (meta.get("labels") or {}).get(RUN_ID_LABEL)
        if not run_id:
            raise ValueError(f"Job {name!r} has no {RUN_ID_LABEL} label; it was not created by xstilts")
        spec = job.get("spec") or {}
        status = job.get("status") or {}
        true_conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
        start_time = _timestamp(status.get("startTime"))
        completion_time = _timestamp(status.get("completionTime"))
        failure_reason = None
        phase: JobPhase
        if done := true_conditions.get("Complete") or true_conditions.get("SuccessCriteriaMet"):
            phase = "succeeded"
            completion_time = completion_time or _timestamp(done.get("lastTransitionTime"))
        elif failed := true_conditions.get("Failed") or true_conditions.get("FailureTarget"):
            phase = "failed"
            completion_time = completion_time or _timestamp(failed.get("lastTransitionTime"))
            reason, message = failed.get("reason"), failed.get("message")
            failure_reason = ": ".join(str(p) for p in (reason, message) if p) or "Failed"
        elif (status.get("ready") or 0) > 0:
            phase = "running"
        else:
            phase = "pending"
        return cls(name=name, run_id=str(run_id), phase=phase, failure_reason=failure_reason,
                   start_time=start_time, completion_time=completion_time, gpus=_job_gpus(spec))


def _timestamp(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _job_gpus(job_spec: Mapping[str, Any]) -> int:
    pod = ((job_spec.get("template") or {}).get("spec")) or {}
    per_pod = 0
    for container in pod.get("containers") or []:
        resources = container.get("resources") or {}
        limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
        per_pod += int(limits.get(GPU_RESOURCE, requests.get(GPU_RESOURCE, 0)))
    return per_pod * int(job_spec.get("parallelism") or 1)


@dataclass(frozen=True, slots=True)
class ResultSummary:
    """What reconcile needs of a run's result.json. `scores` holds the primary metric per
    evaluation language, its mean under AVG, and the mean over the languages other than English
    under ZERO_SHOT when there are any (target runs; empty for intermediate ones)."""

    run_id: str
    scores: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    gpu_seconds: float = 0.0
    dev: float | None = None  # the English dev score: what a learning-rate search selects by

    @classmethod
    def from_result(cls, result: RunResult) -> ResultSummary:
        primary = result.primary_metric
        scores = {lang: values[primary] for lang, values in sorted(result.languages.items()) if primary in values}
        if scores:
            zero_shot = [v for lang, v in scores.items() if lang != "en"]
            scores[AVG] = fmean(scores.values())
            if zero_shot:
                scores[ZERO_SHOT] = fmean(zero_shot)
        else:
            average = next((v for k, v in result.metrics.items() if k.endswith(f".test.{primary}.{AVG}")), None)
            if average is not None:
                scores[AVG] = average
        res = result.config.resources
        return cls(run_id=result.run_id, scores=scores, wall_seconds=result.wall_seconds,
                   gpu_seconds=result.wall_seconds * res.gpus_per_node * res.nodes, dev=english_dev(result))


@dataclass(frozen=True)
class Observed:
    """The experiment as seen now: its Jobs (selected by `render.experiment_selector`), the
    results found on storage (`render.result_file` says where), and the Experiment's current
    status as the API returned it (None for a new Experiment): reconcile reads its `runs`,
    `failures` and `conditions` to keep failures and transition times."""

    jobs: Iterable[ObservedJob] = ()
    results: Mapping[str, ResultSummary] = field(default_factory=dict)
    previous_status: Mapping[str, Any] | None = None


# --- what to do --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateRun:
    """Create `objects` in order (ConfigMap, [headless Service], Job)."""

    run_id: str
    job_name: str
    objects: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class DeleteJob:
    """Delete the Job `name` and the ConfigMap and Service of the same name."""

    name: str
    reason: str


Action = CreateRun | DeleteJob


@dataclass(frozen=True)
class Decision:
    actions: list[Action]
    status: dict[str, Any]
    # The plan decided on: the given one, plus the seeds replication added (`replicated`).
    # Callers look runs up here, and keep the objects of every run in it.
    plan: Plan | None = None

    @property
    def creates(self) -> list[CreateRun]:
        return [a for a in self.actions if isinstance(a, CreateRun)]

    @property
    def deletes(self) -> list[DeleteJob]:
        return [a for a in self.actions if isinstance(a, DeleteJob)]


# --- the gain so far ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Gain:
    """Gain of an intermediate arm over the baseline on one target, in points of the target's
    primary metric averaged over its languages, over `seeds` seeds (paired by seed when it
    can be; `stats.gain_interval` decides, as in the report)."""

    model: str
    intermediate: str
    target: str
    points: float
    seeds: int

    def __str__(self) -> str:
        return f"{self.points:+.1f} {self.target}/{self.intermediate}@{self.model}"


def gains(plan: Plan, results: Mapping[str, ResultSummary]) -> list[Gain]:
    """Every (model, intermediate, target) whose arm and baseline both have target results,
    in plan order: the report's arm_gains over each run's language average."""
    scores: dict[Cell, dict[int, float]] = defaultdict(dict)
    selected = _target_selections(plan, results)
    for run in plan.runs:
        labels = run.labels
        if run.config.stage is not Stage.TARGET or labels.target is None:
            continue
        if labels.learning_rates and selected.get(
                (labels.model, labels.intermediate, labels.target)) != run.config.hyperparameters.learning_rate:
            continue  # a target-stage search: only the selected rate's runs count, as in the report
        avg = _average(results.get(run.run_id))
        if avg is not None:
            scores[(labels.model, labels.intermediate, labels.target)][run.config.seed] = POINTS * avg
    return [Gain(model, arm, target, gain.mean, gain.n)
            for (model, arm, target), gain in arm_gains(scores, _cached_gain).items()]


def _target_selections(plan: Plan, results: Mapping[str, ResultSummary]) -> dict[Cell, float | None]:
    """Per (model, arm, target) under a target-stage search, the rate selected on English dev."""
    dev: dict[Cell, dict[float, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    cells: dict[Cell, tuple[tuple[float, ...], set[int]]] = {}
    for run in plan.runs:
        labels = run.labels
        if run.config.stage is not Stage.TARGET or labels.target is None or not labels.learning_rates:
            continue
        cell = (labels.model, labels.intermediate, labels.target)
        cells.setdefault(cell, (labels.learning_rates, set()))[1].add(run.config.seed)
        summary = results.get(run.run_id)
        if summary is not None and summary.dev is not None:
            dev[cell][run.config.hyperparameters.learning_rate][run.config.seed] = summary.dev
    return {cell: select(dev.get(cell, {}), rates, sorted(seeds)) for cell, (rates, seeds) in cells.items()}


def _cached_gain(treated: Mapping[int, float], baseline: Mapping[int, float]) -> Interval | None:
    return _seed_gain(tuple(sorted(treated.items())), tuple(sorted(baseline.items())))


@lru_cache(maxsize=1 << 16)
def _seed_gain(treated: tuple[tuple[int, float], ...], baseline: tuple[tuple[int, float], ...]) -> Interval | None:
    """gain_interval also computes a t interval (a few milliseconds each); the cache makes a
    resync whose results did not change cost nothing."""
    return gain_interval(dict(treated), dict(baseline))


def best_gain(plan: Plan, results: Mapping[str, ResultSummary]) -> Gain | None:
    """The largest mean gain so far (the first in plan order on a tie), or None."""
    best: Gain | None = None
    for gain in gains(plan, results):
        if best is None or gain.points > best.points:
            best = gain
    return best


def _average(summary: ResultSummary | None) -> float | None:
    return None if summary is None else summary.scores.get(AVG)


# --- precision-driven replication ----------------------------------------------------------

REACHED = "reached"  # the paired gain interval is within ±targetHalfWidth
AT_MAX_SEEDS = "stoppedAtMaxSeeds"  # maxSeeds ran, the interval is still wider
ADDING = "addingSeeds"  # a seed was added: its runs are under way
MEASURING = "measuring"  # the first minSeeds seeds' runs are under way


@dataclass(frozen=True, slots=True)
class CellPrecision:
    """Where one unit of replication stands under spec.replication: a cell (model ×
    intermediate arm × target), or with `unit: modelAverage` a model × arm over every target
    (`target` is then empty)."""

    model: str
    intermediate: str
    target: str
    seeds: int  # seeds the unit runs now (1..seeds)
    half_width: float | None  # of the paired gain interval over the seeds with results, in points
    state: str

    @property
    def key(self) -> str:
        return f"{self.model}/{self.intermediate}" + (f"/{self.target}" if self.target else "")

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.target,) if self.target else ()


def replication_cells(spec: ExperimentSpec, plan: Plan,
                      results: Mapping[str, ResultSummary]) -> list[CellPrecision]:
    """Each unit's seed count, derived from the results alone (level-triggered, like the rest
    of reconcile): start at minSeeds; once seeds 1..n all have baseline and arm results, stop
    if the paired gain interval (the report's gain_interval, on the zero-shot average, the
    report's headline) is within ±targetHalfWidth or n is maxSeeds, else go on with seed n+1.
    Results never go away, so a unit's count only grows. Empty without spec.replication."""
    rep = spec.replication
    if rep is None:
        return []
    target_runs = {(r.labels.model, r.labels.intermediate, r.labels.target or "", r.config.seed): r.run_id
                   for r in (*plan.runs, *plan.reserve) if r.config.stage is Stage.TARGET}
    per_target = rep.unit == "cell"
    return [_cell(rep.target_half_width, rep.min_seeds, rep.max_seeds, model.name, arm,
                  (target,) if per_target else tuple(spec.targets), target_runs, results)
            for model in spec.models for arm in spec.intermediates
            for target in (spec.targets if per_target else ("",))]


def _cell(half_width: float, min_seeds: int, max_seeds: int, model: str, arm: str, targets: tuple[str, ...],
          target_runs: Mapping[tuple[str, str, str, int], str],
          results: Mapping[str, ResultSummary]) -> CellPrecision:
    """The unit's state; its score per seed is the headline averaged over `targets`, as the
    report's per-model average is (one target: the cell's own headline)."""
    treated: dict[int, float] = {}
    baseline: dict[int, float] = {}
    name = targets[0] if len(targets) == 1 else ""
    n, width = min_seeds, None
    for seed in range(1, max_seeds + 1):
        a = _over([results.get(target_runs.get((model, arm, t, seed), "")) for t in targets])
        b = _over([results.get(target_runs.get((model, BASELINE, t, seed), "")) for t in targets])
        if a is None or b is None:
            break
        treated[seed], baseline[seed] = POINTS * a, POINTS * b
        if seed < min_seeds:
            continue
        interval = _cached_gain(treated, baseline)
        width = None if interval is None else interval.half_width
        if width is not None and width <= half_width:
            return CellPrecision(model, arm, name, seed, width, REACHED)
        if seed == max_seeds:
            return CellPrecision(model, arm, name, seed, width, AT_MAX_SEEDS)
        n = seed + 1
    if width is None and len(treated) >= 2:
        interval = _cached_gain(treated, baseline)
        width = None if interval is None else interval.half_width
    return CellPrecision(model, arm, name, n, width, MEASURING if n == min_seeds else ADDING)


def _over(summaries: list[ResultSummary | None]) -> float | None:
    """The headline score (zero-shot, else every language) averaged over the targets' runs;
    None until every one has one."""
    values = [headline_score(s) for s in summaries]
    return None if any(v is None for v in values) else fmean(v for v in values if v is not None)


def headline_score(summary: ResultSummary | None) -> float | None:
    """The score a gain is judged by: zero-shot, else the every-language average."""
    return None if summary is None else summary.scores.get(ZERO_SHOT, summary.scores.get(AVG))


def replicated(spec: ExperimentSpec, plan: Plan, results: Mapping[str, ResultSummary]) -> Plan:
    """The plan with the runs of every seed `replication_cells` calls for moved from its
    reserve into its runs: per added seed, the unit's baseline and arm target runs (of every
    target, for a model average) and the phase-2 run the arm's needs. Idempotent; the plan
    itself without spec.replication."""
    if spec.replication is None or not plan.reserve:
        return plan
    wanted: set[tuple[str, str, str, int]] = set()
    for cell in replication_cells(spec, plan, results):
        for seed in range(spec.replication.min_seeds + 1, cell.seeds + 1):
            for target in cell.targets or spec.targets:
                wanted.add((cell.model, cell.intermediate, target, seed))
                wanted.add((cell.model, BASELINE, target, seed))
    if not wanted:
        return plan
    moved: set[str] = set()
    for run in plan.reserve:
        labels = run.labels
        if (labels.model, labels.intermediate, labels.target, run.config.seed) in wanted:
            moved.add(run.run_id)
            moved.update(run.depends_on)
    if not moved:
        return plan
    added = [r for r in plan.reserve if r.run_id in moved]  # reserve order: dependencies first
    runs = (*plan.runs, *added)
    return Plan(plan.experiment, runs, {**plan.by_id, **{r.run_id: r for r in added}},
                tuple(r for r in plan.reserve if r.run_id not in moved))


def _replication_status(cells: list[CellPrecision]) -> dict[str, Any]:
    return {cell.key: {"seeds": cell.seeds, "state": cell.state,
                       **({"halfWidth": round(cell.half_width, 3)} if cell.half_width is not None else {})}
            for cell in cells}


# --- the phase-2 learning-rate search ------------------------------------------------------


def failed_runs(observed: Observed) -> set[str]:
    """Runs that failed and have no result: their Job failed, or the previous status says so
    (a failed Job may be gone; the local executor remembers failures that way too)."""
    results = observed.results
    previous: Mapping[str, str] = (observed.previous_status or {}).get("runs") or {}
    jobs = {job.run_id: job for job in observed.jobs}
    failed = {rid for rid, job in jobs.items() if job.phase == "failed"}
    failed |= {rid for rid, state in previous.items() if state == FAILED and rid not in jobs}
    return {rid for rid in failed if rid not in results}


def phase2_selections(spec: ExperimentSpec, plan: Plan, results: Mapping[str, ResultSummary],
                      failed: Collection[str] = ()) -> dict[tuple[str, str], float | None]:
    """Per (model, intermediate arm), the phase-2 learning rate selected on English dev
    (search.select), None while a candidate's run lacks its result, and when every
    candidate has a run in `failed` (run ids). Empty without hyperparameters.intermediate.search."""
    candidates = spec.hyperparameters.intermediate.learning_rates
    if not candidates:
        return {}
    dev: dict[tuple[str, str], dict[float, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    failed_rates: dict[tuple[str, str], set[float]] = defaultdict(set)
    for run in plan.runs:
        if run.config.stage is not Stage.INTERMEDIATE:
            continue
        key = (run.labels.model, run.labels.intermediate)
        summary = results.get(run.run_id)
        if summary is not None and summary.dev is not None:
            dev[key][run.config.hyperparameters.learning_rate][run.config.seed] = summary.dev
        elif run.run_id in failed:
            failed_rates[key].add(run.config.hyperparameters.learning_rate)
    return {(model.name, arm): select(dev.get((model.name, arm), {}), candidates, spec.all_seeds,
                                      failed_rates.get((model.name, arm), set()))
            for model in spec.models for arm in spec.intermediates}


def searched(spec: ExperimentSpec, plan: Plan, results: Mapping[str, ResultSummary],
             failed: Collection[str] = (), started: Collection[str] = ()) -> Plan:
    """The plan with the held target runs that start from each arm's selected phase-2 candidate
    moved into its runs (the others stay held: they never run). Candidates with a run in
    `failed` are passed over. Once a held run is `started` (it has a Job or a result), its
    candidate stays the selection, whatever a retried failed candidate scores later: runs never
    start from two candidates of one arm. Idempotent, like `replicated`; the plan itself
    without a phase-2 search."""
    if not plan.held:
        return plan
    chosen = {key: lr for key, lr in phase2_selections(spec, plan, results, failed).items() if lr is not None}
    for run in plan.held:
        if run.run_id in started and run.depends_on:
            parent = plan.by_id.get(run.depends_on[0])
            if parent is not None:
                chosen[(run.labels.model, run.labels.intermediate)] = parent.config.hyperparameters.learning_rate
    if not chosen:
        return plan
    winners = {r.run_id for r in plan.runs if r.config.stage is Stage.INTERMEDIATE
               and chosen.get((r.labels.model, r.labels.intermediate)) == r.config.hyperparameters.learning_rate}
    added = [r for r in plan.held if set(r.depends_on) <= winners]
    if not added:
        return plan
    moved = {r.run_id for r in added}
    return Plan(plan.experiment, (*plan.runs, *added), {**plan.by_id, **{r.run_id: r for r in added}},
                plan.reserve, tuple(r for r in plan.held if r.run_id not in moved))


def _search_status(spec: ExperimentSpec, plan: Plan, results: Mapping[str, ResultSummary],
                   failed: Collection[str]) -> dict[str, Any]:
    """Per model/arm: the selected rate (the one the arm's target runs start from, once they
    have), 'searching', or 'failed' when every candidate failed."""
    selected_from: dict[tuple[str, str], float] = {}  # the rate the arm's target runs (in the plan) start from
    failed_rates: dict[tuple[str, str], set[float]] = defaultdict(set)
    for run in plan.runs:
        key = (run.labels.model, run.labels.intermediate)
        if run.config.stage is Stage.TARGET and run.depends_on and key[1] != BASELINE:
            selected_from[key] = plan.by_id[run.depends_on[0]].config.hyperparameters.learning_rate
        elif run.config.stage is Stage.INTERMEDIATE and run.run_id in failed:
            failed_rates[key].add(run.config.hyperparameters.learning_rate)
    every = set(spec.hyperparameters.intermediate.learning_rates)
    status: dict[str, Any] = {}
    for (model, arm), lr in phase2_selections(spec, plan, results, failed).items():
        lr = selected_from.get((model, arm), lr)
        if lr is not None:
            status[f"{model}/{arm}"] = {"learningRate": lr}
        else:
            status[f"{model}/{arm}"] = {"state": "failed" if failed_rates[(model, arm)] == every else "searching"}
    return status


# --- reconcile ---------------------------------------------------------------------------


def reconcile(spec: ExperimentSpec, plan: Plan, observed: Observed, now: datetime,
              owner: OwnerRef | None = None, render: bool = True) -> Decision:
    """The actions that move the experiment towards the plan, and the status to write.
    Deterministic: DeleteJob actions sorted by name, then CreateRun in start order
    (`start_order`). `render=False` leaves CreateRun.objects empty: the local executor
    (operator/local) starts processes, not Kubernetes objects."""
    results = observed.results
    failed = failed_runs(observed)
    started = {job.run_id for job in observed.jobs} | set(results)
    plan = searched(spec, replicated(spec, plan, results), results, failed, started)
    seen = tuple(observed.jobs)
    jobs, deletes = _assign_jobs(spec, plan, seen)
    previous = observed.previous_status or {}
    previous_runs: Mapping[str, str] = previous.get("runs") or {}
    previous_failures: Mapping[str, str] = previous.get("failures") or {}

    states: dict[str, str] = {}
    failures: dict[str, str] = {}
    ready: list[str] = []
    for run in plan.runs:  # dependencies come before dependants
        rid = run.run_id
        job = jobs.get(rid)
        if rid in results:
            state = SUCCEEDED
        elif job is not None:
            state = {"pending": PENDING, "running": RUNNING, "succeeded": FINISHING, "failed": FAILED}[job.phase]
            if state == FAILED:
                failures[rid] = capped(job.failure_reason or "Failed", FAILURE_LIMIT)
        elif previous_runs.get(rid) == FAILED:
            state = FAILED
            failures[rid] = previous_failures.get(rid, "Failed")
        else:
            dependencies = [states[d] for d in run.depends_on]
            if any(d in (FAILED, BLOCKED) for d in dependencies):
                state = BLOCKED
            elif any(d != SUCCEEDED for d in dependencies):
                state = WAITING
            else:
                state = QUEUED  # CREATING below if the budget reaches it
                ready.append(rid)
        states[rid] = state

    active = sum(1 for job in seen if job.active)
    budget = max(0, spec.cluster.max_parallel - active)
    creates: list[CreateRun] = []
    for rid in start_order(plan, ready)[:budget]:
        states[rid] = CREATING
        objects = render_run(plan.by_id[rid], spec, owner) if render else []
        creates.append(CreateRun(rid, job_name(spec.name, rid), objects))

    status = _status(spec, plan, results, previous, now, states, failures, jobs)
    if spec.replication is not None:
        status["replication"] = _replication_status(replication_cells(spec, plan, results))
    if spec.hyperparameters.intermediate.search is not None:
        status["learningRateSearch"] = _search_status(spec, plan, results, failed)
    return Decision(actions=[*deletes, *creates], status=status, plan=plan)


def capped(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text` cut to at most `limit` characters, marked as cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def with_refused(plan: Plan, status: Mapping[str, Any], refused: Mapping[str, str], now: datetime) -> dict[str, Any]:
    """The status after the API server refused the objects of the runs in `refused` (run id →
    its message): those runs are failed (reason REFUSED + message), the runs that depend on
    them blocked, and the counts, phase, message and conditions follow."""
    states: dict[str, str] = dict(status.get("runs") or {})
    failures: dict[str, str] = dict(status.get("failures") or {})
    for rid, message in refused.items():
        states[rid] = FAILED
        failures[rid] = capped(REFUSED + message, FAILURE_LIMIT)
    for run in plan.runs:  # dependencies come before dependants
        if states.get(run.run_id) == WAITING and any(states.get(d) in (FAILED, BLOCKED) for d in run.depends_on):
            states[run.run_id] = BLOCKED
    counts = _counts(states)
    phase = _phase(counts, states, failures)
    return {**status, "phase": phase, "message": _message(counts, failures), "counts": counts, "runs": states,
            "failures": failures, "conditions": _conditions(counts, states, failures, phase, now, status)}


def summarised(status: Mapping[str, Any]) -> dict[str, Any]:
    """The status as stored: `runStates` (runs per state) always, and past RUNS_IN_STATUS runs
    only the failed runs in `runs` (with the first FAILURES_KEPT reasons), so that the status of
    the largest experiment allowed (MAX_RUNS) stays far below etcd's limit on an object."""
    states: Mapping[str, str] = status.get("runs") or {}
    per_state: dict[str, int] = defaultdict(int)
    for state in states.values():
        per_state[state] += 1
    out = {**status, "runStates": dict(sorted(per_state.items()))}
    if len(states) > RUNS_IN_STATUS:
        failed = {rid: state for rid, state in states.items() if state == FAILED}
        failures: Mapping[str, str] = status.get("failures") or {}
        out["runs"] = failed
        out["runsSummarised"] = True
        out["failures"] = {rid: failures[rid] for rid in list(failed)[:FAILURES_KEPT] if rid in failures}
        if not out["failures"]:
            del out["failures"]
    return out


def without_refusals(status: Mapping[str, Any]) -> dict[str, Any]:
    """`status` without the runs the API server refused: after the spec changed, they are tried again."""
    failures: Mapping[str, str] = status.get("failures") or {}
    refused = {rid for rid, why in failures.items() if why.startswith(REFUSED)}
    if not refused:
        return dict(status)
    return {**status, "runs": {r: s for r, s in (status.get("runs") or {}).items() if r not in refused},
            "failures": {r: why for r, why in failures.items() if r not in refused}}


def start_order(plan: Plan, ready: Iterable[str]) -> list[str]:
    """The order in which ready runs take free slots: those that unblock the most other runs
    first (a phase-2 run, on which a target run per target waits, before a baseline run, on
    which nothing waits), then plan order. Starting the heads of the longest chains first keeps
    slots filled later on; in plan order a grid's first slots go to a model's baselines while
    its phase-2 runs, and everything behind them, wait. Ties keep plan order, so the decision
    stays deterministic."""
    dependants = _dependant_counts(plan)
    index = {rid: i for i, rid in enumerate(ready)}
    return sorted(index, key=lambda rid: (-dependants.get(rid, 0), index[rid]))


def _dependant_counts(plan: Plan) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for run in plan.runs:
        for dependency in run.depends_on:
            counts[dependency] += 1
    return counts


def _assign_jobs(spec: ExperimentSpec, plan: Plan,
                 observed: Iterable[ObservedJob]) -> tuple[dict[str, ObservedJob], list[DeleteJob]]:
    """Each planned run's Job; orphans (run not in the plan) and duplicates (a second Job
    for a run, which only another naming scheme could have made) are to be deleted."""
    jobs: dict[str, ObservedJob] = {}
    deletes: list[DeleteJob] = []
    # The canonically named Job wins over a duplicate; ties broken by name.
    ordered = sorted(observed, key=lambda j: (j.name != job_name(spec.name, j.run_id), j.name))
    for job in ordered:
        if job.run_id not in plan.by_id:
            deletes.append(DeleteJob(job.name, f"run {job.run_id} is no longer in the plan of experiment {spec.name}"))
        elif job.run_id in jobs:
            deletes.append(DeleteJob(job.name, f"duplicate Job for run {job.run_id}; keeping {jobs[job.run_id].name}"))
        else:
            jobs[job.run_id] = job
    deletes.sort(key=lambda d: d.name)
    return jobs, deletes


def _status(spec: ExperimentSpec, plan: Plan, results: Mapping[str, ResultSummary], previous: Mapping[str, Any],
            now: datetime, states: dict[str, str], failures: dict[str, str],
            jobs: Mapping[str, ObservedJob]) -> dict[str, Any]:
    counts = _counts(states)
    phase = _phase(counts, states, failures)
    status: dict[str, Any] = {
        "phase": phase,
        "message": _message(counts, failures),
        "conditions": _conditions(counts, states, failures, phase, now, previous),
        "counts": counts,
        "gpuHoursEstimated": round(plan.gpu_hours, 3),
        "gpuHoursUsed": round(_gpu_hours_used(plan, results, jobs, now), 3),
        "mlflowExperiment": spec.mlflow.experiment_name or spec.name,
        "runs": states,
    }
    if spec.mlflow.tracking_uri:
        status["mlflowTrackingUri"] = spec.mlflow.tracking_uri
    if failures:
        status["failures"] = failures
    gain = best_gain(plan, results)
    if gain is not None:
        status["bestGain"] = str(gain)
    return status


def _counts(states: Mapping[str, str]) -> dict[str, int]:
    counts = dict.fromkeys(COUNT_KEYS, 0)
    counts["total"] = len(states)
    for state in states.values():
        counts[COUNTED_AS[state]] += 1
    return counts


def _message(counts: Mapping[str, int], failures: Mapping[str, str]) -> str:
    message = (f"{counts['succeeded']}/{counts['total']} runs succeeded, {counts['running']} running,"
               f" {counts['pending']} pending, {counts['failed']} failed, {counts['blocked']} blocked")
    refused = [why for why in failures.values() if why.startswith(REFUSED)]
    if refused:
        message += f"; the API server refused the objects of {len(refused)} runs, e.g. {refused[0][len(REFUSED):]}"
    return capped(message)


def _phase(counts: dict[str, int], states: dict[str, str], failures: Mapping[str, str]) -> str:
    if counts["succeeded"] == counts["total"]:
        return PHASE_SUCCEEDED
    if counts["pending"] == 0 and counts["running"] == 0:  # only succeeded, failed, blocked left
        return PHASE_FAILED if counts["succeeded"] == 0 else PHASE_PARTIALLY_FAILED
    if any(why.startswith(REFUSED) for why in failures.values()):
        return PHASE_DEGRADED
    started = any(s not in (WAITING, QUEUED, CREATING, PENDING) for s in states.values())
    return PHASE_RUNNING if started else PHASE_PENDING


def _conditions(counts: dict[str, int], states: dict[str, str], failures: dict[str, str], phase: str,
                now: datetime, previous_status: Mapping[str, Any]) -> list[dict[str, Any]]:
    queued = sum(1 for s in states.values() if s == QUEUED)
    if counts["pending"] + counts["running"] == 0:
        progressing = ("False", "Finished", "no run is pending or running")
    elif counts["running"] or any(s in (CREATING, PENDING) for s in states.values()):
        progressing = ("True", "RunsActive", f"{counts['running']} running, {counts['pending']} pending"
                       + (f" ({queued} held back by maxParallel)" if queued else ""))
    elif queued:
        progressing = ("True", "WaitingForCapacity", f"{queued} runs held back by maxParallel")
    else:
        progressing = ("True", "WaitingForDependencies", f"{counts['pending']} runs wait for phase-2 results")
    if failures:
        named = [f"{rid} ({reason})" for rid, reason in list(failures.items())[:FAILURES_NAMED]]
        more = f" and {len(failures) - FAILURES_NAMED} more" if len(failures) > FAILURES_NAMED else ""
        blocked = f"; {counts['blocked']} dependant runs blocked" if counts["blocked"] else ""
        refused = any(why.startswith(REFUSED) for why in failures.values())
        degraded = ("True", "ObjectsRefused" if refused else "RunsFailed",
                    f"{len(failures)} runs failed: {', '.join(named)}{more}{blocked}")
    else:
        degraded = ("False", "NoFailures", "no run has failed")
    ready_reason = {PHASE_SUCCEEDED: "AllRunsSucceeded", PHASE_FAILED: "RunsFailed",
                    PHASE_PARTIALLY_FAILED: "RunsFailed", PHASE_DEGRADED: "ObjectsRefused"}.get(phase, "RunsInProgress")
    ready = ("True" if phase == PHASE_SUCCEEDED else "False", ready_reason,
             f"{counts['succeeded']}/{counts['total']} runs succeeded")
    previous = {c.get("type"): c for c in previous_status.get("conditions") or []}
    stamp = _rfc3339(now)
    conditions = []
    for kind, (value, reason, message) in (("Ready", ready), ("Progressing", progressing), ("Degraded", degraded)):
        before = previous.get(kind)
        # lastTransitionTime moves only when the condition's status does.
        since = before["lastTransitionTime"] if before and before.get("status") == value and before.get(
            "lastTransitionTime") else stamp
        conditions.append({"type": kind, "status": value, "reason": reason, "message": capped(message),
                           "lastTransitionTime": since})
    return conditions


def _gpu_hours_used(plan: Plan, results: Mapping[str, ResultSummary], jobs: Mapping[str, ObservedJob],
                    now: datetime) -> float:
    """Measured wall time × GPUs of finished runs (from their results), plus the lifetime of
    every Job without a result: running ones up to now, failed ones until they failed.
    An upper bound for Jobs: their lifetime includes time waiting for a node."""
    seconds = sum(r.gpu_seconds for rid, r in results.items() if rid in plan.by_id)
    for run_id, job in jobs.items():
        if run_id in results or job.start_time is None or not job.gpus:
            continue
        # A pending Job holds no GPU yet (its pods are not running, or Kueue holds it).
        end = job.completion_time or (now if job.phase == "running" else None)
        if end is not None:
            seconds += max(0.0, (_aware(end) - _aware(job.start_time)).total_seconds()) * job.gpus
    return seconds / 3600.0


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _rfc3339(moment: datetime) -> str:
    return _aware(moment).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
