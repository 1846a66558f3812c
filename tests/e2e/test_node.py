"""The one-node cluster runs real pods: the node is Ready, the trainer image runs, cluster
DNS and Services work from a pod, and xstilts installs from k8s/overlays/test with its
controller Available."""

from __future__ import annotations

import json
import uuid

import pytest
from kube_cluster import ControlPlane
from node_cluster import NODE_IP, NODE_NAME, NodeCluster, dns_query_a

pytestmark = [pytest.mark.slow, pytest.mark.k8s]

RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def run_job(nc: NodeCluster, namespace: str, image: str, command: list[str], timeout: float = 180) -> tuple[str, str]:
    """Run ``command`` in a one-pod Job; return (condition type it ended with, logs)."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "containers": [{
                        "name": "main",
                        "image": image,
                        "imagePullPolicy": "Never",
                        "command": command,
                        "securityContext": RESTRICTED,
                    }],
                },
            },
        },
    }
    nc.kubectl("apply", "-f", "-", input=json.dumps(job))
    cp = nc.control_plane
    assert cp is not None

    def finished() -> str | None:
        status = cp.kubectl_json("get", "job", name, namespace=namespace).get("status", {})
        for cond in status.get("conditions") or []:
            if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
                return str(cond["type"])
        return None

    outcome = cp.wait_for(finished, timeout=timeout, interval=1, what=f"Job {name} to finish")
    logs = nc.kubectl("logs", f"job/{name}", namespace=namespace, check=False).stdout
    return outcome, logs


@pytest.fixture
def namespace(node_cluster: NodeCluster) -> str:
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    cp: ControlPlane | None = node_cluster.control_plane
    assert cp is not None
    cp.api("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    cp.wait_for(lambda: cp.exists(f"/api/v1/namespaces/{name}/serviceaccounts/default"), timeout=30)
    return name


def test_node_is_ready_with_a_real_kubelet(node_cluster: NodeCluster) -> None:
    node = node_cluster.control_plane.kubectl_json("get", "node", NODE_NAME)  # type: ignore[union-attr]
    conditions = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert conditions["Ready"] == "True"
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"].startswith("v1.37.")
    assert info["containerRuntimeVersion"].startswith("containerd://")
    assert {"type": "InternalIP", "address": NODE_IP} in node["status"]["addresses"]
    # Cluster DNS answers for the API server's Service.
    assert dns_query_a(NODE_IP, "kubernetes.default.svc.cluster.local") == ["10.0.0.1"]


def test_trainer_image_runs_in_a_pod(node_cluster: NodeCluster, namespace: str) -> None:
    outcome, logs = run_job(node_cluster, namespace, node_cluster.images["trainer"],
                            ["python", "-m", "xstilts.trainer", "--help"])
    assert outcome == "Complete", logs
    assert "usage" in logs.lower()


def test_pod_resolves_services_and_reaches_the_api(xstilts_installed: NodeCluster, namespace: str) -> None:
    """From a pod: cluster DNS resolves Service names, kube-proxy routes ClusterIPs (the
    in-cluster MLflow server backed by PostgreSQL answers), and the API server is reachable
    through the ``kubernetes`` Service."""
    script = (
        "import socket, ssl, urllib.request\n"
        "print('mlflow', socket.gethostbyname('xstilts-mlflow.xstilts'))\n"
        "print('health', urllib.request.urlopen('http://xstilts-mlflow.xstilts:5000/health', timeout=10).read())\n"
        "ctx = ssl._create_unverified_context()\n"
        "print('api', urllib.request.urlopen('https://kubernetes.default.svc/version', context=ctx,"
        " timeout=10).read())\n"
    )
    outcome, logs = run_job(xstilts_installed, namespace, xstilts_installed.images["trainer"],
                            ["python", "-c", script])
    assert outcome == "Complete", logs
    service_ip = xstilts_installed.control_plane.kubectl_json(  # type: ignore[union-attr]
        "get", "service", "xstilts-mlflow", namespace="xstilts")["spec"]["clusterIP"]
    assert f"mlflow {service_ip}" in logs
    assert "health b'OK'" in logs
    assert '"gitVersion": "v1.37.2"' in logs  # /version is public: the API server answered


def test_controller_deployment_is_available(xstilts_installed: NodeCluster) -> None:
    dep = xstilts_installed.control_plane.kubectl_json(  # type: ignore[union-attr]
        "get", "deployment", "xstilts-controller", namespace="xstilts")
    conditions = {c["type"]: c["status"] for c in dep["status"]["conditions"]}
    assert conditions.get("Available") == "True"
    assert dep["status"].get("readyReplicas") == dep["spec"]["replicas"]
    # Its pods run the locally built image, on the real node.
    pods = xstilts_installed.control_plane.kubectl_json(  # type: ignore[union-attr]
        "get", "pods", "-l", "app.kubernetes.io/name=xstilts-controller", namespace="xstilts")["items"]
    assert pods and all(p["spec"]["nodeName"] == NODE_NAME for p in pods)
    assert all(p["spec"]["containers"][0]["image"] == "localhost/xstilts/controller:e2e" for p in pods)
