"""The controller's pure parts and thin shells that need no cluster: the Role against the
API calls the code makes, status patches, Events from status changes, the work queue,
lease arithmetic, metrics and health over HTTP, the result-file reader, the status view
and the cluster commands' offline paths and one-line errors.

The loop itself runs against a real control plane in tests/cluster/kube/test_controller*.py.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner
from xstilts.operator.cli import app
from xstilts.operator.cluster.controller import (
    API_CALLS,
    IMPLIED_PERMISSIONS,
    EventSpec,
    WorkQueue,
    invalid_status,
    merge_patch,
    owner_key,
    status_events,
)
from xstilts.operator.cluster.reconcile import Observed, reconcile
from xstilts.operator.cluster.render import OwnerRef, pod_storage_root, render_run
from xstilts.operator.cluster.results import ResultStore
from xstilts.operator.cluster.runtime.kube_api import (
    EXPERIMENTS,
    JOBS,
    LEASES,
    PODS,
    ConfigError,
    KubeError,
    Reflector,
    _error_from_response,
    connect,
    newer,
)
from xstilts.operator.cluster.runtime.lease import LeaderElector, LeaseRecord, may_take, micro_time
from xstilts.operator.cluster.runtime.prometheus import Health, Metrics, parse_exposition, serve_http
from xstilts.operator.cluster.status import build_view, progress_bar, without_controller
from xstilts.operator.experiment.plan import plan
from xstilts.operator.experiment.spec import load_spec_text, parse_document, to_object
from xstilts.trainer.config import RunResult

REPO = Path(__file__).resolve().parents[2]
ROLE_FILE = REPO / "k8s" / "base" / "controller-rbac.yaml"
runner = CliRunner()

SPEC = """
name: tiny
models:
  - {name: small, pretrained: FacebookAI/xlm-roberta-base, parameters: 278000000,
     resources: {gpus: 1, cpu: "1", memory: 1Gi}}
intermediateTasks: [mnli]
targets: [xnli]
seeds: [1, 2]
cluster: {namespace: research, maxParallel: 3}
"""


def tiny() -> Any:
    spec = load_spec_text(SPEC)
    return spec, plan(spec, storage_root=pod_storage_root(spec))


# --- RBAC --------------------------------------------------------------------------------


def role_grants() -> set[tuple[str, str, str]]:
    documents = [d for d in yaml.safe_load_all(ROLE_FILE.read_text()) if d]
    (role,) = [d for d in documents if d["kind"] == "Role" and d["metadata"]["name"] == "xstilts-controller"]
    return {(group, resource, verb) for rule in role["rules"] for group in rule.get("apiGroups", [])
            for resource in rule.get("resources", []) for verb in rule.get("verbs", [])}


def test_role_grants_exactly_the_calls_the_controller_makes() -> None:
    granted = role_grants()
    needed = API_CALLS | IMPLIED_PERMISSIONS
    assert granted - needed == set(), "the Role grants verbs no controller code uses"
    assert needed - granted == set(), "the controller calls verbs its Role does not grant"


def test_role_reads_no_secrets_and_has_no_wildcards() -> None:
    granted = role_grants()
    assert not any(resource == "secrets" or "*" in (group, resource, verb) for group, resource, verb in granted)
    assert not any(resource == "secrets" for _, resource, _ in API_CALLS)


# --- status patches ----------------------------------------------------------------------


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies it."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def test_merge_patch_changes_removes_and_recurses() -> None:
    old = {"phase": "Running", "runs": {"a": "running", "b": "waiting"}, "bestGain": "+1.0", "conditions": [1, 2]}
    new = {"phase": "Running", "runs": {"a": "succeeded", "c": "creating"}, "conditions": [1]}
    assert merge_patch(old, new) == {"runs": {"a": "succeeded", "b": None, "c": "creating"}, "bestGain": None,
                                     "conditions": [1]}
    assert merge_patch(new, new) == {}


json_values = st.recursive(
    st.one_of(st.booleans(), st.integers(), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=10)
json_objects = st.dictionaries(st.text(max_size=3), json_values, max_size=5)


@given(json_objects, json_objects)
def test_merge_patch_applied_gives_the_new_status(old: dict[str, Any], new: dict[str, Any]) -> None:
    assert apply_merge_patch(old, merge_patch(old, new)) == new


def test_resource_versions_compare_as_numbers() -> None:
    def obj(version: str) -> dict[str, Any]:
        return {"metadata": {"resourceVersion": version}}

    assert newer(obj("100"), obj("99"))
    assert not newer(obj("99"), obj("100"))
    assert newer(obj("opaque"), obj("100"))


# --- Events from status changes ----------------------------------------------------------


def test_events_for_failed_blocked_and_finished() -> None:
    _, p = tiny()
    intermediate = next(r for r in p.runs if r.labels.target is None and r.config.seed == 1)
    dependant = next(r for r in p.runs if intermediate.run_id in r.depends_on)
    before = {"phase": "Running", "runs": {intermediate.run_id: "running", dependant.run_id: "waiting"}}
    after = {"phase": "PartiallyFailed", "message": "1/6 runs succeeded ...",
             "runs": {intermediate.run_id: "failed", dependant.run_id: "blocked"},
             "failures": {intermediate.run_id: "BackoffLimitExceeded: Job has reached the specified backoff limit"}}
    events = status_events(before, after, p)
    assert [(e.type, e.reason) for e in events] == [
        ("Warning", "RunFailed"), ("Warning", "RunsBlocked"), ("Warning", "PartiallyFailed")]
    assert events[0].message == (f"run {intermediate.run_id} (intermediate: small mnli, seed 1) failed:"
                                 " BackoffLimitExceeded: Job has reached the specified backoff limit")
    assert events[1].message.endswith(f"because run {intermediate.run_id} (intermediate: small mnli, seed 1)"
                                      f" failed: {dependant.run_id}")
    # Nothing new, nothing said: a restarted controller repeats no Event.
    assert status_events(after, after, p) == []
    done = {"phase": "Succeeded", "counts": {"total": 6}, "runs": {}}
    assert status_events({"phase": "Running"}, done, p) == [EventSpec("Normal", "Succeeded", "all 6 runs succeeded")]


def test_invalid_status_keeps_transition_times() -> None:
    first = invalid_status(["spec.seeds: duplicate seed 1"], 3, {}, datetime(2026, 1, 1, tzinfo=UTC))
    assert first["phase"] == "Failed" and first["observedGeneration"] == 3
    assert first["message"] == "invalid spec: spec.seeds: duplicate seed 1"
    later = invalid_status(["spec.seeds: duplicate seed 1"], 3, first, datetime(2026, 1, 2, tzinfo=UTC))
    assert later == first  # unchanged: no status write


def test_a_failed_status_is_short_whatever_the_problems() -> None:
    status = invalid_status([f"spec.data.t{i}: " + "x" * 10_000 for i in range(500)], 1, {},
                            datetime(2026, 1, 1, tzinfo=UTC))
    assert len(status["message"]) == 1024 and status["message"].endswith("...")
    assert all(len(c["message"]) <= 1024 for c in status["conditions"])
    assert len(json.dumps(status)) < 6000


def test_owner_of_a_job() -> None:
    owned = {"metadata": {"namespace": "ns", "ownerReferences": [
        {"apiVersion": "xstilts.dev/v1alpha1", "kind": "Experiment", "name": "exp", "uid": "u"}]}}
    assert owner_key(owned) == ("ns", "exp")
    labelled = {"metadata": {"namespace": "ns", "labels": {"xstilts.dev/experiment": "direct"}}}
    assert owner_key(labelled) == ("ns", "direct")
    assert owner_key({"metadata": {"namespace": "ns"}}) is None


# --- the work queue ----------------------------------------------------------------------


def test_work_queue_holds_a_key_once_and_requeues_it_if_added_while_processed() -> None:
    queue = WorkQueue()
    for _ in range(3):
        queue.add(("ns", "a"))
    queue.add(("ns", "b"))
    assert queue.get(0.1) == ("ns", "a")
    queue.add(("ns", "a"))  # changed while being reconciled
    assert queue.get(0.1) == ("ns", "b")
    assert queue.get(0.05) is None  # "a" waits for done()
    queue.done(("ns", "a"))
    assert queue.get(0.1) == ("ns", "a")
    queue.done(("ns", "a"))
    queue.done(("ns", "b"))
    assert queue.get(0.05) is None


def test_work_queue_delays() -> None:
    queue = WorkQueue()
    queue.add(("ns", "later"), delay=0.2)
    started = time.monotonic()
    assert queue.get(0.05) is None
    assert queue.get(1.0) == ("ns", "later")
    assert 0.15 <= time.monotonic() - started < 1.0


# --- leader election ---------------------------------------------------------------------


def test_lease_may_be_taken_when_free_own_or_unrenewed_for_its_duration() -> None:
    held = LeaseRecord(holder="other", duration_seconds=15, renew_time="t", transitions=1)
    assert may_take(None, "me", 0, 0)
    assert may_take(LeaseRecord(None, 15, None, 1), "me", 100, 100)
    assert may_take(LeaseRecord("me", 15, "t", 1), "me", 100, 100)
    assert not may_take(held, "me", observed_at=100, now=114.9)
    assert may_take(held, "me", observed_at=100, now=115)


def test_lease_timings_must_nest() -> None:
    with pytest.raises(ValueError, match="retry period"):
        LeaderElector(kube=None, namespace="ns", identity="me", lease_duration=5, renew_deadline=6)  # type: ignore[arg-type]
    assert micro_time(datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)) == "2026-01-02T03:04:05.000006Z"


# --- metrics and health ------------------------------------------------------------------


def test_metrics_exposition() -> None:
    metrics = Metrics()
    metrics.declare("xstilts_jobs_created_total", "counter", "Jobs created.")
    metrics.declare("xstilts_reconcile_duration_seconds", "histogram", "Time per reconcile.")
    metrics.inc("xstilts_jobs_created_total", amount=3)
    metrics.observe("xstilts_reconcile_duration_seconds", 0.02)
    metrics.observe("xstilts_reconcile_duration_seconds", 3.0)
    text = metrics.render()
    assert "# TYPE xstilts_jobs_created_total counter\nxstilts_jobs_created_total 3\n" in text
    samples = parse_exposition(text)
    assert samples['xstilts_reconcile_duration_seconds_bucket{le="0.025"}'] == 1
    assert samples['xstilts_reconcile_duration_seconds_bucket{le="+Inf"}'] == 2
    assert samples["xstilts_reconcile_duration_seconds_sum"] == pytest.approx(3.02)


def test_health_and_metrics_over_http() -> None:
    metrics, health = Metrics(), Health()
    metrics.declare("xstilts_leader", "gauge", "Leading.")
    metrics.set("xstilts_leader", 1)
    server = serve_http(0, health, metrics, host="127.0.0.1")
    port = server.server_address[1]

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    try:
        assert get("/healthz") == (200, "ok\n")
        assert get("/readyz") == (503, "not connected to the API yet\n")
        health.ready.set()
        assert get("/readyz") == (200, "ok\n")
        assert "xstilts_leader 1" in get("/metrics")[1]
        assert get("/nope")[0] == 404
    finally:
        server.shutdown()


# --- the API shell -----------------------------------------------------------------------


def test_resource_paths() -> None:
    assert EXPERIMENTS.path("ns", "exp", "status") == "/apis/xstilts.dev/v1alpha1/namespaces/ns/experiments/exp/status"
    assert EXPERIMENTS.path(None) == "/apis/xstilts.dev/v1alpha1/experiments"
    assert JOBS.path("ns") == "/apis/batch/v1/namespaces/ns/jobs"
    assert PODS.path("ns", "p", "log") == "/api/v1/namespaces/ns/pods/p/log"
    assert LEASES.api_version == "coordination.k8s.io/v1"


def test_api_errors_carry_the_servers_message() -> None:
    body = json.dumps({"kind": "Status", "reason": "AlreadyExists", "code": 409,
                       "message": 'jobs.batch "x" already exists'}).encode()
    error = _error_from_response(409, body, "create jobs")
    assert error.already_exists and not error.conflict
    assert str(error) == 'create jobs: jobs.batch "x" already exists'
    conflict = _error_from_response(409, json.dumps({"reason": "Conflict", "message": "m"}).encode(), "patch")
    assert conflict.conflict and not conflict.already_exists
    assert _error_from_response(410, b"not json", "watch").gone
    assert KubeError(0, "Unreachable", "cannot reach").unreachable


def test_reflector_relists_after_410_gone_and_reports_what_vanished() -> None:
    """A stand-in API (the real control plane cannot be made to compact its history on
    demand): a list, a watch ending in a 410 ERROR event, a second list without one object."""

    def job(name: str, version: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": version}}

    class ScriptedApi:
        def __init__(self) -> None:
            self.lists = [
                {"metadata": {"resourceVersion": "10"}, "items": [job("a", "5"), job("b", "6")]},
                {"metadata": {"resourceVersion": "20"}, "items": [job("a", "15")]},
            ]
            self.watches = [
                [{"type": "MODIFIED", "object": job("a", "11")},
                 {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}],
            ]

        def list(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            return self.lists.pop(0)

        def watch(self, *args: Any, **kwargs: Any) -> Any:
            if not self.watches:
                stop.set()
                return iter(())
            return iter(self.watches.pop(0))

    seen: list[tuple[str, str, str]] = []
    stop = threading.Event()
    reflector = Reflector(ScriptedApi(), JOBS, "ns", lambda kind, obj, old: seen.append(  # type: ignore[arg-type]
        (kind, obj["metadata"]["name"], obj["metadata"]["resourceVersion"])))
    reflector.run(stop)
    assert seen == [("ADDED", "a", "5"), ("ADDED", "b", "6"), ("MODIFIED", "a", "11"),
                    ("MODIFIED", "a", "15"), ("DELETED", "b", "6")]
    assert reflector.relists == 2
    assert [o["metadata"]["name"] for o in reflector.items()] == ["a"]
    assert reflector.items()[0]["kind"] == "Job"  # list items get their kind back


def test_connect_reads_the_context_namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
              "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443"}}],
              "users": [{"name": "u", "user": {"token": "t"}}],
              "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "research"}},
                           {"name": "d", "context": {"cluster": "k", "user": "u"}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    connection = connect(str(path))
    assert (connection.namespace, connection.server) == ("research", "https://127.0.0.1:6443")
    assert connect(str(path), context="d").namespace == "default"
    monkeypatch.setenv("KUBECONFIG", str(path))
    assert connect().source == str(path)
    with pytest.raises(ConfigError, match="does not exist"):
        connect(str(tmp_path / "missing"))
    monkeypatch.delenv("KUBECONFIG")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="no Kubernetes credentials"):
        connect()


# --- result files ------------------------------------------------------------------------


def write_result(path: Path, run: Any) -> None:
    result = RunResult(run_id=run.run_id, config=run.config, metrics={"xnli.test.accuracy.avg": 0.7},
                       languages={"en": {"accuracy": 0.8}, "de": {"accuracy": 0.6}}, parameter_count=1,
                       tokens_seen=1, train_steps=1, wall_seconds=3600.0, tokens_per_second=1.0,
                       finished_at="2026-01-01T00:00:00+00:00")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(result.model_dump_json())


def test_result_paths_map_the_pods_storage_to_the_results_dir(tmp_path: Path) -> None:
    spec, p = tiny()
    rid = p.runs[0].run_id
    assert ResultStore().path(spec, rid) == Path(f"/data/tiny/runs/{rid}/result.json")
    assert ResultStore(tmp_path).path(spec, rid) == tmp_path / "tiny" / "runs" / rid / "result.json"
    elsewhere = spec.model_copy(update={"cluster": spec.cluster.model_copy(update={
        "storage": spec.cluster.storage.model_copy(update={"mount_path": "/mnt/runs"})})})
    assert ResultStore().path(elsewhere, rid) == Path(f"/mnt/runs/tiny/runs/{rid}/result.json")
    assert ResultStore(tmp_path).path(elsewhere, rid) == tmp_path / "tiny" / "runs" / rid / "result.json"


def test_result_store_reads_caches_and_reports_bad_files(tmp_path: Path) -> None:
    spec, p = tiny()
    store = ResultStore(tmp_path)
    target = next(r for r in p.runs if r.labels.target is not None)
    write_result(store.path(spec, target.run_id), target)
    found, problems = store.read(spec, p)
    assert list(found) == [target.run_id] and problems == []
    assert found[target.run_id].scores == {"de": 0.6, "en": 0.8, "avg": pytest.approx(0.7), "zero-shot": 0.6}
    assert found[target.run_id].gpu_seconds == 3600.0

    other = p.runs[0]
    bad = store.path(spec, other.run_id)
    assert bad is not None
    bad.parent.mkdir(parents=True)
    bad.write_text('{"run_id": "x"}')
    found, problems = store.read(spec, p)
    assert list(found) == [target.run_id]
    assert len(problems) == 1 and problems[0].startswith(f"{bad}: not a valid result record (config: Field required")
    write_result(bad, target)  # another run's record in this run's directory
    assert store.read(spec, p)[1] == [f"{bad}: holds the result of run {target.run_id}, not {other.run_id}"]

    store.path(spec, target.run_id).unlink()
    assert target.run_id not in store.read(spec, p)[0]


# --- the status view ---------------------------------------------------------------------


def experiment_object(spec: Any, status: dict[str, Any] | None) -> dict[str, Any]:
    obj = to_object(spec)
    obj["metadata"].update(uid="uid-1", generation=1, resourceVersion="7")
    if status is not None:
        obj["status"] = status
    return obj


def test_status_view_from_the_experiment_and_its_jobs() -> None:
    spec, p = tiny()
    obj = experiment_object(spec, None)
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    decision = reconcile(spec, p, Observed(), now, owner=OwnerRef.of(obj))
    obj["status"] = decision.status
    job = render_run(p.runs[0], spec, OwnerRef.of(obj))[-1]
    job["status"] = {"startTime": "2026-01-01T11:00:00Z", "ready": 1, "active": 1}
    view = build_view("tiny", "research", obj, [job], now)
    assert view is not None and view.controller
    assert [r.run_id for r in view.rows] == [r.run_id for r in p.runs]
    first = view.rows[0]
    assert (first.state, first.job, first.gpu_hours) == ("creating", job["metadata"]["name"], pytest.approx(1.0))
    assert view.counts["total"] == 6 and view.progress == 0.0
    assert view.to_json()["rows"][0]["run_id"] == p.runs[0].run_id


def test_status_view_from_jobs_alone_and_of_nothing() -> None:
    spec, p = tiny()
    jobs = []
    for run in p.runs[:2]:
        job = render_run(run, spec)[-1]
        job["status"] = {"startTime": "2026-01-01T11:00:00Z", "completionTime": "2026-01-01T11:30:00Z",
                         "conditions": [{"type": "Complete", "status": "True"}]}
        jobs.append(job)
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    view = build_view("tiny", "research", None, jobs, now)
    assert view is not None and not view.controller
    # Without the spec, runs that have no Job are unknown, and so is the phase.
    assert view.counts["succeeded"] == 2 and view.counts["total"] == 2 and view.phase == "Unknown"
    assert "pass --spec SPEC" in view.message
    assert view.gpu_hours_used == pytest.approx(1.0)
    assert build_view("tiny", "research", None, [], now) is None
    # With the spec: every planned run, as the controller would see them.
    obj = without_controller(spec, "research", jobs, None, now)
    full = build_view("tiny", "research", obj, jobs, now, controller=False)
    assert full is not None and not full.controller and full.counts["total"] == 6
    states = {row.run_id: row.state for row in full.rows}
    assert [states[r.run_id] for r in p.runs[:2]] == ["finishing", "finishing"]  # Job done, no result.json seen
    assert progress_bar(0.5, 10) == "█████░░░░░"


# --- the commands, offline ---------------------------------------------------------------


def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(SPEC)
    return path


def test_submit_dry_run_prints_the_experiment(tmp_path: Path) -> None:
    result = runner.invoke(app, ["submit", str(spec_file(tmp_path)), "--dry-run", "-n", "lab"])
    assert result.exit_code == 0, result.output
    (obj,) = list(yaml.safe_load_all(result.stdout))
    assert obj["kind"] == "Experiment" and obj["metadata"] == {"name": "tiny", "namespace": "lab"}
    assert parse_document(obj).name == "tiny"


def test_submit_no_controller_dry_run_prints_the_first_pass(tmp_path: Path) -> None:
    result = runner.invoke(app, ["submit", str(spec_file(tmp_path)), "--dry-run", "--no-controller"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# tiny: the first pass creates 3 of 6 runs (maxParallel 3;")
    objects = list(yaml.safe_load_all(result.stdout))
    assert [o["kind"] for o in objects] == ["ConfigMap", "Job"] * 3
    _, p = tiny()
    for job in objects[1::2]:
        assert not p.by_id[job["metadata"]["labels"]["xstilts.dev/run-id"]].depends_on
        assert job["metadata"]["namespace"] == "research" and "ownerReferences" not in job["metadata"]
    # run.json prints as a block, and reads back as the RunConfig.
    assert "run.json: |" in result.stdout
    assert json.loads(objects[0]["data"]["run.json"])["storage_root"] == "/data/tiny"


def unreachable_kubeconfig(tmp_path: Path) -> Path:
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
              "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:9"}}],
              "users": [{"name": "u", "user": {"token": "t"}}],
              "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("args", [["status", "x"], ["delete", "x"], ["logs", "x", "abc"], ["submit", "SPEC"],
                                  ["submit", "SPEC", "--no-controller"]])
def test_no_cluster_is_one_line(tmp_path: Path, args: list[str]) -> None:
    args = [str(spec_file(tmp_path)) if a == "SPEC" else a for a in args]
    result = runner.invoke(app, [*args, "--kubeconfig", str(unreachable_kubeconfig(tmp_path))])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot reach the Kubernetes API at https://127.0.0.1:9:")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_controller_flags_are_checked(tmp_path: Path) -> None:
    both = runner.invoke(app, ["controller", "-n", "a", "--all-namespaces"])
    assert both.exit_code == 2 and "either --namespace or --all-namespaces" in both.stderr
    nested = runner.invoke(app, ["controller", "--kubeconfig", str(unreachable_kubeconfig(tmp_path)),
                                 "--lease-duration", "5", "--renew-deadline", "6", "--health-port", "0"])
    assert nested.exit_code == 1  # the API is checked first: unreachable
    assert "cannot reach the Kubernetes API" in nested.stderr
