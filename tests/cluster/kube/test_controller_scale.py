"""Scale: an experiment of 510 runs of 4 GPUs each on 50 simulated 8-GPU nodes converges
under the controller, against the real control plane (kwok runs each pod for about a second).

Prints how long it took and what the controller spent; the numbers are for this machine
(2 shared cores running etcd, the API server, controller manager, scheduler, kwok, the
controller and the test), not a cluster.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from controller_harness import (
    Env,
    ResultWriter,
    converge,
    created_events,
    get_experiment,
    install_crd,
    job_active,
    list_jobs,
    make_env,
    planned,
)
from kube_cluster import ControlPlane
from xstilts.operator.cluster.render import job_name

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

NODES = 50  # the session's 2 nodes plus 48 added here
MAX_PARALLEL = 200
# Runs of 4 GPUs pack two to a node. Pods last about a second under kwok, so what limits
# the pace here is how fast the Job controller, scheduler and kwok (on 2 shared cores) turn
# pods over, not GPU capacity: about 10-25 pods run at any moment.
GPUS_PER_RUN = 4


@pytest.fixture
def env(control_plane: ControlPlane, k8s_namespace: str, tmp_path: Path) -> Env:
    return make_env(control_plane, k8s_namespace, tmp_path)


@pytest.fixture
def gpu_nodes(control_plane: ControlPlane) -> Iterator[list[str]]:
    existing = len(control_plane.api("GET", "/api/v1/nodes")["items"])
    added = control_plane.add_nodes(max(0, NODES - existing), gpus=8, prefix="scale-gpu-")
    control_plane.wait_nodes_ready(timeout=120)
    yield added
    for name in added:
        with contextlib.suppress(Exception):
            control_plane.api("DELETE", f"/api/v1/nodes/{name}")


def test_510_runs_on_50_gpu_nodes_converge(env: Env, gpu_nodes: list[str], control_plane: ControlPlane) -> None:
    install_crd(control_plane)
    nodes = control_plane.api("GET", "/api/v1/nodes")["items"]
    assert len(nodes) >= NODES
    obj = {
        "apiVersion": "xstilts.dev/v1alpha1", "kind": "Experiment",
        "metadata": {"name": "scale", "namespace": env.namespace},
        "spec": {
            "name": "scale",
            "models": [{"name": name, "pretrained": f"FacebookAI/xlm-roberta-{name}", "parameters": params,
                        "resources": {"gpus": GPUS_PER_RUN, "cpu": "1", "memory": "1Gi"}}
                       for name, params in (("base", 278_000_000), ("large", 560_000_000))],
            "intermediateTasks": ["mnli", "qqp", "squad_v1", "hellaswag", "cosmosqa"],
            "targets": ["xnli", "pawsx"],
            "seeds": list(range(1, 16)),
            "cluster": {"namespace": env.namespace, "maxParallel": MAX_PARALLEL, "image": "registry.invalid/t:1",
                        "storage": {"pvc": "xstilts-runs", "mountPath": "/data"}},
        },
    }
    _, plan = planned(obj)
    assert len(plan.runs) == 510
    writer = ResultWriter(env.cp, obj, env.results)
    with env.controller(resync_seconds=30) as controller:
        env.cp.wait_for(lambda: controller.get("/readyz")[0] == 200, timeout=30, what="controller ready")
        started = time.monotonic()
        env.apply(obj)

        def first_wave_created() -> int:
            count = len(list_jobs(env.cp, env.namespace, "scale"))
            return count if count >= MAX_PARALLEL else 0

        first_wave = env.cp.wait_for(first_wave_created, timeout=120, interval=0.5, what="the first wave")
        first_wave_seconds = time.monotonic() - started
        experiment = converge(env, writer, [controller], max_parallel=MAX_PARALLEL, timeout=900,
                              interval=1.0)
        elapsed = time.monotonic() - started
        metrics = controller.metrics()
        controller.assert_calls_declared()

    jobs = list_jobs(env.cp, env.namespace, "scale")
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted(job_name("scale", r.run_id) for r in plan.runs)
    assert created_events(env) == Counter({job_name("scale", r.run_id): 1 for r in plan.runs})
    assert not any(job_active(j) for j in jobs)
    status = get_experiment(env.cp, env.namespace, "scale")["status"]
    assert status["counts"]["succeeded"] == 510 and experiment["status"]["phase"] == "Succeeded"
    scheduled_on = {p["spec"].get("nodeName") for p in env.cp.api("GET", f"/api/v1/namespaces/{env.namespace}/pods")[
        "items"]}
    reconciles = metrics['xstilts_reconcile_total{result="ok"}']
    mean_ms = 1000 * (metrics["xstilts_reconcile_duration_seconds_sum"]
                      / metrics["xstilts_reconcile_duration_seconds_count"])
    report = (f"510 runs of {GPUS_PER_RUN} GPUs, {len(nodes)} nodes x 8 GPUs, maxParallel {MAX_PARALLEL}:"
              f" first wave of {first_wave}"
              f" Jobs in {first_wave_seconds:.1f}s, all succeeded in {elapsed:.1f}s; pods ran on"
              f" {len(scheduled_on)} nodes; {reconciles:.0f} reconciles, {mean_ms:.0f} ms mean;"
              f" {metrics['xstilts_status_updates_total']:.0f} status writes,"
              f" {metrics.get('xstilts_status_conflicts_total', 0):.0f} conflicts")
    print(report)
    (Path(env.tmp) / "scale-report.txt").write_text(report + "\n")
    assert len(scheduled_on) > 1
