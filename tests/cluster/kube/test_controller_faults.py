"""The controller under faults, against the real control plane: it reaches the API server
through `faulty_api.FaultyAPI`, a proxy that fails, hangs, drops or cuts the calls a test
picks (an ordinary kubeconfig that names the proxy as the server), while the test watches
the API server directly.

What must hold whatever fails: no run gets a second Job (a Job name never has two uids, and
never more than maxParallel run at once), no run is lost (every run succeeds) and the
Experiment's status converges to Succeeded.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from controller_harness import (
    ControllerProcess,
    Env,
    ResultWriter,
    converge,
    created_events,
    events,
    kubectl,
    list_jobs,
    make_env,
    planned,
    small_experiment,
)
from faulty_api import FaultyAPI, Rule, kubeconfig_via
from kube_cluster import ApiError, ControlPlane
from xstilts.operator.cluster.render import MODEL_LABEL, job_name
from xstilts.operator.cluster.runtime.kube_api import JOBS, Kube, Reflector, connect

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

WRITES = ("POST", "PUT", "PATCH", "DELETE")


@pytest.fixture
def env(control_plane: ControlPlane, k8s_namespace: str, tmp_path: Path) -> Env:
    return make_env(control_plane, k8s_namespace, tmp_path)


@pytest.fixture
def api(env: Env) -> Iterator[FaultyAPI]:
    with FaultyAPI(env.cp, seed=6) as proxy:
        yield proxy


class JobHistory:
    """Every uid each Job name has had in the namespace, as the admin sees them directly
    (not through the proxy): a run's Job deleted and created again shows as a second uid."""

    def __init__(self, cp: ControlPlane, namespace: str):
        assert cp.kubeconfig is not None
        self.uids: dict[str, set[str]] = defaultdict(set)
        self._stop = threading.Event()
        self._reflector = Reflector(Kube(connect(str(cp.kubeconfig))), JOBS, namespace, self._seen)

    def _seen(self, kind: str, obj: dict[str, object], old: object) -> None:
        meta = obj["metadata"]
        assert isinstance(meta, dict)
        self.uids[str(meta["name"])].add(str(meta["uid"]))

    def __enter__(self) -> JobHistory:
        threading.Thread(target=self._reflector.run, args=(self._stop,), daemon=True).start()
        assert self._reflector.synced.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def faulty_controller(env: Env, api: FaultyAPI, identity: str, *flags: str) -> ControllerProcess:
    kubeconfig = kubeconfig_via(api, env.kubeconfig, env.tmp / "through-proxy.kubeconfig")
    return env.controller(identity, kubeconfig=kubeconfig, extra=flags)


def assert_one_job_per_run(env: Env, obj: dict[str, Any], history: JobHistory) -> None:
    name = obj["metadata"]["name"]
    _, plan = planned(obj)
    expected = sorted(job_name(name, r.run_id) for r in plan.runs)
    assert sorted(j["metadata"]["name"] for j in list_jobs(env.cp, env.namespace, name)) == expected
    twice = {job: uids for job, uids in history.uids.items() if len(uids) > 1}
    assert not twice, f"Jobs created more than once: {twice}"
    assert sorted(history.uids) == expected


def test_random_api_faults_on_every_call_delay_but_never_duplicate_or_lose_a_run(env: Env, api: FaultyAPI) -> None:
    obj = small_experiment("flaky", env.namespace, seeds=(1, 2), max_parallel=3)
    env.apply(obj)
    api.add(
        # The first call of every kind fails...
        Rule("status", status=503, count=1, each_kind=True),
        # ...some fail in a given way once, so that each way is seen...
        Rule("drop_response", methods={"POST"}, path=r"/jobs$", count=1),
        Rule("hang", methods={"POST"}, path=r"/configmaps$", count=1),
        Rule("drop", methods={"PATCH"}, path=r"/status$", count=1),
        Rule("cut", watch=True, path=r"/jobs$", count=1, after=1.0),
        Rule("drop_response", methods={"PUT"}, path=r"/leases/", count=1),  # a renewal made, not heard of
        Rule("status", status=429, methods={"GET"}, path=r"/leases/", count=1),
        # ...and from then on about one call in four fails, any way.
        Rule("status", status=500, rate=0.06), Rule("status", status=503, rate=0.05),
        Rule("status", status=429, rate=0.03), Rule("drop", rate=0.03), Rule("hang", rate=0.02),
        Rule("drop_response", methods=WRITES, rate=0.05), Rule("cut", watch=True, rate=0.2, after=2.0),
    )
    writer = ResultWriter(env.cp, obj, env.results)
    with JobHistory(env.cp, env.namespace) as history, faulty_controller(
            env, api, "controller-a", "--request-timeout=2", "--lease-duration=8", "--renew-deadline=6",
            "--retry-period=1") as controller:
        experiment = converge(env, writer, [controller], max_parallel=3, timeout=240)
        called = {(resource, verb) for _, resource, verb in controller.api_calls()}
        metrics = controller.metrics()
    assert_one_job_per_run(env, obj, history)
    status = experiment["status"]
    assert status["counts"] == {"total": 6, "pending": 0, "running": 0, "succeeded": 6, "failed": 0, "blocked": 0}
    assert status["observedGeneration"] == experiment["metadata"]["generation"]

    faults = api.faults()
    failed, ok = (metrics.get(f'xstilts_reconcile_total{{result="{r}"}}', 0) for r in ("error", "ok"))
    print(f"{len(faults)} faults in {api.requests} requests: {dict(Counter(f.action for f in faults))};"
          f" {failed:.0f} reconciles failed, {ok:.0f} succeeded")
    # Every kind of call the controller made failed at least once, every way there is.
    assert called - {f.kind for f in faults} == set()
    assert {f.action for f in faults} == {"status", "drop_response", "hang", "drop", "cut"}
    assert len(faults) >= 0.2 * api.requests, (len(faults), api.requests)
    # The lost answer to a Job create: the Job was made then, and never again.
    lost = next(f for f in faults if f.action == "drop_response" and f.kind == ("jobs", "create"))
    assert lost.status == 201  # the first create of a Job (its first attempt met a 503)
    assert lost.name is not None and len(history.uids[lost.name]) == 1
    # The renewal whose answer was lost: the Lease, read back, showed it had been made.
    renewal = next(f for f in faults if f.action == "drop_response" and f.kind == ("leases", "update"))
    assert renewal.status == 200
    assert metrics["xstilts_leader"] == 1  # it kept its Lease throughout


def test_killed_between_creating_a_job_and_hearing_back_the_restarted_controller_keeps_that_job(
        env: Env, api: FaultyAPI) -> None:
    obj = small_experiment("lost", env.namespace, seeds=(1, 2), max_parallel=3)
    env.apply(obj)
    first = faulty_controller(env, api, "controller-a")
    # The first run's ConfigMap is created but its answer lost: the controller tries again
    # and reads it back. Then its first Job is created, and the controller dies (SIGKILL)
    # before the answer reaches it.
    api.add(Rule("drop_response", methods={"POST"}, path=r"/configmaps$", count=1),
            Rule("drop_response", methods={"POST"}, path=r"/jobs$", count=1, then=first.kill))
    writer = ResultWriter(env.cp, obj, env.results)
    with JobHistory(env.cp, env.namespace) as history:
        with first:
            env.cp.wait_for(lambda: not first.running, timeout=60, what="the controller killed mid-create")
        assert first.proc is not None and first.proc.returncode == -signal.SIGKILL
        (configmap, job) = api.faults("drop_response")
        assert configmap.kind == ("configmaps", "create") and configmap.status == 201
        assert job.kind == ("jobs", "create") and job.status == 201 and job.name is not None
        assert [j["metadata"]["name"] for j in list_jobs(env.cp, env.namespace, "lost")] == [job.name]
        uid = next(iter(history.uids[job.name]))

        # A new replica takes over once the dead one's Lease expires.
        with faulty_controller(env, api, "controller-b") as second:
            experiment = converge(env, writer, [second], max_parallel=3)
            second.assert_calls_declared()
    assert_one_job_per_run(env, obj, history)
    assert history.uids[job.name] == {uid}
    # The new controller found the Job and created every other run's, once each.
    events = created_events(env)
    assert job.name not in events and set(events.values()) == {1} and len(events) == 5
    assert experiment["status"]["counts"]["succeeded"] == 6


def test_watches_that_expire_are_listed_again(env: Env, api: FaultyAPI) -> None:
    obj = small_experiment("expired", env.namespace, seeds=(1, 2), max_parallel=3)
    env.apply(obj)
    writer = ResultWriter(env.cp, obj, env.results)
    with JobHistory(env.cp, env.namespace) as history, faulty_controller(env, api, "controller-a") as controller:
        env.cp.wait_for(lambda: len(list_jobs(env.cp, env.namespace, "expired")) >= 3, timeout=60,
                        what="the first wave")
        # Cut both watches while Jobs run. The next two Experiment watches ask for a
        # resourceVersion older than the API server's watch cache of Experiments (made when
        # the CRD was installed): the API server itself ends them with 410 Gone. The next
        # two Job watches are answered 410 by the proxy. Only listing again shows the
        # controller what changed meanwhile.
        api.add(Rule("expire_watch", watch=True, path=r"/experiments$", count=2),
                Rule("status", status=410, watch=True, path=r"/jobs$", count=2))
        assert api.cut_watches() == 2
        experiment = converge(env, writer, [controller], max_parallel=3)
        metrics = controller.metrics()
    expired = api.faults("expire_watch")
    assert [f.kind for f in expired] == [("experiments", "watch")] * 2
    # The API server's own 410: an ERROR event in the watch's stream.
    assert len(api.faults("expired_event")) == 2, api.faults()
    assert metrics['xstilts_watch_relists_total{resource="experiments"}'] == 3
    assert metrics['xstilts_watch_relists_total{resource="jobs"}'] == 3
    assert_one_job_per_run(env, obj, history)
    assert experiment["status"]["counts"]["succeeded"] == 6


def test_two_controllers_started_at_once_one_leads_and_the_other_takes_over(env: Env, api: FaultyAPI) -> None:
    obj = small_experiment("twins", env.namespace, seeds=(1, 2, 3), max_parallel=2)
    env.apply(obj)
    # Both start at the same instant (their first call is held until both made it) and
    # both find no Lease: their creates reach the API server together.
    api.add(Rule("barrier", path=r"^/apis/xstilts\.dev/v1alpha1$", count=2),
            Rule("barrier", methods={"POST"}, path=r"/leases$", count=2))
    timings = ("--lease-duration=6", "--renew-deadline=4", "--retry-period=0.5")
    writer = ResultWriter(env.cp, obj, env.results)
    with JobHistory(env.cp, env.namespace) as history, \
            faulty_controller(env, api, "twin-a", *timings) as a, faulty_controller(env, api, "twin-b", *timings) as b:
        env.cp.wait_for(lambda: len(api.faults("barrier")) == 4, timeout=60, what="both controllers racing")
        assert sorted(f.status or 0 for f in api.faults("barrier") if f.kind == ("leases", "create")) == [201, 409]
        env.cp.wait_for(lambda: a.metrics().get("xstilts_leader") == 1 or b.metrics().get("xstilts_leader") == 1,
                        timeout=30, what="a leader")
        leader, standby = (a, b) if a.metrics().get("xstilts_leader") == 1 else (b, a)
        standby_identity = "twin-b" if standby is b else "twin-a"
        assert standby.metrics().get("xstilts_leader", 0) == 0
        env.cp.wait_for(lambda: writer.write_finished(), timeout=60, what="a first result")
        assert standby.metrics().get("xstilts_jobs_created_total", 0) == 0
        leader.kill()  # SIGKILL: the Lease stays held until it expires
        env.cp.wait_for(lambda: standby.metrics().get("xstilts_leader") == 1, timeout=30,
                        what="the standby leading")
        experiment = converge(env, writer, [standby], max_parallel=2)
        lease = env.cp.kubectl_json("get", "lease", "xstilts-controller", namespace=env.namespace)
        assert lease["spec"]["holderIdentity"] == standby_identity and lease["spec"]["leaseTransitions"] == 1
    assert_one_job_per_run(env, obj, history)
    assert experiment["status"]["counts"]["succeeded"] == 9
    assert set(created_events(env).values()) == {1}


def test_a_quiet_watch_outlives_the_request_timeout(env: Env) -> None:
    """The request timeout bounds the wait for a watch's first answer, not the wait for its
    events: a watch with nothing to say runs until the server ends it."""
    kube = Kube(connect(str(env.kubeconfig)), timeout=0.5)
    started = time.monotonic()
    events = list(kube.watch(JOBS, env.namespace, "0", timeout_seconds=2))
    assert {e["type"] for e in events} <= {"BOOKMARK"}
    assert time.monotonic() - started >= 1.9


def refuse_jobs_of_model(cp: ControlPlane, namespace: str, model: str, message: str) -> str:
    """A ValidatingAdmissionPolicy that makes the API server itself refuse (422 Invalid) every
    Job of `model` in `namespace`, though the Experiment passed the CRD and pydantic; returns
    its name. Waits until the API server enforces it."""
    name = f"refuse-{namespace}"
    cp.apply({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{"apiGroups": ["batch"], "apiVersions": ["v1"],
                                                    "operations": ["CREATE"], "resources": ["jobs"]}]},
            "validations": [{"expression": f"object.metadata.?labels[?'{MODEL_LABEL}'].orValue('') != '{model}'",
                             "message": message, "reason": "Invalid"}],
        },
    })
    cp.apply({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": {"matchLabels": {
                     "kubernetes.io/metadata.name": namespace}}}},
    })
    cp.wait_for(lambda: refused_by_admission(cp, namespace, model), timeout=60,
                what="the admission policy enforced")
    return name


def lift_refusal(cp: ControlPlane, namespace: str, model: str, policy: str) -> None:
    """Deletes the policy of `refuse_jobs_of_model` and waits until the API server admits the
    model's Jobs again: its admission plugin learns of the deletion from a watch, and a Job sent
    before that is still refused."""
    kubectl(cp, "delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", policy)
    cp.wait_for(lambda: not refused_by_admission(cp, namespace, model), timeout=60,
                what="the admission policy lifted")


def refused_by_admission(cp: ControlPlane, namespace: str, model: str) -> bool:
    """Whether the API server refuses (422) a dry-run Job labelled with `model`."""
    probe = {"apiVersion": "batch/v1", "kind": "Job",
             "metadata": {"name": "probe", "labels": {MODEL_LABEL: model}},
             "spec": {"template": {"spec": {"restartPolicy": "Never",
                                            "containers": [{"name": "c", "image": "registry.invalid/x"}]}}}}
    try:
        cp.api("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs?dryRun=All", probe)
    except ApiError as e:
        if e.status == 422:
            return True
        raise
    return False


def test_objects_the_api_server_refuses_fail_their_runs_on_the_status_and_are_not_sent_again(
        env: Env, api: FaultyAPI) -> None:
    """Issue 12's fault "a Job the API server refuses shows on the Experiment's status instead of
    being retried silently", and issue 13's class 1: the API server refuses the Jobs of one model
    (an admission policy), with a message longer than a status should hold."""
    reason = "Jobs of model m1 are not admitted in this namespace: " + "the policy explains at length. " * 100
    policy = refuse_jobs_of_model(env.cp, env.namespace, "m1", reason)
    obj = small_experiment("refused", env.namespace, seeds=(1,), models=2, max_parallel=10)
    obj["spec"]["models"][1]["pretrained"] = "FacebookAI/xlm-roberta-large"
    env.apply(obj)
    _, plan = planned(obj)
    m1 = {job_name("refused", r.run_id) for r in plan.runs if r.labels.model == "m1"}
    m1_free = {job_name("refused", r.run_id) for r in plan.runs if r.labels.model == "m1" and not r.depends_on}
    with faulty_controller(env, api, "controller-a") as controller:
        def degraded() -> dict[str, Any] | None:
            status = (env.cp.api("GET", f"/apis/xstilts.dev/v1alpha1/namespaces/{env.namespace}/experiments/refused")
                      .get("status") or {})
            return status if status.get("phase") == "Degraded" else None

        status = env.cp.wait_for(degraded, timeout=60, what="phase Degraded")
        # The m0 runs go on; those of m1 are failed (no dependency: refused) or blocked.
        refused = {rid for rid, why in status["failures"].items() if why.startswith("refused by the API server: ")}
        assert {job_name("refused", rid) for rid in refused} == m1_free
        assert all(len(why) <= 256 for why in status["failures"].values())
        assert len(status["message"]) <= 1024 and "refused the objects of" in status["message"]
        assert all(len(c["message"]) <= 1024 for c in status["conditions"])
        assert {c["type"]: c["reason"] for c in status["conditions"]}["Degraded"] == "ObjectsRefused"
        assert status["observedGeneration"] == 1
        warnings = events(env.cp, env.namespace, "ObjectRefused")
        assert len(warnings) == len(m1_free)
        assert all(len(e["message"]) == 1024 and "Jobs of model m1 are not admitted" in e["message"]
                   for e in warnings)
        assert "Jobs of model m1 are not admitted" in controller.output()  # the log has the detail
        # Two resyncs later: nothing of m1 was POSTed again, no Event repeated.
        sent = Counter(api.posted(r"/jobs$"))
        time.sleep(11)
        assert Counter(api.posted(r"/jobs$")) == sent
        assert {job: n for job, n in sent.items() if job in m1} == dict.fromkeys(m1_free, 1)
        assert all(int(e.get("count") or 1) == 1 for e in events(env.cp, env.namespace, "ObjectRefused"))
        assert controller.running

        # The policy is lifted and the spec changes (a new generation): the runs are tried again.
        lift_refusal(env.cp, env.namespace, "m1", policy)
        obj["spec"]["cluster"]["maxParallel"] = 9
        env.apply(obj)
        env.cp.wait_for(lambda: m1_free <= {j["metadata"]["name"] for j in list_jobs(env.cp, env.namespace,
                                                                                     "refused")},
                        timeout=180, what="the refused runs created after the spec changed")


def test_a_spec_that_cannot_be_planned_fails_once_and_waits_for_a_new_generation(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning that raises, whatever the exception (here an AssertionError, as two colliding
    groups once raised): phase Failed with a short message, an Event, and no further attempt
    until the spec's generation changes. The controller runs in this process so that the
    planner can be made to fail; the API server is the real one."""
    from xstilts.operator.cluster import controller as controller_module
    from xstilts.operator.cluster.controller import Controller, ControllerOptions, declare_metrics
    from xstilts.operator.cluster.runtime.prometheus import Health, Metrics

    calls: list[int] = []

    def broken_plan(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise AssertionError("two runs have the same id " + "x" * 5000)

    monkeypatch.setattr(controller_module, "plan", broken_plan)
    obj = small_experiment("unplannable", env.namespace)
    env.apply(obj)
    metrics = Metrics()
    declare_metrics(metrics)
    controller = Controller(Kube(connect(str(env.kubeconfig))), ControllerOptions(env.namespace), metrics, Health())
    stop = threading.Event()
    controller.start_watches()
    try:
        assert controller.wait_synced(stop)
        key = (env.namespace, "unplannable")
        env.cp.wait_for(lambda: controller.experiments.get(key), timeout=30, what="the Experiment in the cache")
        assert controller.reconcile_key(key) == "failed"
        status = env.cp.wait_for(lambda: (env.cp.api(
            "GET", f"/apis/xstilts.dev/v1alpha1/namespaces/{env.namespace}/experiments/unplannable")
            .get("status") or {}) or None, timeout=30, what="a status")
        assert status["phase"] == "Failed" and status["observedGeneration"] == 1
        assert status["message"].startswith("the spec passed validation but cannot be planned: AssertionError:")
        assert len(status["message"]) == 1024
        assert {c["type"]: c["reason"] for c in status["conditions"]}["Ready"] == "PlanFailed"
        [event] = events(env.cp, env.namespace, "PlanFailed")
        assert len(event["message"]) == 1024
        # Resyncs: no planning again, no Job, no second Event.
        for _ in range(3):
            assert controller.reconcile_key(key) == "failed"
        assert calls == [1] and list_jobs(env.cp, env.namespace, "unplannable") == []
        assert [e.get("count", 1) for e in events(env.cp, env.namespace, "PlanFailed")] == [1]
        # A new generation is planned again.
        obj["spec"]["cluster"]["maxParallel"] = 2
        env.apply(obj)
        env.cp.wait_for(lambda: (controller.experiments.get(key) or {}).get("metadata", {}).get("generation") == 2,
                        timeout=30, what="generation 2 in the cache")
        assert controller.reconcile_key(key) == "failed" and calls == [1, 1]
    finally:
        controller._watch_stop.set()
