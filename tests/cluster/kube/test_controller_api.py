"""The controller's API paths against the real API server, driven in-process because they
are hard to time from outside: a status write meeting a newer version (409 Conflict),
creating what exists (409 AlreadyExists), deleting what is gone (404), and the list + watch
cache."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from controller_harness import Env, make_env, small_experiment
from kube_cluster import ControlPlane
from xstilts.operator.cluster.controller import Controller, ControllerOptions, create_run, declare_metrics, delete_run
from xstilts.operator.cluster.reconcile import CreateRun
from xstilts.operator.cluster.render import OwnerRef, job_name, pod_storage_root, render_run
from xstilts.operator.cluster.runtime.kube_api import EXPERIMENTS, JOBS, Kube, KubeError, Reflector, connect
from xstilts.operator.cluster.runtime.prometheus import Health, Metrics
from xstilts.operator.experiment.plan import plan
from xstilts.operator.experiment.spec import parse_document

pytestmark = [pytest.mark.k8s, pytest.mark.slow]


@pytest.fixture
def env(control_plane: ControlPlane, k8s_namespace: str, tmp_path: Path) -> Env:
    return make_env(control_plane, k8s_namespace, tmp_path)


@pytest.fixture
def kube(env: Env) -> Kube:
    """The API as the controller's ServiceAccount (its Role)."""
    return Kube(connect(str(env.kubeconfig)))


def create_experiment(env: Env, name: str) -> dict[str, Any]:
    env.apply(small_experiment(name, env.namespace))
    obj: dict[str, Any] = env.cp.api("GET", f"/apis/xstilts.dev/v1alpha1/namespaces/{env.namespace}/experiments/{name}")
    return obj


def test_status_conflict_is_resolved_by_reading_again(env: Env, kube: Kube) -> None:
    stale = create_experiment(env, "conflict")
    # Someone else writes the status after we read the object.
    env.cp.kubectl("patch", "experiment", "conflict", "--subresource=status", "--type=merge",
                   "-p", '{"status": {"message": "written by someone else", "runs": {"old": "failed"}}}',
                   namespace=env.namespace)
    metrics = Metrics()
    declare_metrics(metrics)
    controller = Controller(kube, ControllerOptions(env.namespace, env.results), metrics, Health())
    seen: list[dict[str, Any]] = []

    def recompute(fresh: dict[str, Any]) -> dict[str, Any]:
        seen.append(copy.deepcopy(fresh))
        return {"phase": "Running", "message": "recomputed from the fresh status"}

    written = controller._write_status((env.namespace, "conflict"), stale,
                                       {"phase": "Pending", "message": "computed from a stale read"}, recompute)
    assert written == {"phase": "Running", "message": "recomputed from the fresh status"}
    assert seen[0]["status"]["message"] == "written by someone else"  # the recompute saw the other write
    status = kube.get(EXPERIMENTS, env.namespace, "conflict")["status"]
    assert status == written  # an update replaces the whole status: the stale "runs" are gone
    assert metrics.value("xstilts_status_conflicts_total") == 1
    assert metrics.value("xstilts_status_updates_total") == 1
    assert kube.calls[("xstilts.dev", "experiments/status", "patch")] == 1
    assert kube.calls[("xstilts.dev", "experiments/status", "get")] == 1
    assert kube.calls[("xstilts.dev", "experiments/status", "update")] == 1
    # Writing what is already there sends nothing.
    fresh = kube.get(EXPERIMENTS, env.namespace, "conflict")
    assert controller._write_status((env.namespace, "conflict"), fresh, dict(fresh["status"]), recompute) is None
    assert kube.calls[("xstilts.dev", "experiments/status", "patch")] == 1


def test_create_what_exists_and_delete_what_is_gone(env: Env, kube: Kube) -> None:
    obj = create_experiment(env, "exists")
    spec = parse_document(obj)
    run = plan(spec, storage_root=pod_storage_root(spec)).runs[0]
    owner = OwnerRef.of(obj)
    action = CreateRun(run.run_id, job_name(spec.name, run.run_id), render_run(run, spec, owner))

    job, created = create_run(kube, action, owner.uid)
    assert created and job is not None
    again, created_again = create_run(kube, action, owner.uid)  # AlreadyExists: read back, not an error
    assert not created_again and again is not None and again["metadata"]["uid"] == job["metadata"]["uid"]
    # The same name owned by another Experiment (e.g. one deleted and recreated): left alone.
    assert create_run(kube, action, "another-uid") == (None, False)

    assert delete_run(kube, env.namespace, action.job_name) is True
    assert delete_run(kube, env.namespace, action.job_name) is False  # 404: fine
    with pytest.raises(KubeError) as error:
        kube.get(JOBS, env.namespace, action.job_name)
    assert error.value.not_found


def test_reflector_lists_then_watches(env: Env, kube: Kube) -> None:
    """The list + watch cache against the real API server. (Its reaction to 410 Gone is
    tested in tests/cluster/test_controller_unit.py with a scripted API: this server keeps every
    version since it started, so no watch here can be made to expire on demand.)"""
    env.cp.kubectl("create", "job", "before", "--image=registry.invalid/x:1", namespace=env.namespace)
    seen: list[tuple[str, str]] = []
    stop = threading.Event()
    reflector = Reflector(kube, JOBS, env.namespace, lambda kind, obj, old: seen.append(
        (kind, obj["metadata"]["name"])), watch_timeout=5)
    thread = threading.Thread(target=reflector.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert reflector.synced.wait(10)
        assert seen == [("ADDED", "before")]
        env.cp.kubectl("create", "job", "after", "--image=registry.invalid/x:1", namespace=env.namespace)
        env.cp.wait_for(lambda: ("ADDED", "after") in seen, timeout=10, what="the watch seeing a new Job")
        env.cp.kubectl("delete", "job", "before", namespace=env.namespace)
        env.cp.wait_for(lambda: ("DELETED", "before") in seen, timeout=10, what="the watch seeing a deletion")
        assert sorted(o["metadata"]["name"] for o in reflector.items()) == ["after"]
        time.sleep(7)  # the server ends each watch after about 5 s here: it resumes from its version
        env.cp.kubectl("create", "job", "later", "--image=registry.invalid/x:1", namespace=env.namespace)
        env.cp.wait_for(lambda: ("ADDED", "later") in seen, timeout=10, what="the resumed watch")
        assert reflector.relists == 1 and seen.count(("ADDED", "after")) == 1  # no re-list, no replay
    finally:
        stop.set()
