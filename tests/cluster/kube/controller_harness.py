"""Helpers for the controller's tests against the real control plane (see cluster.py):

- `install_crd`: the checked-in CRD, applied with kubectl, once per session;
- `controller_kubeconfig`: a kubeconfig for the `xstilts-controller` ServiceAccount bound to
  the Role of k8s/base/controller-rbac.yaml, so the controller runs with exactly the
  permissions it has in a cluster (a call the Role does not grant fails with 403);
- `ControllerProcess`: `python -m xstilts.operator.cli controller` as a subprocess, so that
  SIGKILL and SIGTERM are real;
- `ResultWriter`: stands in for the trainer, writing result.json for runs whose Job completed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from kube_cluster import ControlPlane
from xstilts.operator.cluster.controller import API_CALLS
from xstilts.operator.cluster.render import DEFAULT_RUNS_PVC, RUN_ID_LABEL, experiment_selector, pod_storage_root
from xstilts.operator.cluster.results import ResultStore
from xstilts.operator.cluster.runtime.prometheus import parse_exposition
from xstilts.operator.experiment.plan import Plan, plan
from xstilts.operator.experiment.spec import ExperimentSpec, parse_document
from xstilts.trainer.config import RunResult, Stage
from xstilts.trainer.tasks import TASKS

REPO = Path(__file__).resolve().parents[3]
CRD_FILE = REPO / "k8s" / "base" / "crd.yaml"
RBAC_FILE = REPO / "k8s" / "base" / "controller-rbac.yaml"
SERVICE_ACCOUNT = "xstilts-controller"

_crd_installed: set[str] = set()


def kubectl(cp: ControlPlane, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """cp.kubectl, failing with kubectl's own message."""
    try:
        return cp.kubectl(*args, **kwargs)
    except subprocess.CalledProcessError as e:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({e.returncode}): {e.stderr.strip()}") from None


def install_crd(cp: ControlPlane) -> None:
    """Apply k8s/base/crd.yaml (once per control plane), wait until it is Established, and
    restart the controller manager so that its garbage collector watches Experiments."""
    if str(cp.kubeconfig) in _crd_installed:
        return
    kubectl(cp, "apply", "-f", str(CRD_FILE))
    # Polled rather than `kubectl wait`, which fails outright while the CRD has no conditions yet.
    cp.wait_for(lambda: any(c.get("type") == "Established" and c.get("status") == "True" for c in (
        cp.api("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/experiments.xstilts.dev")
        .get("status") or {}).get("conditions") or []), timeout=60, what="the CRD Established")
    cp.restart_controller_manager()
    _crd_installed.add(str(cp.kubeconfig))


def controller_kubeconfig(cp: ControlPlane, namespace: str, path: Path) -> Path:
    """The Role, RoleBinding and ServiceAccount of k8s/base in `namespace`, and a kubeconfig
    that authenticates as that ServiceAccount (a TokenRequest token)."""
    documents = [d for d in yaml.safe_load_all(RBAC_FILE.read_text()) if d]
    for doc in documents:
        doc["metadata"]["namespace"] = namespace
        for subject in doc.get("subjects") or []:
            subject["namespace"] = namespace  # kustomize sets it in a real install
    kubectl(cp, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": documents}))
    token = kubectl(cp, "create", "token", SERVICE_ACCOUNT, "--duration=2h", namespace=namespace).stdout.strip()
    assert cp.ca_cert is not None and cp.server is not None
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": cp.server,
            "certificate-authority-data": base64.b64encode(cp.ca_cert.read_bytes()).decode()}}],
        "users": [{"name": SERVICE_ACCOUNT, "user": {"token": token}}],
        "contexts": [{"name": "controller", "context": {"cluster": "test", "user": SERVICE_ACCOUNT,
                                                        "namespace": namespace}}],
        "current-context": "controller",
    }
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def xstilts(*args: str, kubeconfig: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the xstilts CLI (as a user would, in a subprocess)."""
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["COLUMNS"] = "200"
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    return subprocess.run([sys.executable, "-m", "xstilts.operator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


class ControllerProcess:
    """`xstilts controller` in a subprocess, with fast lease timings for tests."""

    def __init__(self, kubeconfig: Path, namespace: str, results_dir: Path | None, log: Path, *,
                 identity: str = "controller-a", resync_seconds: float = 5.0, extra: Iterable[str] = ()):
        self.port = free_port()
        self.log = log
        results = [f"--results-dir={results_dir}"] if results_dir is not None else []
        self.args = [sys.executable, "-m", "xstilts.operator.cli", "controller", f"--kubeconfig={kubeconfig}",
                     f"--namespace={namespace}", *results, f"--health-port={self.port}",
                     f"--resync-seconds={resync_seconds}", f"--identity={identity}", "--lease-duration=3",
                     "--renew-deadline=2", "--retry-period=0.5", *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ControllerProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "XSTILTS_NAMESPACE")}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        return self

    def send(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: no cleanup, the Lease stays held until it expires."""
        self.stop(signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except (urllib.error.URLError, OSError):
            return 0, ""

    def metrics(self) -> dict[str, float]:
        code, text = self.get("/metrics")
        return parse_exposition(text) if code == 200 else {}

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def api_calls(self) -> set[tuple[str, str, str]]:
        """The (group, resource, verb) this controller has called, from its metrics."""
        calls = set()
        for series in self.metrics():
            if series.startswith("xstilts_api_requests_total{"):
                labels = dict(part.split("=", 1) for part in series[series.index("{") + 1:-1].split(","))
                group = labels["group"].strip('"')
                calls.add(("" if group == "core" else group, labels["resource"].strip('"'),
                           labels["verb"].strip('"')))
        return calls

    def assert_calls_declared(self) -> None:
        undeclared = self.api_calls() - API_CALLS
        assert not undeclared, f"API calls missing from controller.API_CALLS: {sorted(undeclared)}"

    def __enter__(self) -> ControllerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stop(timeout=15)
        if self.running:
            self.kill()


# --- experiments -------------------------------------------------------------------------


def small_experiment(name: str, namespace: str, *, seeds: Iterable[int] = (1, 2),
                     intermediates: Iterable[str] = ("mnli",), targets: Iterable[str] = ("xnli",),
                     max_parallel: int = 3, models: int = 1, ttl: int | None = None) -> dict[str, Any]:
    """An Experiment object: one-GPU runs, results on the runs volume (`runs_volume`; the
    controller reads them from --results-dir)."""
    cluster: dict[str, Any] = {"namespace": namespace, "maxParallel": max_parallel,
                               "storage": {"pvc": DEFAULT_RUNS_PVC, "mountPath": "/data"},
                               "image": "registry.invalid/trainer:test"}
    if ttl is not None:
        cluster["ttlSecondsAfterFinished"] = ttl
    return {
        "apiVersion": "xstilts.dev/v1alpha1", "kind": "Experiment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "name": name,
            "models": [{"name": f"m{i}", "pretrained": "FacebookAI/xlm-roberta-base",
                        "parameters": 278_000_000 * (i + 1),
                        "resources": {"gpus": 1, "cpu": "1", "memory": "1Gi"}} for i in range(models)],
            "intermediateTasks": list(intermediates),
            "targets": list(targets),
            "seeds": list(seeds),
            "cluster": cluster,
        },
    }


def planned(obj: dict[str, Any]) -> tuple[ExperimentSpec, Plan]:
    spec = parse_document(obj)
    return spec, plan(spec, storage_root=pod_storage_root(spec))


def get_experiment(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = cp.api("GET", f"/apis/xstilts.dev/v1alpha1/namespaces/{namespace}/experiments/{name}")
    return obj


def list_jobs(cp: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    selector = urllib.parse.quote(experiment_selector(name))
    items: list[dict[str, Any]] = cp.api("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs"
                                         f"?labelSelector={selector}")["items"]
    return items


def job_finished(job: dict[str, Any]) -> bool:
    return any(c.get("type") == "Complete" and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def job_active(job: dict[str, Any]) -> bool:
    conditions = {c.get("type") for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}
    return not conditions & {"Complete", "Failed", "SuccessCriteriaMet", "FailureTarget"}


class ResultWriter:
    """Writes the result.json a run's trainer would have written, for every run whose Job
    has completed, where the controller reads it (--results-dir). Target scores are made
    up: 0.70 for the baseline, 0.73 with an intermediate task, +0.001 per seed."""

    def __init__(self, cp: ControlPlane, obj: dict[str, Any], results_dir: Path):
        self.cp = cp
        self.namespace = obj["metadata"]["namespace"]
        self.name = obj["metadata"]["name"]
        self.spec, self.plan = planned(obj)
        self.store = ResultStore(results_dir)
        self.written_at: dict[str, float] = {}  # run id -> time.time() of writing

    def write(self, run_id: str) -> None:
        run = self.plan.by_id[run_id]
        config = run.config
        languages: dict[str, dict[str, float]] = {}
        metrics = {"train.loss": 0.5}
        if config.stage is Stage.TARGET:
            task = TASKS[config.tasks[0]]
            score = (0.70 if run.labels.intermediate == "baseline" else 0.73) + config.seed / 1000
            for lang in config.eval_languages or task.languages:
                languages[lang] = {"accuracy": score}
            metrics[f"{task.name}.test.accuracy.avg"] = score
        result = RunResult(run_id=run_id, config=config, metrics=metrics, languages=languages,
                           parameter_count=run.labels.model_parameters or 1, tokens_seen=1000, train_steps=10,
                           wall_seconds=60.0, tokens_per_second=100.0, finished_at=datetime.now(UTC).isoformat())
        path = self.store.path(self.spec, run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(result.model_dump_json())
        tmp.rename(path)  # atomic, as the trainer writes it
        self.written_at[run_id] = time.time()

    def write_finished(self, jobs: list[dict[str, Any]] | None = None) -> list[str]:
        """Results for the runs whose Jobs completed since the last call."""
        jobs = list_jobs(self.cp, self.namespace, self.name) if jobs is None else jobs
        new = []
        for job in jobs:
            run_id = job["metadata"]["labels"][RUN_ID_LABEL]
            if job_finished(job) and run_id not in self.written_at:
                self.write(run_id)
                new.append(run_id)
        return new


@dataclass
class Env:
    cp: ControlPlane
    namespace: str
    kubeconfig: Path  # the controller's ServiceAccount
    results: Path
    tmp: Path

    def controller(self, identity: str = "controller-a", *, kubeconfig: Path | None = None,
                   **kwargs: Any) -> ControllerProcess:
        """A controller as the ServiceAccount; `kubeconfig` to reach the API another way
        (through a faulty_api.FaultyAPI)."""
        return ControllerProcess(kubeconfig or self.kubeconfig, self.namespace, self.results,
                                 self.tmp / f"{identity}.log", identity=identity, **kwargs)

    def apply(self, obj: dict[str, Any]) -> str:
        path = self.tmp / f"{obj['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(obj, sort_keys=False))
        return kubectl(self.cp, "apply", "-f", str(path), namespace=self.namespace).stdout

    def xstilts(self, *args: str) -> Any:
        """The CLI as the cluster admin (the test's kubeconfig)."""
        return xstilts(*args, kubeconfig=self.cp.kubeconfig)


def runs_volume(cp: ControlPlane, namespace: str) -> None:
    """The PVC DEFAULT_RUNS_PVC in `namespace`, bound to a PersistentVolume of its own: the
    scheduler places no pod whose claim is missing or unbound. kwok runs no container, so
    the volume's hostPath is never used; results go to the Env's `results` directory."""
    volume = f"runs-{namespace}"
    cp.api("POST", "/api/v1/persistentvolumes", {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": volume},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                 "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": f"/tmp/{volume}"},
                 "claimRef": {"namespace": namespace, "name": DEFAULT_RUNS_PVC}}})
    cp.api("POST", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims", {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": DEFAULT_RUNS_PVC},
        "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": volume,
                 "resources": {"requests": {"storage": "1Gi"}}}})
    cp.wait_for(lambda: (cp.api("GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{DEFAULT_RUNS_PVC}")
                         .get("status") or {}).get("phase") == "Bound", timeout=60, what="the runs PVC bound")


def make_env(control_plane: ControlPlane, k8s_namespace: str, tmp_path: Path) -> Env:
    """A test's namespace with the CRD installed, the controller's RBAC and kubeconfig, and a
    bound runs PVC."""
    install_crd(control_plane)
    kubeconfig = controller_kubeconfig(control_plane, k8s_namespace, tmp_path / "controller.kubeconfig")
    runs_volume(control_plane, k8s_namespace)
    results = tmp_path / "results"
    results.mkdir()
    return Env(control_plane, k8s_namespace, kubeconfig, results, tmp_path)


def converge(env: Env, writer: ResultWriter, controllers: list[ControllerProcess], *, max_parallel: int,
             timeout: float = 180.0, until: str = "Succeeded", interval: float = 0.3) -> dict[str, Any]:
    """Play the trainers (write results of completed Jobs) until the Experiment reaches
    `until`; check on the way that no more than max_parallel Jobs are ever active."""
    deadline = time.monotonic() + timeout
    most_active = 0
    while True:
        jobs = list_jobs(env.cp, writer.namespace, writer.name)
        active = sum(1 for j in jobs if job_active(j))
        most_active = max(most_active, active)
        assert active <= max_parallel, f"{active} Jobs active, maxParallel is {max_parallel}"
        writer.write_finished(jobs)
        experiment = get_experiment(env.cp, writer.namespace, writer.name)
        if (experiment.get("status") or {}).get("phase") == until:
            return experiment
        if not any(c.running for c in controllers):
            raise AssertionError("the controller exited:\n" + "\n".join(c.output()[-3000:] for c in controllers))
        if time.monotonic() > deadline:
            status = json.dumps(experiment.get("status"))[:2000]
            raise AssertionError(f"not {until} after {timeout}s; status: {status}\n"
                                 + "\n".join(c.output()[-3000:] for c in controllers))
        time.sleep(interval)


def created_events(env: Env) -> Counter[str]:
    """JobCreated Events per Job name, counting repeats (an Event's count)."""
    counts: Counter[str] = Counter()
    for event in events(env.cp, env.namespace, "JobCreated"):
        job = event["message"].split()[2]  # "created Job <name> for run ..."
        counts[job] += int(event.get("count") or 1)
    return counts


def events(cp: ControlPlane, namespace: str, reason: str | None = None) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cp.api("GET", f"/api/v1/namespaces/{namespace}/events")["items"]
    return [e for e in items if reason is None or e.get("reason") == reason]


def parse_time(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
