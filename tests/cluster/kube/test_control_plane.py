"""Smoke tests of the real control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler) with kwok nodes."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from kube_cluster import DISRUPTION_ANNOTATION, EXIT_CODE_ANNOTATION, ControlPlane

pytestmark = pytest.mark.k8s

CRD_GROUP = "smoke.xstilts.dev"
CRD = textwrap.dedent(
    f"""\
    apiVersion: apiextensions.k8s.io/v1
    kind: CustomResourceDefinition
    metadata:
      name: widgets.{CRD_GROUP}
    spec:
      group: {CRD_GROUP}
      scope: Namespaced
      names: {{plural: widgets, singular: widget, kind: Widget, shortNames: [wdg]}}
      versions:
      - name: v1
        served: true
        storage: true
        subresources: {{status: {{}}}}
        additionalPrinterColumns:
        - {{name: Size, type: integer, jsonPath: .spec.size}}
        - {{name: Colour, type: string, jsonPath: .spec.colour}}
        - {{name: Age, type: date, jsonPath: .metadata.creationTimestamp}}
        schema:
          openAPIV3Schema:
            type: object
            properties:
              spec:
                type: object
                required: [size]
                properties:
                  size: {{type: integer, minimum: 1}}
                  colour: {{type: string, enum: [red, green, blue]}}
              status:
                type: object
                x-kubernetes-preserve-unknown-fields: true
    """
)


def job_manifest(
    name: str,
    *,
    annotations: dict[str, str] | None = None,
    owner: dict[str, Any] | None = None,
    **spec: object,
) -> str:
    """A one-pod, one-GPU Job as kubectl input (JSON)."""
    metadata: dict[str, Any] = {"name": name}
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": 0,
            **spec,
            "template": {
                "metadata": {"annotations": annotations or {}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "registry.invalid/xstilts-trainer:test",
                            "command": ["python", "-m", "xstilts.trainer", "/config/run.json"],
                            "resources": {"limits": {"nvidia.com/gpu": 1, "cpu": "1", "memory": "1Gi"}},
                        }
                    ],
                },
            },
        },
    }
    return json.dumps(job)


@pytest.fixture(scope="module")
def widget_crd(control_plane: ControlPlane) -> Iterator[str]:
    control_plane.kubectl("apply", "-f", "-", input=CRD)
    control_plane.kubectl("wait", "--for=condition=Established", f"crd/widgets.{CRD_GROUP}", "--timeout=30s")
    # Let the garbage collector watch Widgets now rather than at its next
    # 30-second discovery resync.
    control_plane.restart_controller_manager()
    yield f"widgets.{CRD_GROUP}"
    control_plane.kubectl("delete", "crd", f"widgets.{CRD_GROUP}", "--wait=false", check=False)


def test_api_server_answers(control_plane: ControlPlane) -> None:
    assert control_plane.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    version = control_plane.kubectl_json("version")
    assert version["serverVersion"]["gitVersion"].startswith("v1.")
    nodes = control_plane.kubectl_json("get", "nodes")["items"]
    assert len(nodes) == 2
    for node in nodes:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True"


def test_job_runs_to_completion(control_plane: ControlPlane, k8s_namespace: str) -> None:
    ns = k8s_namespace
    control_plane.kubectl("apply", "-f", "-", input=job_manifest("ok"), namespace=ns)
    control_plane.kubectl("wait", "--for=condition=Complete", "job/ok", "--timeout=60s", namespace=ns)
    job = control_plane.kubectl_json("get", "job", "ok", namespace=ns)
    assert job["status"]["succeeded"] == 1
    (pod,) = control_plane.kubectl_json("get", "pods", "-l", "job-name=ok", namespace=ns)["items"]
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["spec"]["nodeName"].startswith("kwok-gpu-")
    (status,) = pod["status"]["containerStatuses"]
    assert status["state"]["terminated"]["exitCode"] == 0


def test_pod_exit_code_fails_job_by_pod_failure_policy(control_plane: ControlPlane, k8s_namespace: str) -> None:
    ns = k8s_namespace
    policy = {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [3]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]
    }
    manifest = job_manifest("bad-config", annotations={EXIT_CODE_ANNOTATION: "3"}, podFailurePolicy=policy)
    control_plane.kubectl("apply", "-f", "-", input=manifest, namespace=ns)
    control_plane.kubectl("wait", "--for=condition=Failed", "job/bad-config", "--timeout=60s", namespace=ns)
    job = control_plane.kubectl_json("get", "job", "bad-config", namespace=ns)
    failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PodFailurePolicy"
    (pod,) = control_plane.kubectl_json("get", "pods", "-l", "job-name=bad-config", namespace=ns)["items"]
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def test_disrupted_pod_has_disruption_target(control_plane: ControlPlane, k8s_namespace: str) -> None:
    ns = k8s_namespace
    pod = textwrap.dedent(
        f"""\
        apiVersion: v1
        kind: Pod
        metadata:
          name: preempted
          annotations: {{"{DISRUPTION_ANNOTATION}": "true"}}
        spec:
          restartPolicy: Never
          containers: [{{name: c, image: registry.invalid/x:1}}]
        """
    )
    control_plane.kubectl("apply", "-f", "-", input=pod, namespace=ns)
    control_plane.kubectl(
        "wait", "--for=jsonpath={.status.phase}=Failed", "pod/preempted", "--timeout=60s", namespace=ns
    )
    got = control_plane.kubectl_json("get", "pod", "preempted", namespace=ns)
    conditions = {c["type"]: c["status"] for c in got["status"]["conditions"]}
    assert conditions["DisruptionTarget"] == "True"


def test_custom_resource_with_printer_columns(control_plane: ControlPlane, widget_crd: str, k8s_namespace: str) -> None:
    ns = k8s_namespace
    obj = f"""\
apiVersion: {CRD_GROUP}/v1
kind: Widget
metadata: {{name: w1}}
spec: {{size: 7, colour: green}}
"""
    control_plane.kubectl("apply", "-f", "-", input=obj, namespace=ns)
    out = control_plane.kubectl("get", "widgets", namespace=ns).stdout.splitlines()
    assert out[0].split() == ["NAME", "SIZE", "COLOUR", "AGE"]
    assert out[1].split()[:3] == ["w1", "7", "green"]
    # The CRD's schema is enforced at admission.
    bad = obj.replace("size: 7", "size: 0")
    proc = control_plane.kubectl("apply", "-f", "-", input=bad.replace("w1", "w2"), namespace=ns, check=False)
    assert proc.returncode != 0
    assert "spec.size" in proc.stderr


def test_deleting_owner_garbage_collects_owned_job(
    control_plane: ControlPlane, widget_crd: str, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    widget = f"apiVersion: {CRD_GROUP}/v1\nkind: Widget\nmetadata: {{name: owner}}\nspec: {{size: 1}}\n"
    control_plane.kubectl("apply", "-f", "-", input=widget, namespace=ns)
    owner = control_plane.kubectl_json("get", "widget", "owner", namespace=ns)
    ref = {
        "apiVersion": f"{CRD_GROUP}/v1",
        "kind": "Widget",
        "name": "owner",
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    control_plane.kubectl("apply", "-f", "-", input=job_manifest("owned", owner=ref), namespace=ns)
    control_plane.kubectl("wait", "--for=condition=Complete", "job/owned", "--timeout=60s", namespace=ns)
    control_plane.kubectl("delete", "widget", "owner", "--timeout=30s", namespace=ns)
    control_plane.wait_for(
        lambda: not control_plane.exists(f"/apis/batch/v1/namespaces/{ns}/jobs/owned"),
        timeout=60,
        what="garbage collection of the owned Job",
    )
    control_plane.wait_for(
        lambda: not control_plane.api("GET", f"/api/v1/namespaces/{ns}/pods")["items"],
        timeout=30,
        what="garbage collection of the Job's pods",
    )
