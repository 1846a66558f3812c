"""Faults on real pods, in the one-node cluster of the scenario (``staged``): a trainer pod
deleted mid-training resumes from its checkpoint to the same end; a run that exits as invalid
fails its Job at once through podFailurePolicy; the leader controller killed, the other
replica takes the Lease and no Job is created twice; kube-apiserver restarted while Jobs are
created, the Experiment converges with no duplicate."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from experiments import NAMESPACE, RUNS_HOST_DIR, Scenario, apply, experiment_object, wait
from node_cluster import NodeCluster

pytestmark = [pytest.mark.slow, pytest.mark.k8s]

INVALID = 42  # trainer ExitCode.INVALID


def _result(name: str) -> dict[str, Any]:
    (path,) = (RUNS_HOST_DIR / name / "runs").glob("*/result.json")
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def _pods(s: Scenario, selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = s.json("get", "pods", "-l", selector)["items"]
    return items


def test_a_deleted_trainer_pod_resumes_from_its_checkpoint_to_the_same_end(staged: NodeCluster) -> None:
    """Two experiments plan the same run (baseline × xnli, seed 1); one's pod is deleted
    mid-training. It gets SIGTERM and its grace period, saves a checkpoint and exits
    INTERRUPTED; the Job's next pod resumes from that checkpoint, and the result equals the
    uninterrupted run's."""
    t0 = time.monotonic()
    target = {"batchSize": 8, "epochs": 4}  # 100 steps: time to interrupt it mid-training
    s = Scenario(staged, "resume", Path("-"))
    apply(staged, experiment_object("resume", [1], intermediate=(), target=target))
    apply(staged, experiment_object("straight", [1], intermediate=(), target=target))
    (job,) = wait(lambda: s.jobs(), 60, "the resume Job", s.diagnostics, interval=0.5)
    job_name, run_id = job["metadata"]["name"], job["metadata"]["labels"]["xstilts.dev/run-id"]
    progress = RUNS_HOST_DIR / "resume" / "runs" / run_id / "progress.json"

    def training_step() -> int | None:
        try:
            p = json.loads(progress.read_text())
        except (OSError, ValueError):
            return None
        return int(p["step"]) if p.get("phase") == "train" and 3 <= p["step"] < p["total_steps"] // 2 else None

    step = wait(training_step, 300, "the run to train a few steps", s.diagnostics, interval=0.5)
    (pod,) = [p for p in _pods(s, f"batch.kubernetes.io/job-name={job_name}") if p["status"]["phase"] == "Running"]
    assert pod["spec"]["terminationGracePeriodSeconds"] == 300
    s.step(f"trainer at step {step}", t0)
    staged.kubectl("delete", "pod", pod["metadata"]["name"], "--wait=true", "--timeout=120s", namespace=NAMESPACE,
                   timeout=150)
    s.step("pod deleted (SIGTERM, checkpoint, exit)", t0)
    checkpoints = sorted(int(p.name.split("-")[1]) for p in
                         (RUNS_HOST_DIR / "resume" / "runs" / run_id / "resume").glob("checkpoint-*"))
    assert checkpoints and checkpoints[-1] >= step, f"no checkpoint saved on SIGTERM at step {step}: {checkpoints}"
    # The pod's exit counts as one failure (INTERRUPTED: Count), and the Job starts another.
    failed = wait(lambda: s.json("get", "job", job_name)["status"].get("failed"), 60, "the Job to count the pod")
    assert failed == 1
    s.wait_phase({"Succeeded", "Failed"}, 600)
    s.wait_phase({"Succeeded", "Failed"}, 600, name="straight")
    s.step("both experiments finished", t0)
    assert s.phase() == "Succeeded" and s.phase("straight") == "Succeeded", s.diagnostics()
    logs = staged.kubectl("logs", f"job/{job_name}", namespace=NAMESPACE).stdout
    assert f"resuming from /data/resume/runs/{run_id}/resume/checkpoint-{checkpoints[-1]}" in logs, logs[-3000:]
    resumed, straight = _result("resume"), _result("straight")
    assert resumed["train_steps"] == straight["train_steps"] and resumed["tokens_seen"] == straight["tokens_seen"]
    assert resumed["metrics"] == straight["metrics"]
    assert resumed["languages"] == straight["languages"]
    print(f"\n  resume: {s.timings}", file=sys.stderr)


def test_an_invalid_run_fails_its_job_at_once_without_retries(staged: NodeCluster) -> None:
    """A run whose data cannot exist exits INVALID (42); podFailurePolicy fails the Job on
    that first pod (backoffLimit unused), and the Experiment reports the run failed."""
    t0 = time.monotonic()
    s = Scenario(staged, "invalid", Path("-"))
    apply(staged, experiment_object("invalid", [1], intermediate=(), data={"xnli": "/data/e2e-world/data/none"}))
    (job,) = wait(lambda: s.jobs(), 60, "the Job", s.diagnostics, interval=0.5)
    job_name = job["metadata"]["name"]

    def failed_condition() -> dict[str, Any] | None:
        conditions = s.json("get", "job", job_name)["status"].get("conditions") or []
        return next((c for c in conditions if c["type"] == "Failed" and c["status"] == "True"), None)

    condition = wait(failed_condition, 180, f"Job {job_name} to fail", s.diagnostics, interval=1)
    s.step("invalid run's Job failed", t0)
    assert condition["reason"] == "PodFailurePolicy", condition
    assert s.json("get", "job", job_name)["status"].get("failed") == 1  # one pod, no retry
    (pod,) = _pods(s, f"batch.kubernetes.io/job-name={job_name}")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == INVALID
    logs = staged.kubectl("logs", pod["metadata"]["name"], namespace=NAMESPACE).stdout
    assert "missing data file" in logs, logs[-2000:]
    assert s.wait_phase({"Failed"}, 60) == "Failed"
    status = s.json("get", "experiment", "invalid")["status"]
    assert status["counts"]["failed"] == 1, status


def test_the_leader_killed_the_other_replica_takes_over_without_duplicate_jobs(staged: NodeCluster) -> None:
    """Two controller replicas; the Lease holder's pod is killed while an Experiment's Jobs
    are being created. The other replica takes the Lease, the Experiment finishes, and each
    run has had exactly one Job (the same object from start to end)."""
    t0 = time.monotonic()
    s = Scenario(staged, "leader", Path("-"))
    staged.kubectl("scale", "deployment/xstilts-controller", "--replicas=2", namespace=NAMESPACE)
    staged.kubectl("rollout", "status", "deployment/xstilts-controller", "--timeout=180s", namespace=NAMESPACE,
                   timeout=200)
    s.step("two controller replicas ready", t0)

    def holder() -> str:
        return str(s.json("get", "lease", "xstilts-controller")["spec"].get("holderIdentity") or "")

    leader = wait(holder, 60, "a Lease holder")
    pods = {p["metadata"]["name"] for p in _pods(s, "app.kubernetes.io/name=xstilts-controller")}
    assert leader in pods or any(leader.startswith(p) for p in pods), (leader, pods)
    leader_pod = next(p for p in pods if leader.startswith(p))
    apply(staged, experiment_object("leader", [1]))
    wait(lambda: s.jobs(), 60, "the first Jobs", s.diagnostics, interval=0.2)
    uids = {j["metadata"]["name"]: j["metadata"]["uid"] for j in s.jobs()}
    staged.kubectl("delete", "pod", leader_pod, "--grace-period=0", "--force", namespace=NAMESPACE, check=False)
    s.step("leader killed", t0)
    new_leader = wait(lambda: (h if (h := holder()) and not h.startswith(leader_pod) else None), 120,
                      "another replica to take the Lease", s.diagnostics, interval=1)
    s.step(f"Lease taken by {new_leader}", t0)
    s.wait_phase({"Succeeded", "Failed"}, 900)
    s.step("experiment finished", t0)
    assert s.phase() == "Succeeded", s.diagnostics()
    assert_one_job_per_run(s.wait_jobs_complete(), uids, runs=3)
    print(f"\n  leader: {s.timings}", file=sys.stderr)


def test_the_api_server_restarted_while_jobs_are_created_the_experiment_converges(staged: NodeCluster) -> None:
    """kube-apiserver stopped and started (etcd stays) right after the controller created an
    Experiment's first Jobs: the controller, kubelet and Job controller reconnect, the
    Experiment succeeds, and each run has exactly one Job that never failed."""
    t0 = time.monotonic()
    cp = staged.control_plane
    assert cp is not None
    s = Scenario(staged, "restart", Path("-"))
    apply(staged, experiment_object("restart", [1]))
    wait(lambda: s.jobs(), 60, "the first Jobs", s.diagnostics, interval=0.2)
    uids = {j["metadata"]["name"]: j["metadata"]["uid"] for j in s.jobs()}
    cp.restart("kube-apiserver", timeout=120)
    s.step("kube-apiserver restarted", t0)
    s.wait_phase({"Succeeded", "Failed"}, 900)
    s.step("experiment finished", t0)
    assert s.phase() == "Succeeded", s.diagnostics()
    assert_one_job_per_run(s.wait_jobs_complete(), uids, runs=3)
    print(f"\n  apiserver restart: {s.timings}", file=sys.stderr)


def assert_one_job_per_run(jobs: list[dict[str, Any]], uids_before: dict[str, str], runs: int) -> None:
    """Each run has one Job; the Jobs that existed before the fault are the same objects (same
    uid), and none was recreated: each ran its pod once, and none failed."""
    run_ids = [j["metadata"]["labels"]["xstilts.dev/run-id"] for j in jobs]
    assert len(run_ids) == len(set(run_ids)) == runs, run_ids
    for j in jobs:
        assert uids_before.get(j["metadata"]["name"], j["metadata"]["uid"]) == j["metadata"]["uid"]
        assert j["status"].get("succeeded") == 1 and not j["status"].get("failed"), j["status"]
