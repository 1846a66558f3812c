"""The Experiment controller: a thin, level-triggered loop around `reconcile`.

    watch Experiments ─┐
    watch their Jobs ──┼─> work queue of experiment keys ─> reconcile_key(key):
    resync timer ──────┘      parse the spec (invalid → status Failed + Event, nothing else)
                              plan it (cached per generation)
                              observe: its Jobs (watch cache) + result.json files
                              reconcile(...) → actions + status          (pure)
                              apply: delete orphans, create ConfigMap/[Service]/Job
                              patch the status subresource if it changed
                              emit Events for what changed

Every decision comes from what is observed now, so a lost event, a crash or a restart
only delays convergence: nothing is remembered between reconciles except caches of what
the API said. A Job this process created is put into the watch cache at once, so the next
reconcile counts it against maxParallel even before its watch event arrives.

Failure handling: every request has a timeout and is retried at once a few times when it
fails transiently (unreachable, timed out, 429, 5xx; kube_api.Kube). 409 AlreadyExists on create
→ an earlier attempt got there (perhaps one whose answer was lost), read it back; 404 on
delete → already gone; 410 Gone on a watch → list again (kube_api.Reflector); 409 Conflict on the
status → read the Experiment again, recompute the status from it, write it with update. A
request the API server refuses as it is (400, 403, 413, 422: `KubeError.refused`): a run's
objects → that run is failed ("refused by the API server: ..."), the others go on (phase
Degraded), and it is created again only once the spec's generation changes; the status itself,
or a planning error of any kind → phase Failed with a short message, the detail in an Event and
the log, and that generation is not reconciled again. Any other error (unreachable, 5xx) → the
key is retried with exponential backoff.

Only one controller acts at a time (lease.LeaderElector): once it stops leading it creates
and deletes nothing more, not even in the reconcile in progress. SIGTERM stops it the same
way, releases the Lease and exits 0.
"""

from __future__ import annotations

import heapq
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from xstilts.operator.cluster.reconcile import (
    BLOCKED,
    FAILED,
    FINISHING,
    PHASE_DEGRADED,
    PHASE_FAILED,
    PHASE_PARTIALLY_FAILED,
    PHASE_SUCCEEDED,
    REFUSED,
    CreateRun,
    Decision,
    DeleteJob,
    Observed,
    ObservedJob,
    ResultSummary,
    capped,
    reconcile,
    summarised,
    with_refused,
    without_refusals,
)
from xstilts.operator.cluster.render import (
    EXPERIMENT_LABEL,
    IN_CLUSTER_TRACKING_URI,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    RUN_ID_LABEL,
    OwnerRef,
    experiment_selector,
    for_cluster,
    pod_storage_root,
)
from xstilts.operator.cluster.results import ResultStore
from xstilts.operator.cluster.runtime.kube_api import (
    CONFIG_MAPS,
    EVENTS,
    EXPERIMENTS,
    JOBS,
    REQUEST_TIMEOUT,
    SERVICES,
    STRATEGIC_MERGE_PATCH,
    Kube,
    KubeError,
    Reflector,
    backoff_delay,
    connect,
    key_of,
    resource_of,
)
from xstilts.operator.cluster.runtime.lease import LeaderElector
from xstilts.operator.cluster.runtime.prometheus import Health, Metrics, serve_http
from xstilts.operator.experiment.plan import Plan, plan
from xstilts.operator.experiment.spec import API_GROUP, KIND, ExperimentSpec, SpecError, parse_document

log = logging.getLogger("xstilts.controller")

COMPONENT = "xstilts-controller"
# While a Job has succeeded but its result.json is not visible yet, look again this often
# (files are not watched; shared filesystems may show a new file late).
RESULT_POLL_SECONDS = 2.0
# A repeated Event (same object, reason and message) within this window updates the
# count of the first instead of creating another.
EVENT_AGGREGATION = timedelta(minutes=10)
EVENT_MESSAGE_LIMIT = 1024
# What the log keeps of one failure's detail (the Event and the status hold less).
LOG_DETAIL_LIMIT = 64 * 1024

Key = tuple[str, str]  # (namespace, name) of an Experiment

# Every API call the controller makes, as (API group, resource, verb): the Role in
# k8s/base/controller-rbac.yaml must grant exactly these (tests compare them, and the
# tests against the control plane check that a running controller calls nothing else).
API_CALLS: frozenset[tuple[str, str, str]] = frozenset({
    # The watch cache of Experiments; `get` when a Job names an Experiment the cache lacks.
    (API_GROUP, "experiments", "list"),
    (API_GROUP, "experiments", "watch"),
    (API_GROUP, "experiments", "get"),
    # Status: merge patch normally; after a conflict, read it again and update it.
    (API_GROUP, "experiments/status", "patch"),
    (API_GROUP, "experiments/status", "get"),
    (API_GROUP, "experiments/status", "update"),
    # Runs: Jobs created and watched; orphans deleted; `get` to read back after AlreadyExists.
    ("batch", "jobs", "list"),
    ("batch", "jobs", "watch"),
    ("batch", "jobs", "get"),
    ("batch", "jobs", "create"),
    ("batch", "jobs", "delete"),
    # Each run's ConfigMap and (multi-node) headless Service; listed once per spec
    # generation to delete those of runs no longer planned.
    ("", "configmaps", "list"),
    ("", "configmaps", "get"),
    ("", "configmaps", "create"),
    ("", "configmaps", "delete"),
    ("", "services", "list"),
    ("", "services", "get"),
    ("", "services", "create"),
    ("", "services", "delete"),
    # Events on Experiments; a repeated one is patched (its count), not duplicated.
    ("", "events", "create"),
    ("", "events", "patch"),
    # Leader election.
    ("coordination.k8s.io", "leases", "get"),
    ("coordination.k8s.io", "leases", "create"),
    ("coordination.k8s.io", "leases", "update"),
})
# Permissions the API server checks on the controller's behalf without a call of that verb:
# creating an object whose ownerReference sets blockOwnerDeletion needs `update` on the
# owner's finalizers where the OwnerReferencesPermissionEnforcement admission plugin is on.
IMPLIED_PERMISSIONS: frozenset[tuple[str, str, str]] = frozenset({
    (API_GROUP, "experiments/finalizers", "update"),
})


# --- pure helpers ------------------------------------------------------------------------


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: changed keys, nested
    objects recursively, removed keys as null. Lists are replaced whole."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            inner = merge_patch(before, value)
            if inner:
                patch[key] = inner
        elif key not in old or before != value:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


def describe_run(plan_: Plan, run_id: str) -> str:
    run = plan_.by_id.get(run_id)
    if run is None:
        return run_id
    labels = run.labels
    what = f"{labels.model} {labels.intermediate}" + (f" → {labels.target}" if labels.target else "")
    return f"{run_id} ({run.config.stage.value}: {what}, seed {run.config.seed})"


@dataclass(frozen=True)
class EventSpec:
    type: str  # Normal or Warning
    reason: str
    message: str


def status_events(previous: Mapping[str, Any], current: Mapping[str, Any], plan_: Plan) -> list[EventSpec]:
    """Events for what changed between two statuses: runs that failed, runs newly blocked
    by a failed dependency (one Event per failed dependency), and the experiment finishing."""
    before: Mapping[str, str] = previous.get("runs") or {}
    after: Mapping[str, str] = current.get("runs") or {}
    failures: Mapping[str, str] = current.get("failures") or {}
    events = []
    for rid, state in after.items():
        # A refused run has its own Event (ObjectRefused), with the API server's whole answer.
        if state == FAILED and before.get(rid) != FAILED and not failures.get(rid, "").startswith(REFUSED):
            events.append(EventSpec("Warning", "RunFailed",
                                    f"run {describe_run(plan_, rid)} failed: {failures.get(rid, 'Failed')}"))
    newly_blocked: dict[str, list[str]] = {}
    for rid, state in after.items():
        if state == BLOCKED and before.get(rid) != BLOCKED:
            run = plan_.by_id.get(rid)
            culprits = [d for d in (run.depends_on if run else ()) if after.get(d) in (FAILED, BLOCKED)]
            newly_blocked.setdefault(culprits[0] if culprits else "?", []).append(rid)
    for culprit, blocked in newly_blocked.items():
        events.append(EventSpec("Warning", "RunsBlocked",
                                f"{len(blocked)} runs will not be created because run"
                                f" {describe_run(plan_, culprit)} failed: {', '.join(blocked)}"))
    phase, was = current.get("phase"), previous.get("phase")
    if phase != was:
        counts = current.get("counts") or {}
        if phase == PHASE_SUCCEEDED:
            events.append(EventSpec("Normal", "Succeeded", f"all {counts.get('total', 0)} runs succeeded"))
        elif phase in (PHASE_FAILED, PHASE_PARTIALLY_FAILED, PHASE_DEGRADED):
            events.append(EventSpec("Warning", phase, str(current.get("message") or phase)))
    return events


def invalid_status(problems: list[str], generation: int | None, previous: Mapping[str, Any],
                   now: datetime) -> dict[str, Any]:
    """The status of an Experiment whose spec cannot be used: phase Failed, the problems
    in the message (cut to MESSAGE_LIMIT), Ready=False with reason InvalidSpec."""
    return failed_status("InvalidSpec", "invalid spec: " + "; ".join(problems), generation, previous, now)


def failed_status(reason: str, message: str, generation: int | None, previous: Mapping[str, Any],
                  now: datetime) -> dict[str, Any]:
    """Phase Failed with `message` (cut to MESSAGE_LIMIT) in the status and its conditions;
    the other status fields (runs, counts) are dropped."""
    message = capped(message)
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    before = {c.get("type"): c for c in previous.get("conditions") or []}
    conditions = []
    for kind, value in (("Ready", "False"), ("Progressing", "False"), ("Degraded", "True")):
        old = before.get(kind) or {}
        since = old.get("lastTransitionTime") if old.get("status") == value and old.get("lastTransitionTime") else stamp
        conditions.append({"type": kind, "status": value, "reason": reason, "message": message,
                           "lastTransitionTime": since})
    status: dict[str, Any] = {"phase": PHASE_FAILED, "message": message, "conditions": conditions}
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def owner_key(job: Mapping[str, Any]) -> Key | None:
    """The Experiment a Job belongs to: its controller ownerReference, else its label."""
    meta = job.get("metadata") or {}
    namespace = str(meta.get("namespace") or "")
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(f"{API_GROUP}/"):
            return namespace, str(ref.get("name"))
    label = (meta.get("labels") or {}).get(EXPERIMENT_LABEL)
    return (namespace, str(label)) if label else None


def owner_uid(obj: Mapping[str, Any]) -> str | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND:
            return str(ref.get("uid"))
    return None


# --- acting on a run ---------------------------------------------------------------------


def create_run(kube: Kube, action: CreateRun, owner: str | None) -> tuple[dict[str, Any] | None, bool]:
    """Create a run's objects in order (ConfigMap, [Service], Job). An object that already
    exists was made by an earlier attempt (or another controller): it is read back and
    kept, except a ConfigMap whose RUN.json is no longer what the spec says, which is
    replaced. Returns the Job as the API has it and whether this call created it; (None, False)
    if an object of that name belongs to another owner (`owner` is the Experiment's uid,
    None when there is no Experiment)."""
    job: dict[str, Any] | None = None
    created = False
    for manifest in action.objects:
        resource = resource_of(manifest)
        namespace, name = key_of(manifest)
        try:
            current = kube.create(manifest)
            created = resource is JOBS
        except KubeError as e:
            if not e.already_exists:
                raise
            current = kube.get(resource, namespace, name)
            if owner_uid(current) != owner:
                return None, False
            if resource is CONFIG_MAPS and current.get("data") != manifest.get("data"):
                # A run created again after a spec edit outside its run id (resources, storage,
                # MLflow) must read the new RUN.json, not the one an earlier attempt left.
                kube.delete(CONFIG_MAPS, namespace, name)
                current = kube.create(manifest)
        if resource is JOBS:
            job = current
    return job, created


def delete_run(kube: Kube, namespace: str, name: str) -> bool:
    """Delete a run's Job (its pods with it) and its ConfigMap and Service; False if the Job
    was already gone. Missing objects are fine."""
    deleted: bool = kube.delete(JOBS, namespace, name)
    for resource in (CONFIG_MAPS, SERVICES):
        kube.delete(resource, namespace, name)
    return deleted


# --- the work queue ----------------------------------------------------------------------


class WorkQueue:
    """Keys waiting to be reconciled. A key waits at most once however often it is added;
    a key added while being processed is processed again after `done`. `add(key, delay)`
    schedules it for later (retries with backoff, polling for results)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ready: OrderedDict[Key, None] = OrderedDict()
        self._processing: set[Key] = set()
        self._dirty: set[Key] = set()
        self._delayed: list[tuple[float, Key]] = []

    def add(self, key: Key, delay: float = 0.0) -> None:
        with self._cond:
            if delay > 0:
                heapq.heappush(self._delayed, (time.monotonic() + delay, key))
            elif key in self._processing:
                self._dirty.add(key)
            else:
                self._ready[key] = None
            self._cond.notify()

    def get(self, timeout: float) -> Key | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    _, key = heapq.heappop(self._delayed)
                    if key in self._processing:
                        self._dirty.add(key)
                    else:
                        self._ready[key] = None
                if self._ready:
                    key, _ = self._ready.popitem(last=False)
                    self._processing.add(key)
                    return key
                wait = deadline - now
                if self._delayed:
                    wait = min(wait, self._delayed[0][0] - now)
                if wait <= 0:
                    return None
                self._cond.wait(wait)

    def done(self, key: Key) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self._ready[key] = None
                self._cond.notify()

    def __len__(self) -> int:
        with self._cond:
            return len(self._ready) + len(self._delayed)


# --- events ------------------------------------------------------------------------------


class EventRecorder:
    """core/v1 Events about Experiments. Best effort: a failed Event is logged, never
    fails a reconcile. Repeats within EVENT_AGGREGATION increment the count of the first."""

    def __init__(self, kube: Kube, instance: str, metrics: Metrics, cache_size: int = 4096):
        self.kube = kube
        self.instance = instance
        self.metrics = metrics
        self._recent: OrderedDict[tuple[str, str, str, str], tuple[str, int, datetime]] = OrderedDict()
        self._cache_size = cache_size

    def emit(self, obj: Mapping[str, Any], event: EventSpec) -> None:
        meta = obj.get("metadata") or {}
        namespace, name, uid = str(meta.get("namespace") or ""), str(meta.get("name")), str(meta.get("uid"))
        message = capped(event.message, EVENT_MESSAGE_LIMIT)
        key = (uid, event.type, event.reason, message)
        now = datetime.now(UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        level = logging.WARNING if event.type == "Warning" else logging.INFO
        log.log(level, "experiment %s/%s: %s: %s", namespace, name, event.reason, message)
        self.metrics.inc("xstilts_events_total", {"type": event.type, "reason": event.reason})
        try:
            seen = self._recent.get(key)
            if seen is not None and now - seen[2] < EVENT_AGGREGATION:
                event_name, count, first = seen
                try:
                    self.kube.patch(EVENTS, namespace, event_name, {"count": count + 1, "lastTimestamp": stamp},
                                    content_type=STRATEGIC_MERGE_PATCH)
                    self._remember(key, (event_name, count + 1, first))
                    return
                except KubeError as e:
                    if not e.not_found:
                        raise
            event_name = f"{name}.{uuid.uuid4().hex[:16]}"
            self.kube.create({
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"name": event_name, "namespace": namespace},
                "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": name,
                                   "namespace": namespace, "uid": uid,
                                   "resourceVersion": meta.get("resourceVersion")},
                "type": event.type, "reason": event.reason, "message": message,
                "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
                "source": {"component": COMPONENT},
                "reportingComponent": f"{API_GROUP}/controller", "reportingInstance": self.instance[:128],
            })
            self._remember(key, (event_name, 1, now))
        except KubeError as e:
            self.metrics.inc("xstilts_errors_total", {"where": "event"})
            log.warning("could not record event %s on %s/%s: %s", event.reason, namespace, name, e)

    def _remember(self, key: tuple[str, str, str, str], value: tuple[str, int, datetime]) -> None:
        self._recent[key] = value
        self._recent.move_to_end(key)
        while len(self._recent) > self._cache_size:
            self._recent.popitem(last=False)


# --- the controller ----------------------------------------------------------------------


@dataclass
class ControllerOptions:
    namespace: str | None  # None: every namespace
    results_dir: Path | None = None
    resync_seconds: float = 30.0
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}")
    # Where runs of a spec that names no MLflow server log (render.for_cluster).
    tracking_uri: str = IN_CLUSTER_TRACKING_URI


class NotLeading(Exception):
    """Raised in a reconcile once the controller is stopping or lost its Lease: another
    replica may be acting by now, so this one must not create or delete anything."""


@dataclass
class _Planned:
    generation: int | None
    spec: ExperimentSpec
    plan: Plan


def declare_metrics(metrics: Metrics) -> None:
    for name, kind, text in (
        ("xstilts_reconcile_total", "counter", "Experiment reconciles, by result (ok, invalid, error)."),
        ("xstilts_reconcile_duration_seconds", "histogram", "Time to reconcile one Experiment."),
        ("xstilts_jobs_created_total", "counter", "Jobs created for runs."),
        ("xstilts_jobs_deleted_total", "counter", "Jobs deleted (runs no longer planned, duplicates)."),
        ("xstilts_status_updates_total", "counter", "Writes of an Experiment's status subresource."),
        ("xstilts_status_conflicts_total", "counter", "Status writes that met a newer version and were redone."),
        ("xstilts_events_total", "counter", "Kubernetes Events recorded, by type and reason."),
        ("xstilts_errors_total", "counter", "Errors, by where they happened."),
        ("xstilts_api_requests_total", "counter", "Kubernetes API requests, by API group, resource and verb."),
        ("xstilts_watch_relists_total", "counter", "Full lists of a watched resource (start, 410 Gone)."),
        ("xstilts_leader", "gauge", "1 while this controller holds the Lease and acts."),
        ("xstilts_workqueue_depth", "gauge", "Experiments waiting to be reconciled."),
        ("xstilts_experiments", "gauge", "Experiments watched."),
        ("xstilts_jobs", "gauge", "Jobs of Experiments in the watch cache."),
        ("xstilts_experiment_runs", "gauge", "Runs of each Experiment, by state count (from its status)."),
    ):
        metrics.declare(name, kind, text)


class Controller:
    def __init__(self, kube: Kube, options: ControllerOptions, metrics: Metrics, health: Health):
        self.kube = kube
        self.options = options
        self.metrics = metrics
        self.health = health
        self.queue = WorkQueue()
        self.results = ResultStore(options.results_dir)
        self.recorder = EventRecorder(kube, options.identity, metrics)
        self.experiments = Reflector(kube, EXPERIMENTS, options.namespace, self._on_experiment)
        self.jobs = Reflector(kube, JOBS, options.namespace, self._on_job,
                              selector=f"{MANAGED_BY_LABEL}={MANAGED_BY}")
        self._lock = threading.Lock()
        self._jobs_by_owner: dict[str, set[Key]] = {}
        self._plans: dict[str, _Planned] = {}
        self._written: dict[Key, str] = {}  # resourceVersion of this process's last status write
        self._deleted: set[Key] = set()
        self._attempts: dict[Key, int] = {}
        # Experiments (uid → generation) whose status says Failed for a reason only a new spec
        # can change: not reconciled again until their generation changes.
        self._given_up: dict[str, int | None] = {}
        self._swept: set[tuple[str, int | None]] = set()
        self._reported: set[str] = set()  # unreadable result files already reported
        self._watch_stop = threading.Event()
        self._stop = threading.Event()  # set from run(): stopping, or the Lease lost
        self._failed = threading.Event()
        metrics.on_collect(self._collect)

    # -- watch callbacks (reflector threads) ------------------------------------------------

    def _on_experiment(self, kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        key = key_of(obj)
        if kind == "DELETED":
            with self._lock:
                self._deleted.add(key)
                self._written.pop(key, None)
                uid = (obj.get("metadata") or {}).get("uid")
                self._plans.pop(str(uid), None)
            log.info("experiment %s/%s deleted; its Jobs go with it (garbage collection)", *key)
            return
        with self._lock:
            self._deleted.discard(key)
            ours = self._written.get(key) == (obj.get("metadata") or {}).get("resourceVersion")
        if not ours:  # our own status write needs no reconcile
            self.queue.add(key)

    def _on_job(self, kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        self._index_job(obj, deleted=kind == "DELETED")
        owner = owner_key(obj)
        if owner is not None:
            self.queue.add(owner)

    def _index_job(self, job: Mapping[str, Any], deleted: bool = False) -> None:
        uid = owner_uid(job) or f"label:{owner_key(job)}"
        with self._lock:
            keys = self._jobs_by_owner.setdefault(uid, set())
            if deleted:
                keys.discard(key_of(job))
            else:
                keys.add(key_of(job))

    def _owned_jobs(self, experiment: Mapping[str, Any]) -> list[dict[str, Any]]:
        uid = str((experiment.get("metadata") or {}).get("uid"))
        with self._lock:
            keys = list(self._jobs_by_owner.get(uid, ()))
        return [job for job in (self.jobs.get(k) for k in keys) if job is not None]

    def _collect(self, metrics: Metrics) -> None:
        for (group, resource, verb), count in list(self.kube.calls.items()):
            metrics.set("xstilts_api_requests_total", count, {"group": group or "core", "resource": resource,
                                                                "verb": verb})
        for reflector in (self.experiments, self.jobs):
            metrics.set("xstilts_watch_relists_total", reflector.relists, {"resource": reflector.resource.plural})
        metrics.set("xstilts_workqueue_depth", len(self.queue))
        experiments = self.experiments.items()
        metrics.clear("xstilts_experiment_runs")  # experiments deleted since: no stale series
        metrics.set("xstilts_experiments", len(experiments))
        metrics.set("xstilts_jobs", len(self.jobs.items()))
        for obj in experiments:
            meta = obj.get("metadata") or {}
            for state, count in ((obj.get("status") or {}).get("counts") or {}).items():
                metrics.set("xstilts_experiment_runs", count, {"namespace": str(meta.get("namespace")),
                                                                "experiment": str(meta.get("name")), "state": state})

    # -- the loop ---------------------------------------------------------------------------

    def start_watches(self) -> None:
        for reflector in (self.experiments, self.jobs):
            threading.Thread(target=self._watch, args=(reflector,), daemon=True,
                             name=f"watch-{reflector.resource.plural}").start()

    def _watch(self, reflector: Reflector) -> None:
        """A watch that dies leaves its cache stale: report it on /healthz (so that the
        kubelet restarts the controller) and stop, rather than act on old observations."""
        try:
            reflector.run(self._watch_stop)
        except Exception as e:
            log.exception("the %s watch failed", reflector.resource.plural)
            self.health.problem = f"the {reflector.resource.plural} watch failed: {type(e).__name__}: {e}"
            self._failed.set()

    def wait_synced(self, stop: threading.Event) -> bool:
        while not stop.is_set():
            if self.experiments.synced.is_set() and self.jobs.synced.is_set():
                return True
            stop.wait(0.1)
        return False

    @property
    def failed(self) -> bool:
        return self._failed.is_set()

    def run(self, stop: threading.Event) -> None:
        """Watch and reconcile until `stop` is set (or a watch fails); the reconcile in
        progress finishes, without acting any more (NotLeading)."""
        self._stop = stop
        self.start_watches()
        try:
            if not self.wait_synced(stop):
                return
            self.health.ready.set()
            log.info("watching %s Experiments: %d found, %d Jobs", self.scope, len(self.experiments.items()),
                     len(self.jobs.items()))
            next_resync = time.monotonic()
            while not stop.is_set() and not self._failed.is_set():
                if time.monotonic() >= next_resync:
                    for obj in self.experiments.items():
                        self.queue.add(key_of(obj))
                    next_resync = time.monotonic() + self.options.resync_seconds
                key = self.queue.get(timeout=min(1.0, max(0.0, next_resync - time.monotonic())))
                if key is None:
                    continue
                try:
                    self.process(key)
                finally:
                    self.queue.done(key)
        finally:
            self._watch_stop.set()

    @property
    def scope(self) -> str:
        return f"namespace {self.options.namespace}" if self.options.namespace else "all namespaces'"

    def process(self, key: Key) -> None:
        """Reconcile one key, with metrics; on failure retry it later with backoff."""
        started = time.perf_counter()
        try:
            result = self.reconcile_key(key)
        except NotLeading:
            log.info("experiment %s/%s: stopping; what is left is for the next leader", *key)
            return
        except KubeError as e:
            if e.refused:  # sending it again unchanged cannot help: say so on the status
                result = "failed"
                self._give_up(key, "Refused", f"the API server refused a request: {e}")
            else:
                result = "error"
                self._retry(key, f"{e}")
        except Exception as e:  # a bug must not stop the other experiments' reconciles
            result = "error"
            log.exception("experiment %s/%s: reconcile failed", *key)
            self._retry(key, f"{type(e).__name__}: {e}")
        else:
            self._attempts.pop(key, None)
        self.metrics.inc("xstilts_reconcile_total", {"result": result})
        self.metrics.observe("xstilts_reconcile_duration_seconds", time.perf_counter() - started)

    def _retry(self, key: Key, why: str) -> None:
        attempt = self._attempts[key] = self._attempts.get(key, 0) + 1
        delay = backoff_delay(attempt)
        self.metrics.inc("xstilts_errors_total", {"where": "reconcile"})
        log.warning("experiment %s/%s: %s; retrying in %.1fs (attempt %d)", *key, why, delay, attempt)
        self.queue.add(key, delay=delay)

    # -- one reconcile ----------------------------------------------------------------------

    def reconcile_key(self, key: Key) -> str:
        obj = self.experiments.get(key)
        if obj is None:
            with self._lock:
                if key in self._deleted:
                    return "ok"
            # A Job names an Experiment the watch has not shown (yet): ask the API.
            try:
                obj = self.kube.get(EXPERIMENTS, key[0], key[1])
            except KubeError as e:
                if e.not_found:
                    return "ok"
                raise
        meta = obj.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return "ok"
        generation = meta.get("generation")
        with self._lock:
            if str(meta.get("uid")) in self._given_up and self._given_up[str(meta.get("uid"))] == generation:
                return "failed"  # the status says why; only a new generation of the spec can change it
        now = datetime.now(UTC)
        try:
            planned = self._plan_for(obj)
        except SpecError as e:
            self._report_invalid(key, obj, e.problems, now)
            self._remember_given_up(obj)
            return "invalid"
        except Exception as e:  # a spec that passed validation and still cannot be planned is a bug
            log.exception("experiment %s/%s: planning failed", *key)
            self._give_up(key, "PlanFailed", f"the spec passed validation but cannot be planned:"
                                             f" {type(e).__name__}: {e}", obj)
            return "failed"
        spec, plan_ = planned.spec, planned.plan
        owner = OwnerRef.of(obj)
        results = self._results(obj, spec, plan_)

        def decide(status: Mapping[str, Any] | None) -> Decision:
            jobs = []
            for job in self._owned_jobs(obj):
                try:
                    jobs.append(ObservedJob.from_k8s(job))
                except ValueError as e:
                    log.warning("experiment %s/%s: ignoring Job: %s", *key, e)
            if status is not None and status.get("observedGeneration") != generation:
                status = without_refusals(status)  # a new spec: try the refused runs again
            return reconcile(spec, plan_, Observed(jobs, results, status), now, owner=owner)

        previous = obj.get("status") or {}
        decision = decide(previous)
        plan_ = decision.plan or plan_  # with the seeds replication added
        refused = self._apply(obj, plan_, decision)
        self._sweep_orphans(obj, plan_, generation)

        def final(status: dict[str, Any]) -> dict[str, Any]:
            if refused:
                status = with_refused(plan_, status, refused, now)
            status = summarised(status)
            return {**status, "observedGeneration": generation} if generation is not None else status

        status = final(decision.status)
        written = self._write_status(key, obj, status, lambda fresh: final(decide(fresh.get("status") or {}).status))
        for event in status_events(previous, written or status, plan_):
            self.recorder.emit(obj, event)
        if (status.get("runStates") or {}).get(FINISHING):
            self.queue.add(key, delay=RESULT_POLL_SECONDS)
        return "ok"

    def _report_invalid(self, key: Key, obj: Mapping[str, Any], problems: list[str], now: datetime) -> None:
        """Status Failed with every problem, and one Warning Event per distinct message;
        no Job is created or deleted."""
        generation = (obj.get("metadata") or {}).get("generation")
        status = invalid_status(problems, generation, obj.get("status") or {}, now)
        self._write_status(key, obj, status,
                           lambda fresh: invalid_status(problems, generation, fresh.get("status") or {}, now))
        if (obj.get("status") or {}).get("message") != status["message"]:
            detail = "invalid spec: " + "; ".join(problems)
            log.warning("experiment %s/%s: %s", *key, detail[:LOG_DETAIL_LIMIT])
            self.recorder.emit(obj, EventSpec("Warning", "InvalidSpec", detail))

    def _give_up(self, key: Key, reason: str, detail: str, obj: Mapping[str, Any] | None = None) -> None:
        """Phase Failed with `detail` cut short in the status, whole (up to the limits) in an
        Event and the log; this generation of the spec is not reconciled again."""
        obj = obj or self.experiments.get(key)
        log.error("experiment %s/%s: %s: %s", *key, reason, detail[:LOG_DETAIL_LIMIT])
        if obj is None:
            return
        self._remember_given_up(obj)
        generation = (obj.get("metadata") or {}).get("generation")
        now = datetime.now(UTC)
        status = failed_status(reason, detail, generation, obj.get("status") or {}, now)
        try:
            self._write_status(key, obj, status,
                               lambda fresh: failed_status(reason, detail, generation, fresh.get("status") or {}, now))
        except KubeError as e:
            self.metrics.inc("xstilts_errors_total", {"where": "status"})
            log.error("experiment %s/%s: cannot write the Failed status either: %s", *key, e)
        if (obj.get("status") or {}).get("message") != status["message"]:
            self.recorder.emit(obj, EventSpec("Warning", reason, detail))

    def _remember_given_up(self, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        with self._lock:
            self._given_up[str(meta.get("uid"))] = meta.get("generation")

    def _plan_for(self, obj: Mapping[str, Any]) -> _Planned:
        meta = obj.get("metadata") or {}
        uid, generation = str(meta.get("uid")), meta.get("generation")
        with self._lock:
            cached = self._plans.get(uid)
        if cached is not None and cached.generation == generation and generation is not None:
            return cached
        source = f"experiment {meta.get('namespace')}/{meta.get('name')}"
        spec = parse_document(dict(obj), source)
        try:
            spec = for_cluster(spec, self.options.tracking_uri)
            planned = _Planned(generation, spec, plan(spec, storage_root=pod_storage_root(spec)))
        except ValueError as e:
            raise SpecError(source, [str(e)]) from None
        with self._lock:
            self._plans[uid] = planned
        return planned

    def _results(self, obj: Mapping[str, Any], spec: ExperimentSpec, plan_: Plan) -> dict[str, ResultSummary]:
        results: dict[str, ResultSummary]
        results, problems = self.results.read(spec, plan_)
        for problem in problems:
            if problem not in self._reported:
                self._reported.add(problem)
                self.metrics.inc("xstilts_errors_total", {"where": "result-file"})
                self.recorder.emit(obj, EventSpec("Warning", "ResultUnreadable", problem))
        return results

    def _apply(self, obj: Mapping[str, Any], plan_: Plan, decision: Decision) -> dict[str, str]:
        """Carry out the decision's actions; returns the runs whose objects the API server
        refused (run id → its answer)."""
        namespace, name = key_of(obj)
        refused = {}
        for action in decision.actions:  # deletes first, then creates: reconcile's order
            if self._stop.is_set():
                raise NotLeading
            if isinstance(action, DeleteJob):
                self._delete_run(obj, action)
            else:
                why = self._create_run(obj, plan_, action)
                if why is not None:
                    refused[action.run_id] = why
        if decision.actions:
            log.info("experiment %s/%s: %d Jobs created, %d deleted; %s", namespace, name, len(decision.creates),
                     len(decision.deletes), decision.status.get("message", ""))
        return refused

    def _create_run(self, obj: Mapping[str, Any], plan_: Plan, action: CreateRun) -> str | None:
        """Create a run's objects; the API server's answer if it refused one, else None."""
        uid = str((obj.get("metadata") or {}).get("uid"))
        try:
            job, created = create_run(self.kube, action, uid)
        except KubeError as e:
            if not e.refused:
                raise
            self.metrics.inc("xstilts_errors_total", {"where": "create"})
            self.recorder.emit(obj, EventSpec("Warning", "ObjectRefused",
                                              f"run {describe_run(plan_, action.run_id)} will not be created"
                                              f" until the spec changes: {e}"))
            log.warning("experiment %s/%s: run %s refused: %s", *key_of(obj), action.run_id,
                        str(e)[:LOG_DETAIL_LIMIT])
            return str(e)
        if job is None:
            # Left by a deleted Experiment of the same name, being garbage-collected: its
            # DELETED event brings this run back.
            log.info("experiment %s/%s: Job %s still belongs to a deleted Experiment; waiting for it to go",
                     *key_of(obj), action.job_name)
            return None
        self._track_job(job)
        if created:
            self.metrics.inc("xstilts_jobs_created_total")
            self.recorder.emit(obj, EventSpec("Normal", "JobCreated",
                                              f"created Job {action.job_name} for run"
                                              f" {describe_run(plan_, action.run_id)}"))
        return None

    def _track_job(self, job: dict[str, Any]) -> None:
        job.setdefault("apiVersion", JOBS.api_version)
        job.setdefault("kind", JOBS.kind)
        self.jobs.put(job)
        self._index_job(job)

    def _delete_run(self, obj: Mapping[str, Any], action: DeleteJob) -> None:
        namespace = str((obj.get("metadata") or {}).get("namespace"))
        deleted = delete_run(self.kube, namespace, action.name)
        self.jobs.forget((namespace, action.name))
        if deleted:
            self.metrics.inc("xstilts_jobs_deleted_total")
            self.recorder.emit(obj, EventSpec("Normal", "JobDeleted", f"deleted Job {action.name}: {action.reason}"))

    def _sweep_orphans(self, obj: Mapping[str, Any], plan_: Plan, generation: int | None) -> None:
        """Once per spec generation: delete ConfigMaps and Services of runs no longer planned
        whose Jobs are already gone (reconcile deletes those with a Job)."""
        meta = obj.get("metadata") or {}
        marker = (str(meta.get("uid")), generation)
        if marker in self._swept:
            return
        namespace, name = str(meta.get("namespace")), str(meta.get("name"))
        for resource in (CONFIG_MAPS, SERVICES):
            items = self.kube.list(resource, namespace, selector=experiment_selector(name),
                                   metadata_only=True).get("items") or []
            for item in items:
                item_meta = item.get("metadata") or {}
                run_id = (item_meta.get("labels") or {}).get(RUN_ID_LABEL)
                if run_id and run_id not in plan_.by_id and owner_uid(item) in (None, str(meta.get("uid"))):
                    self.kube.delete(resource, namespace, str(item_meta.get("name")))
                    log.info("experiment %s/%s: deleted %s %s of run %s, no longer planned", namespace, name,
                             resource.kind, item_meta.get("name"), run_id)
        self._swept.add(marker)

    def _write_status(self, key: Key, obj: Mapping[str, Any], status: dict[str, Any],
                      recompute: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any] | None:
        """Patch the status subresource if it changed (with the resourceVersion the status
        was computed from). On a conflict, read the Experiment again, recompute the status
        from it and update. Returns the status written, or None if nothing changed."""
        previous = obj.get("status") or {}
        if previous == status:
            return None
        namespace, name = key
        version = (obj.get("metadata") or {}).get("resourceVersion")
        patch = {"metadata": {"resourceVersion": version}, "status": merge_patch(previous, status)}
        try:
            updated = self.kube.patch(EXPERIMENTS, namespace, name, patch, subresource="status")
        except KubeError as e:
            if not e.conflict:
                raise
            self.metrics.inc("xstilts_status_conflicts_total")
            fresh = self.kube.get(EXPERIMENTS, namespace, name, subresource="status")
            if (fresh.get("metadata") or {}).get("generation") != (obj.get("metadata") or {}).get("generation"):
                self.queue.add(key)  # the spec changed meanwhile: reconcile it afresh
                return None
            status = recompute(fresh)
            if (fresh.get("status") or {}) == status:
                return None
            fresh["status"] = status
            updated = self.kube.replace(fresh, subresource="status")
        self.metrics.inc("xstilts_status_updates_total")
        with self._lock:
            self._written[key] = str((updated.get("metadata") or {}).get("resourceVersion"))
        updated.setdefault("apiVersion", EXPERIMENTS.api_version)
        updated.setdefault("kind", EXPERIMENTS.kind)
        self.experiments.put(updated, if_newer=True)
        return status


# --- running it --------------------------------------------------------------------------


@dataclass
class RunOptions:
    """Everything `xstilts controller` takes."""

    namespace: str | None = None
    all_namespaces: bool = False
    kubeconfig: str | None = None
    context: str | None = None
    results_dir: Path | None = None
    resync_seconds: float = 30.0
    health_port: int | None = 8080
    metrics_port: int | None = None  # None: /metrics on the health port
    leader_elect: bool = True
    lease_namespace: str | None = None
    identity: str | None = None
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    request_timeout: float = REQUEST_TIMEOUT
    tracking_uri: str = IN_CLUSTER_TRACKING_URI


class ControllerError(Exception):
    """The controller cannot start: one line saying why and what to do."""


def run_controller(options: RunOptions, stop: threading.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or `stop`): 0 after a clean stop, 1 if leadership was lost
    or a watch failed.
    Raises ControllerError when it cannot start (no credentials, no API, no CRD, port busy)."""
    from xstilts.operator.cluster.runtime.kube_api import ConfigError

    try:
        connection = connect(options.kubeconfig, options.context)
    except ConfigError as e:
        raise ControllerError(str(e)) from None
    kube = Kube(connection, timeout=options.request_timeout)
    namespace = None if options.all_namespaces else (options.namespace or connection.namespace)
    try:
        if not kube.api_available(API_GROUP, EXPERIMENTS.version):
            raise ControllerError(f"the API server at {connection.server} does not serve {EXPERIMENTS.api_version}"
                                  " Experiments: install the CRD first (kubectl apply -f k8s/base/crd.yaml)")
    except KubeError as e:
        raise ControllerError(str(e)) from None

    identity = options.identity or default_identity()
    metrics, health = Metrics(), Health()
    declare_metrics(metrics)
    servers = []
    try:
        if options.health_port is not None:
            paths = ("/healthz", "/readyz") if options.metrics_port not in (None, options.health_port) else (
                "/healthz", "/readyz", "/metrics")
            servers.append(serve_http(options.health_port, health, metrics, paths=paths))
        if options.metrics_port is not None and options.metrics_port != options.health_port:
            servers.append(serve_http(options.metrics_port, health, metrics, paths=("/metrics",)))
    except OSError as e:
        for server in servers:
            server.shutdown()
        raise ControllerError(f"cannot serve health/metrics: {e.strerror or e}; choose another --health-port"
                              " / --metrics-port") from None

    stop = stop or threading.Event()
    lost: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        log.info("received %s: finishing the current reconcile, then stopping", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    elector = None
    try:
        if options.leader_elect:
            lease_namespace = options.lease_namespace or namespace or connection.namespace
            elector = LeaderElector(kube, lease_namespace, identity, lease_duration=options.lease_duration,
                                    renew_deadline=options.renew_deadline, retry_period=options.retry_period)
            health.ready.set()  # a standby is ready: it reached the API and waits for the Lease
            if not elector.acquire(stop):
                return 0

            def on_lost(reason: str) -> None:
                log.error("lost leadership: %s; stopping", reason)
                lost.append(reason)
                stop.set()

            elector.keep_renewing(stop, on_lost)
        metrics.set("xstilts_leader", 1)
        controller = Controller(kube, ControllerOptions(namespace, options.results_dir, options.resync_seconds,
                                                        identity, options.tracking_uri), metrics, health)
        log.info("xstilts controller %s starting on %s (%s), %s, results from %s", identity, connection.server,
                 connection.source, controller.scope, options.results_dir or "the runs' own paths")
        controller.run(stop)
        if controller.failed:
            lost.append(str(health.problem))
    finally:
        metrics.set("xstilts_leader", 0)
        if elector is not None:
            elector.release()
        for server in servers:
            server.shutdown()
    log.info("stopped")
    return 1 if lost else 0


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S")
    logging.Formatter.converter = time.gmtime
    # urllib3 warns about each retried connection; the controller reports failures itself.
    logging.getLogger("urllib3").setLevel(logging.ERROR)


def default_identity() -> str:
    return os.environ.get("XSTILTS_POD_NAME") or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
