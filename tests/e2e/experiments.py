"""Experiments on the one-node cluster (tests/e2e): a tiny demo world staged on the runs
volume, small Experiment objects for it, and a view of one applied Experiment (its Jobs,
pods, phase, the CLI against it), each step timed."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from node_cluster import HOST_DATA, NodeCluster

NAMESPACE = "xstilts"
RUNS_HOST_DIR = HOST_DATA / "runs"  # the hostPath behind the xstilts-runs PVC (k8s/overlays/test)
MOUNT_PATH = "/data"
TRAINER_UID = 1000  # the trainer image's user (Dockerfile), owner of the runs volume
WORLD = "e2e-world"  # the staged data and model, under the runs volume
CLI = [sys.executable, "-m", "xstilts.operator.cli"]

T = TypeVar("T")


def experiment_object(name: str, seeds: list[int], intermediate: tuple[str, ...] = ("mnli",),
                      target: dict[str, Any] | None = None, data: dict[str, str] | None = None,
                      **cluster: Any) -> dict[str, Any]:
    """A small Experiment for the one-node cluster: CPU only, requests that let two runs
    share the 2-core node with the controller and MLflow, the locally built trainer image.
    ``target`` overrides the target stage's hyperparameters, ``data`` the task directories."""
    world = f"{MOUNT_PATH}/{WORLD}"
    hyper = {"learningRate": 3.0e-3, "batchSize": 32, "epochs": 1, "maxSeqLength": 32}
    return {
        "apiVersion": "xstilts.dev/v1alpha1",
        "kind": "Experiment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "name": name,
            "models": [{"name": "tiny", "pretrained": f"{world}/models/tiny", "parameters": 63000,
                        "resources": {"gpus": 0, "cpu": "500m", "memory": "1536Mi"}}],
            "intermediateTasks": list(intermediate),
            "targets": ["xnli"],
            "seeds": seeds,
            "data": {**{t: f"{world}/data/{t}" for t in (*intermediate, "xnli")}, **(data or {})},
            "hyperparameters": {"intermediate": hyper, "target": {**hyper, **(target or {})}},
            "cluster": {"namespace": NAMESPACE, "image": "localhost/xstilts/trainer:e2e",
                        "storage": {"pvc": "xstilts-runs", "mountPath": MOUNT_PATH},
                        "maxParallel": 2, **cluster},
        },
    }


def stage_world(root: Path) -> None:
    """The demo world's xnli and mnli data (small) and one random-weight tiny model, owned by
    the trainer's uid. Random weights: the plumbing is under test, not what the model learns."""
    from xstilts.demo.generate import DataSizes, write_task_data
    from xstilts.demo.pretrain import MODEL_SIZES, save_random_model
    from xstilts.demo.world import World

    world = World.build(0)
    sizes = DataSizes(xnli_train=200, pawsx_train=1, target_eval=20, target_test=20, mnli_train=300, hellaswag_train=1,
                      intermediate_eval=40)
    write_task_data(world, root / "data", sizes)
    save_random_model(MODEL_SIZES[0], world, root / "models" / "tiny")
    for dirpath, _, filenames in os.walk(root):
        os.chown(dirpath, TRAINER_UID, TRAINER_UID)
        for f in filenames:
            os.chown(os.path.join(dirpath, f), TRAINER_UID, TRAINER_UID)


def wait(predicate: Callable[[], T | None], timeout: float, what: str, on_timeout: Callable[[], str] = str,
         interval: float = 2.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")
        time.sleep(interval)


@dataclass
class Scenario:
    nc: NodeCluster
    name: str
    spec_path: Path  # the bare spec, for the CLI commands that take one
    timings: dict[str, float] = field(default_factory=dict)

    def step(self, what: str, t0: float) -> None:
        self.timings[what] = round(time.monotonic() - t0, 1)
        print(f"\n  scenario: {what} {self.timings[what]}s", file=sys.stderr, flush=True)

    def json(self, *args: str) -> Any:
        return self.nc.control_plane.kubectl_json(*args, namespace=NAMESPACE)  # type: ignore[union-attr]

    def jobs(self, name: str | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.json("get", "jobs", "-l", f"xstilts.dev/experiment={name or self.name}")[
            "items"]
        return items

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(self.nc.control_plane.kubeconfig)}  # type: ignore[union-attr]
        return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)

    def diagnostics(self) -> str:
        out = [self.nc.kubectl(*a, namespace=NAMESPACE, check=False).stdout
               for a in (("get", "experiments,jobs,pods", "-o", "wide"),
                         ("get", "events", "--sort-by=.lastTimestamp"))]
        logs = self.nc.kubectl("logs", "deployment/xstilts-controller", "--tail=40", namespace=NAMESPACE,
                               check=False)
        return "\n".join(out)[-5000:] + "\ncontroller:\n" + logs.stdout[-3000:] + logs.stderr[-500:]

    def phase(self, name: str | None = None) -> str:
        status = self.json("get", "experiment", name or self.name).get("status") or {}
        return str(status.get("phase", ""))

    def wait_phase(self, wanted: set[str], timeout: float, name: str | None = None) -> str:
        return wait(lambda: (p if (p := self.phase(name)) in wanted else None), timeout,
                    f"experiment {name or self.name} to reach {wanted}", self.diagnostics)

    def wait_jobs_complete(self, timeout: float = 60) -> list[dict[str, Any]]:
        """The Experiment's Jobs once all are Complete. The controller sees a run's result.json
        as soon as it is written, so an Experiment can be Succeeded a little before the Job
        controller marks the last Jobs Complete (their pods have yet to exit)."""
        def complete(j: dict[str, Any]) -> bool:
            return any(c["type"] == "Complete" and c["status"] == "True" for c in j["status"].get("conditions") or [])

        def all_complete() -> list[dict[str, Any]] | None:
            jobs = self.jobs()
            return jobs if jobs and all(complete(j) for j in jobs) else None

        return wait(all_complete, timeout, f"every Job of {self.name} to complete", self.diagnostics, interval=1)

    @contextlib.contextmanager
    def mlflow_port_forward(self) -> Iterator[str]:
        """The in-cluster MLflow server as k8s/README.md tells users to reach it: `kubectl
        port-forward` to its Service (its allowed-hosts check refuses other addresses, the
        Service's ClusterIP included); yields the local tracking URI."""
        cp = self.nc.control_plane
        assert cp is not None and cp._kubectl is not None
        proc = subprocess.Popen([cp._kubectl, f"--kubeconfig={cp.kubeconfig}", "-n", NAMESPACE, "port-forward",
                                 "service/xstilts-mlflow", ":5000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 5000"
            match = re.search(r"127\.0\.0\.1:(\d+)", line)
            assert match, f"kubectl port-forward: {line}{proc.stdout.read() if proc.poll() is not None else ''}"
            yield f"http://127.0.0.1:{match.group(1)}"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def apply(nc: NodeCluster, obj: dict[str, Any]) -> None:
    nc.kubectl("apply", "-f", "-", input=yaml.safe_dump(obj))
