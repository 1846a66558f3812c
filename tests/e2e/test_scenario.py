"""The cluster path end to end, on real pods: a tiny demo world staged on the runs volume,
an Experiment applied with ``kubectl apply -f``, the controller's Jobs running the trainer
image, results on the runs volume and in the in-cluster MLflow server, and the report from
either source giving the same gains.

One small Experiment (1 model × {baseline, mnli} × xnli × 2 seeds: 2 phase-2 runs, 4 phase-3
runs) runs once per session (``scenario``); each test checks one seam of it. Each step's
time is printed (``pytest -s``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from experiments import NAMESPACE, RUNS_HOST_DIR, Scenario, apply, experiment_object, wait
from node_cluster import NodeCluster

pytestmark = [pytest.mark.slow, pytest.mark.k8s]


@pytest.fixture(scope="session")
def scenario(staged: NodeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """The Experiment applied and run to Succeeded."""
    obj = experiment_object("e2e", [1, 2])
    spec_path = tmp_path_factory.mktemp("scenario") / "e2e.yaml"
    spec_path.write_text(yaml.safe_dump(obj["spec"]))
    s = Scenario(staged, "e2e", spec_path)
    t0 = time.monotonic()
    apply(staged, obj)
    wait(lambda: s.jobs(), 60, "the controller to create Jobs", s.diagnostics, interval=0.5)
    s.step("first Job created", t0)
    wait(lambda: any(p["status"].get("phase") == "Running" for p in s.json(
        "get", "pods", "-l", "xstilts.dev/experiment=e2e")["items"]), 180, "a trainer pod to run", s.diagnostics)
    s.step("first trainer pod running", t0)
    s.wait_phase({"Succeeded", "Failed"}, 900)
    s.step("experiment finished", t0)
    yield s


def test_experiment_succeeds_with_phase_3_after_phase_2(scenario: Scenario) -> None:
    assert scenario.phase() == "Succeeded", scenario.diagnostics()
    jobs = scenario.jobs()
    labels = [j["metadata"]["labels"] for j in jobs]
    assert len(jobs) == 6, labels  # 2 mnli runs + (baseline, mnli) x 2 seeds on xnli

    jobs = scenario.wait_jobs_complete()
    # Phase 3 after phase 2: every run that fine-tunes from an mnli checkpoint was created
    # after that checkpoint's Job completed (RFC 3339 timestamps sort as text).
    intermediate = [j for j in jobs if j["metadata"]["labels"]["xstilts.dev/stage"] == "intermediate"]
    from_mnli = [j for j in jobs if j["metadata"]["labels"]["xstilts.dev/stage"] == "target"
                 and j["metadata"]["labels"]["xstilts.dev/intermediate"] == "mnli"]
    assert len(intermediate) == 2 and len(from_mnli) == 2, [j["metadata"]["labels"] for j in jobs]
    last_phase_2 = max(j["status"]["completionTime"] for j in intermediate)
    assert all(j["metadata"]["creationTimestamp"] >= last_phase_2 for j in from_mnli), (
        last_phase_2, [j["metadata"]["creationTimestamp"] for j in from_mnli])
    # Results were written by real pods onto the runs volume.
    results = sorted((RUNS_HOST_DIR / "e2e" / "runs").glob("*/result.json"))
    assert len(results) == 6
    print(f"\n  scenario timings: {scenario.timings}", file=sys.stderr)


def test_kubectl_get_experiments_shows_the_printer_columns(scenario: Scenario) -> None:
    out = scenario.nc.kubectl("get", "experiments", namespace=NAMESPACE).stdout
    header, row = out.splitlines()[0].split(), next(ln for ln in out.splitlines() if ln.startswith("e2e ")).split()
    assert header[:7] == ["NAME", "PHASE", "RUNS", "SUCCEEDED", "RUNNING", "FAILED", "GPU-H"], out
    assert row[:6] == ["e2e", "Succeeded", "6", "6", "0", "0"], out


def test_status_and_logs_work_against_the_cluster(scenario: Scenario) -> None:
    t0 = time.monotonic()
    status = scenario.cli("status", "e2e", "-n", NAMESPACE, "-o", "json")
    assert status.returncode == 0, status.stderr
    view = json.loads(status.stdout)
    text = json.dumps(view)
    assert "Succeeded" in text, view
    run_id = next(j["metadata"]["labels"]["xstilts.dev/run-id"] for j in scenario.jobs()
                  if j["metadata"]["labels"]["xstilts.dev/intermediate"] == "mnli")
    assert run_id in text
    table = scenario.cli("status", "e2e", "-n", NAMESPACE)
    assert table.returncode == 0 and "6/6 runs succeeded" in table.stdout, table.stdout + table.stderr
    logs = scenario.cli("logs", "e2e", run_id[:12], "-n", NAMESPACE)
    assert logs.returncode == 0, logs.stderr
    assert "tokenizing mnli/train" in logs.stdout and "eval_accuracy" in logs.stdout, logs.stdout[-2000:]
    scenario.step("status and logs", t0)


def test_every_run_is_in_mlflow_and_the_reports_agree(scenario: Scenario, tmp_path: Path) -> None:
    """Each run logged to the in-cluster MLflow server (the controller's default, no
    trackingUri in the spec); the report from MLflow has the same gains as the report from
    the result files on the runs volume."""
    t0 = time.monotonic()
    with scenario.mlflow_port_forward() as uri:
        from_files = scenario.cli("report", str(scenario.spec_path), "--output-dir", str(RUNS_HOST_DIR / "e2e"),
                                  "--format", "json", "--tracking-uri", uri)
        assert from_files.returncode == 0, from_files.stdout[-2000:] + from_files.stderr[-2000:]
        from_mlflow = scenario.cli("report", str(scenario.spec_path), "--output-dir", str(tmp_path),
                                   "--format", "json", "--from-mlflow", "--tracking-uri", uri)
        assert from_mlflow.returncode == 0, from_mlflow.stdout[-2000:] + from_mlflow.stderr[-2000:]
        assert "warning" not in from_mlflow.stderr, from_mlflow.stderr  # every run found in MLflow
    files_report = json.loads((RUNS_HOST_DIR / "e2e" / "report" / "report.json").read_text())
    mlflow_report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert files_report["missing"] == [] and files_report["gains"], files_report
    assert mlflow_report["missing"] == []  # every run is in MLflow
    assert mlflow_report["gains"] == files_report["gains"]
    assert mlflow_report["model_averages"] == files_report["model_averages"]
    scenario.step("reports from the runs volume and from MLflow", t0)
