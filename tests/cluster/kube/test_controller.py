"""The Experiment controller against a real control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler; kwok plays the GPU nodes and runs pods to
completion in about a second).

The controller runs as a subprocess (`python -m xstilts.operator.cli controller`) under the
ServiceAccount and Role of k8s/base/controller-rbac.yaml, so a call its Role does not grant
fails here as it would in a cluster. Trainers do not run: `ResultWriter` writes the
result.json of each run whose Job completed, where the controller reads results.
"""

from __future__ import annotations

import json
import shlex
import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from controller_harness import (
    Env,
    ResultWriter,
    converge,
    created_events,
    events,
    free_port,
    get_experiment,
    job_active,
    list_jobs,
    make_env,
    parse_time,
    planned,
    small_experiment,
    xstilts,
)
from kube_cluster import ControlPlane
from xstilts.operator.cluster.render import KUEUE_QUEUE_LABEL, RUN_ID_LABEL, job_name

pytestmark = [pytest.mark.k8s, pytest.mark.slow]


@pytest.fixture
def env(control_plane: ControlPlane, k8s_namespace: str, tmp_path: Path) -> Env:
    return make_env(control_plane, k8s_namespace, tmp_path)

REPO = Path(__file__).resolve().parents[3]


def test_apply_creates_waves_and_unlocks_phase_3(env: Env) -> None:
    obj = small_experiment("tiny", env.namespace, seeds=(1, 2), max_parallel=3)
    _, plan = planned(obj)
    assert len(plan.runs) == 6
    assert "experiment.xstilts.dev/tiny created" in env.apply(obj)
    writer = ResultWriter(env.cp, obj, env.results)
    with env.controller() as controller:
        experiment = converge(env, writer, [controller], max_parallel=3)
        jobs = list_jobs(env.cp, env.namespace, "tiny")

        # Every run ran once, under its own Job name.
        assert sorted(j["metadata"]["name"] for j in jobs) == sorted(job_name("tiny", r.run_id) for r in plan.runs)
        assert created_events(env) == Counter({job_name("tiny", r.run_id): 1 for r in plan.runs})
        # The first wave: the three earliest Jobs need no phase-2 checkpoint.
        first = sorted(jobs, key=lambda j: (j["metadata"]["creationTimestamp"], j["metadata"]["name"]))[:3]
        assert all(not plan.by_id[j["metadata"]["labels"][RUN_ID_LABEL]].depends_on for j in first)
        # Phase 3 started only after its phase-2 result existed.
        for job in jobs:
            run = plan.by_id[job["metadata"]["labels"][RUN_ID_LABEL]]
            for parent in run.depends_on:
                assert parse_time(job["metadata"]["creationTimestamp"]) >= int(writer.written_at[parent])

        status = experiment["status"]
        assert status["counts"] == {"total": 6, "pending": 0, "running": 0, "succeeded": 6, "failed": 0, "blocked": 0}
        assert status["observedGeneration"] == experiment["metadata"]["generation"]
        assert status["bestGain"].startswith("+3.0 xnli/mnli@m0")
        assert {c["type"]: c["status"] for c in status["conditions"]} == {
            "Ready": "True", "Progressing": "False", "Degraded": "False"}
        assert events(env.cp, env.namespace, "Succeeded")

        # kubectl shows the printer columns.
        table = env.cp.kubectl("get", "experiments", namespace=env.namespace).stdout.splitlines()
        assert table[0].split() == ["NAME", "PHASE", "RUNS", "SUCCEEDED", "RUNNING", "FAILED", "GPU-H", "AGE"]
        assert table[1].split()[:6] == ["tiny", "Succeeded", "6", "6", "0", "0"]
        wide = env.cp.kubectl("get", "experiments", "-o", "wide", namespace=env.namespace).stdout
        assert "BEST-GAIN" in wide and "+3.0" in wide

        # `xstilts status` reads the same.
        shown = env.xstilts("status", "tiny", "-n", env.namespace, "-o", "json")
        assert shown.returncode == 0, shown.stderr
        view = json.loads(shown.stdout)
        assert view["phase"] == "Succeeded" and view["progress"] == 1.0
        assert [r["state"] for r in view["rows"]] == ["succeeded"] * 6
        table_text = env.xstilts("status", "tiny", "-n", env.namespace).stdout
        assert "6/6 runs succeeded (100%)" in table_text

        # Health, readiness, metrics; and every API call is one the Role grants.
        assert controller.get("/healthz")[0] == 200
        assert controller.get("/readyz")[0] == 200
        metrics = controller.metrics()
        assert metrics["xstilts_jobs_created_total"] == 6
        assert metrics["xstilts_leader"] == 1
        assert metrics['xstilts_reconcile_total{result="ok"}'] > 0
        assert 'xstilts_reconcile_total{result="error"}' not in metrics, controller.output()[-3000:]
        controller.assert_calls_declared()

        # SIGTERM: a clean exit that hands the Lease back.
        assert controller.stop(signal.SIGTERM) == 0
    lease = env.cp.kubectl_json("get", "lease", "xstilts-controller", namespace=env.namespace)
    assert not lease["spec"].get("holderIdentity")
    assert "released Lease" in controller.output()


def test_killed_and_restarted_controller_duplicates_nothing_and_loses_nothing(env: Env) -> None:
    obj = small_experiment("restart", env.namespace, seeds=(1, 2, 3), intermediates=("mnli", "qqp"), max_parallel=4)
    _, plan = planned(obj)
    assert len(plan.runs) == 15
    env.apply(obj)
    writer = ResultWriter(env.cp, obj, env.results)
    first = env.controller("controller-a").start()
    try:
        deadline = time.monotonic() + 120
        while len(writer.written_at) < 5:  # midway
            writer.write_finished()
            assert time.monotonic() < deadline, first.output()[-3000:]
            time.sleep(0.3)
    finally:
        first.kill()  # SIGKILL: no cleanup, the Lease stays held until it expires
    before = {j["metadata"]["name"]: j["metadata"]["uid"] for j in list_jobs(env.cp, env.namespace, "restart")}
    assert 5 <= len(before) < 15
    time.sleep(2)
    writer.write_finished()  # Jobs that completed while no controller ran
    with env.controller("controller-b") as second:
        experiment = converge(env, writer, [second], max_parallel=4)
        second.assert_calls_declared()
    jobs = list_jobs(env.cp, env.namespace, "restart")
    # Nothing duplicated: one Job per run, each created once, and no Job of the first
    # controller replaced by the second.
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted(job_name("restart", r.run_id) for r in plan.runs)
    assert created_events(env) == Counter({job_name("restart", r.run_id): 1 for r in plan.runs})
    after = {j["metadata"]["name"]: j["metadata"]["uid"] for j in jobs}
    assert all(after[name] == uid for name, uid in before.items())
    # Nothing lost: every run succeeded.
    assert experiment["status"]["counts"]["succeeded"] == 15
    assert set(experiment["status"]["runs"]) == set(plan.by_id)


def test_job_deleted_by_hand_is_recreated_unless_its_run_finished(env: Env) -> None:
    obj = small_experiment("handdel", env.namespace, seeds=(1,), max_parallel=3)
    _, plan = planned(obj)
    intermediate = next(r for r in plan.runs if not r.depends_on and r.labels.target is None)
    baseline = next(r for r in plan.runs if not r.depends_on and r.labels.target is not None)
    env.apply(obj)
    writer = ResultWriter(env.cp, obj, env.results)
    with env.controller() as controller:
        names = {job_name("handdel", r.run_id) for r in (intermediate, baseline)}
        env.cp.wait_for(lambda: {j["metadata"]["name"] for j in list_jobs(env.cp, env.namespace, "handdel")
                                 if not job_active(j)} >= names, timeout=60, what="both first Jobs completed")
        uid = {j["metadata"]["name"]: j["metadata"]["uid"] for j in list_jobs(env.cp, env.namespace, "handdel")}
        # The intermediate run has no result yet: deleting its Job loses the run, so the
        # controller creates it again.
        writer.write(baseline.run_id)
        # An edit outside the run ids (the MLflow server) reaches the run created again.
        env.cp.kubectl("patch", "experiment", "handdel", "--type=merge", "-p",
                       '{"spec": {"mlflow": {"trackingUri": "http://mlflow.moved:5000"}}}', namespace=env.namespace)
        for run in (intermediate, baseline):
            env.cp.kubectl("delete", "job", job_name("handdel", run.run_id), "--wait=true", namespace=env.namespace)

        def recreated() -> bool:
            jobs = {j["metadata"]["name"]: j for j in list_jobs(env.cp, env.namespace, "handdel")}
            job = jobs.get(job_name("handdel", intermediate.run_id))
            return job is not None and job["metadata"]["uid"] != uid[job["metadata"]["name"]]

        env.cp.wait_for(recreated, timeout=30, what="the deleted Job recreated")
        config_map = env.cp.kubectl_json("get", "configmap", job_name("handdel", intermediate.run_id),
                                         namespace=env.namespace)
        assert json.loads(config_map["data"]["run.json"])["tracking"]["tracking_uri"] == "http://mlflow.moved:5000"
        # The baseline run has its result: its Job stays deleted (checked across a resync).
        time.sleep(6)
        names_now = {j["metadata"]["name"] for j in list_jobs(env.cp, env.namespace, "handdel")}
        assert job_name("handdel", baseline.run_id) not in names_now
        experiment = converge(env, writer, [controller], max_parallel=3)
        assert experiment["status"]["counts"]["succeeded"] == 3
        assert created_events(env)[job_name("handdel", intermediate.run_id)] == 2


def test_deleting_the_experiment_garbage_collects_its_jobs(env: Env) -> None:
    obj = small_experiment("gc", env.namespace, seeds=(1, 2), max_parallel=3)
    env.apply(obj)
    metrics_port = free_port()
    with env.controller(extra=[f"--metrics-port={metrics_port}"]) as controller:
        env.cp.wait_for(lambda: len(list_jobs(env.cp, env.namespace, "gc")) >= 3, timeout=60, what="Jobs")
        # /metrics on its own port when asked; health stays on the health port.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            assert "xstilts_leader 1" in resp.read().decode()
        assert controller.get("/metrics")[0] == 404 and controller.get("/healthz")[0] == 200
        deleted = env.xstilts("delete", "gc", "-n", env.namespace)
        assert deleted.returncode == 0, deleted.stderr
        assert "experiment.xstilts.dev/gc deleted" in deleted.stdout

        def gone() -> bool:
            selector = "xstilts.dev/experiment=gc"
            jobs = env.cp.kubectl_json("get", "jobs,configmaps", "-l", selector, namespace=env.namespace)["items"]
            return not jobs

        env.cp.wait_for(gone, timeout=90, interval=1.0, what="Jobs and ConfigMaps garbage-collected")
        missing = env.xstilts("status", "gc", "-n", env.namespace)
        assert missing.returncode == 1
        assert missing.stderr.strip() == (f"error: experiment gc not found in namespace {env.namespace} (no Experiment"
                                          " object and no Jobs labelled xstilts.dev/experiment=gc)")


def test_api_server_rejects_invalid_objects_and_controller_reports_the_rest(env: Env) -> None:
    def rejected(mutate: Any) -> str:
        obj = small_experiment("bad", env.namespace)
        mutate(obj)
        path = env.tmp / "bad.yaml"
        path.write_text(yaml.safe_dump(obj))
        result = env.cp.kubectl("apply", "-f", str(path), namespace=env.namespace, check=False)
        assert result.returncode != 0, result.stdout
        return result.stderr

    message = rejected(lambda o: o["spec"].update(intermediateTasks=["mnli", "nope"]))
    assert 'spec.intermediateTasks[1]: Unsupported value: "nope"' in message
    message = rejected(lambda o: o["spec"]["models"][0]["resources"].update(gpus=-1))
    assert "spec.models[0].resources.gpus: Invalid value: -1: spec.models[0].resources.gpus in body should be" \
        " greater than or equal to 0" in message
    message = rejected(lambda o: o["spec"].update(name="other"))
    assert "metadata.name must equal spec.name" in message
    message = rejected(lambda o: o["spec"].update(colour="blue"))
    assert 'unknown field "spec.colour"' in message

    # What only a cluster refuses (a tracking store on the pods' own filesystem) the controller reports.
    obj = small_experiment("dupes", env.namespace)
    obj["spec"]["mlflow"] = {"trackingUri": "sqlite:///runs/mlflow.db"}
    env.apply(obj)
    with env.controller() as controller:
        def failed() -> dict[str, Any] | None:
            status = get_experiment(env.cp, env.namespace, "dupes").get("status") or {}
            return status if status.get("phase") == "Failed" else None

        status = env.cp.wait_for(failed, timeout=60, what="phase Failed")
        assert status["message"].startswith("invalid spec: mlflow.trackingUri: sqlite: is a store on the pods'")
        assert {c["type"]: c["reason"] for c in status["conditions"]}["Ready"] == "InvalidSpec"
        warnings = events(env.cp, env.namespace, "InvalidSpec")
        assert [e["message"] for e in warnings] == [status["message"]]
        time.sleep(6)  # a resync later: still no Job, and no second Event
        assert list_jobs(env.cp, env.namespace, "dupes") == []
        assert [e.get("count", 1) for e in events(env.cp, env.namespace, "InvalidSpec")] == [1]
        assert controller.metrics()['xstilts_reconcile_total{result="invalid"}'] >= 1


def test_scaling_example_creates_its_first_wave(env: Env) -> None:
    obj = yaml.safe_load((REPO / "examples" / "scaling.yaml").read_text())
    obj["metadata"]["namespace"] = env.namespace
    _, plan = planned(obj)
    assert len(plan.runs) == 168
    env.apply(obj)
    with env.controller() as controller:
        env.cp.wait_for(lambda: len(list_jobs(env.cp, env.namespace, "scaling")) >= 16, timeout=60, what="16 Jobs")
        time.sleep(3)
        jobs = list_jobs(env.cp, env.namespace, "scaling")
        assert len(jobs) == 16  # maxParallel: 16
        for job in jobs:
            run = plan.by_id[job["metadata"]["labels"][RUN_ID_LABEL]]
            assert not run.depends_on
            # The spec names a Kueue queue: created suspended, for Kueue to admit.
            assert job["spec"]["suspend"] is True
            assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-research"
            assert job["metadata"]["namespace"] == env.namespace
        status = get_experiment(env.cp, env.namespace, "scaling")["status"]
        assert status["counts"]["total"] == 168 and status["counts"]["pending"] == 168
        assert status["phase"] == "Pending"
        assert list(status["runs"].values()).count("pending") == 16
        controller.assert_calls_declared()
    shown = env.xstilts("status", "scaling", "-n", env.namespace)
    assert shown.returncode == 0, shown.stderr
    assert "0/168 runs succeeded" in shown.stdout


def test_submit_without_controller_continues_pass_by_pass(env: Env) -> None:
    obj = small_experiment("direct", env.namespace, seeds=(1, 2), max_parallel=3)
    spec_file = env.tmp / "direct-spec.yaml"
    spec_file.write_text(yaml.safe_dump(obj["spec"], sort_keys=False))  # a bare spec, not an object
    _, plan = planned(obj)
    writer = ResultWriter(env.cp, obj, env.results)
    passes = 0
    deadline = time.monotonic() + 180
    while True:
        passes += 1
        result = env.xstilts("submit", str(spec_file), "--no-controller", "-n", env.namespace,
                             "--results-dir", str(env.results))
        assert result.returncode == 0, result.stderr
        jobs = list_jobs(env.cp, env.namespace, "direct")
        assert sum(1 for j in jobs if job_active(j)) <= 3
        if passes == 1:
            assert result.stdout.count("created\n") == 3
            assert all(not plan.by_id[j["metadata"]["labels"][RUN_ID_LABEL]].depends_on for j in jobs)
        if "every run has succeeded" in result.stdout:
            break
        assert time.monotonic() < deadline, result.stdout
        time.sleep(1)
        writer.write_finished()
    jobs = list_jobs(env.cp, env.namespace, "direct")
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted(job_name("direct", r.run_id) for r in plan.runs)
    assert all(not j["metadata"].get("ownerReferences") for j in jobs)
    shown = json.loads(env.xstilts("status", "direct", "-n", env.namespace, "-o", "json").stdout)
    assert shown["controller"] is False and shown["counts"]["succeeded"] == 6 and shown["phase"] == "Unknown"
    with_spec = env.xstilts("status", "direct", "-n", env.namespace, "--spec", str(spec_file),
                            "--results-dir", str(env.results), "-o", "json")
    assert with_spec.returncode == 0, with_spec.stderr
    view = json.loads(with_spec.stdout)
    assert view["phase"] == "Succeeded" and [r["state"] for r in view["rows"]] == ["succeeded"] * 6
    # The run's Job and pod are found; kwok serves no container logs, so the log itself
    # is refused by the API server, in one line.
    some_run = plan.runs[0].run_id
    logs = env.xstilts("logs", "direct", some_run[:6], "-n", env.namespace)
    assert logs.returncode == 1 and logs.stderr.startswith("error: no log for pod direct-"), logs.stderr
    assert len(logs.stderr.strip().splitlines()) == 1
    deleted = env.xstilts("delete", "direct", "-n", env.namespace)
    assert deleted.returncode == 0 and "deleted the 6 Jobs" in deleted.stdout
    assert list_jobs(env.cp, env.namespace, "direct") == []


def test_submit_fails_on_missing_secrets_with_the_commands_that_create_them(env: Env) -> None:
    obj = small_experiment("secrets", env.namespace, seeds=(1,))
    obj["spec"]["cluster"]["secrets"] = {"hfToken": "hf-token", "mlflow": "mlflow-credentials"}
    spec_file = env.tmp / "secrets.yaml"
    spec_file.write_text(yaml.safe_dump(obj, sort_keys=False))
    commands: list[str] = []
    for mode in ([], ["--no-controller"]):
        result = env.xstilts("submit", str(spec_file), *mode)
        assert result.returncode == 1, (mode, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        assert (f"Secrets that do not exist in namespace {env.namespace}: hf-token, mlflow-credentials"
                in result.stderr), result.stderr
        commands = [line.strip() for line in result.stderr.splitlines() if line.strip().startswith("kubectl ")]
        assert [c.split()[6] for c in commands] == ["hf-token", "mlflow-credentials"], commands
    # Nothing was created.
    assert env.cp.kubectl("get", "experiment", "secrets", namespace=env.namespace, check=False).returncode != 0
    assert list_jobs(env.cp, env.namespace, "secrets") == []
    # The printed commands, run as printed, make what submit needs.
    for command in commands:
        words = shlex.split(command)
        assert words[:3] == ["kubectl", "-n", env.namespace]
        env.cp.kubectl(*words[1:])
    result = env.xstilts("submit", str(spec_file))
    assert result.returncode == 0, result.stderr
    assert "experiment.xstilts.dev/secrets created" in result.stdout


def test_a_standby_takes_over_when_the_leader_stops(env: Env) -> None:
    obj = small_experiment("ha", env.namespace, seeds=(1, 2, 3), max_parallel=2)
    env.apply(obj)
    writer = ResultWriter(env.cp, obj, env.results)
    with env.controller("replica-a") as a, env.controller("replica-b") as b:
        env.cp.wait_for(lambda: a.metrics().get("xstilts_leader") == 1 or b.metrics().get("xstilts_leader") == 1,
                        timeout=30, what="a leader")
        leader, standby = (a, b) if a.metrics().get("xstilts_leader") == 1 else (b, a)
        # A standby becomes ready (it reached the API) without leading; under load its
        # server may come up after the leader was elected, so wait for it.
        env.cp.wait_for(lambda: standby.get("/readyz")[0] == 200, timeout=30, what="the standby ready")
        assert standby.metrics().get("xstilts_jobs_created_total", 0) == 0
        env.cp.wait_for(lambda: writer.write_finished(), timeout=60, what="a first result")
        assert leader.stop(signal.SIGTERM) == 0
        env.cp.wait_for(lambda: standby.metrics().get("xstilts_leader") == 1, timeout=10,
                        what="the standby leading")  # at once: the Lease was released, not left to expire
        experiment = converge(env, writer, [standby], max_parallel=2)
    assert experiment["status"]["counts"]["succeeded"] == 9
    assert sum(created_events(env).values()) == 9
    lease = env.cp.kubectl_json("get", "lease", "xstilts-controller", namespace=env.namespace)
    assert lease["spec"]["leaseTransitions"] >= 1


def test_cluster_commands_fail_in_one_line(env: Env, tmp_path: Path) -> None:
    unreachable = tmp_path / "unreachable.kubeconfig"
    config = json.loads(env.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:9"
    unreachable.write_text(json.dumps(config))
    for args in (["status", "x", "-n", "y"], ["submit", str(REPO / "examples" / "demo.yaml")],
                 ["delete", "x"], ["controller", "--health-port=0"]):
        result = xstilts(*args, kubeconfig=unreachable)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert result.stderr.startswith("error: ") and "cannot reach the Kubernetes API at https://127.0.0.1:9" \
            in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr

    # The controller's ServiceAccount may not touch Secrets, nor another namespace.
    forbidden = xstilts("status", "x", "-n", "default", kubeconfig=env.kubeconfig)
    assert forbidden.returncode == 1
    assert 'cannot get resource "experiments"' in forbidden.stderr or "forbidden" in forbidden.stderr
    assert len(forbidden.stderr.strip().splitlines()) == 1

    logs = env.xstilts("logs", "nothing", "abc", "-n", env.namespace)
    assert logs.returncode == 1
    assert logs.stderr.startswith(f"error: no Job for run abc of experiment nothing in namespace {env.namespace}")


def test_a_failed_phase_2_run_blocks_its_dependants_until_retried(env: Env) -> None:
    obj = small_experiment("fails", env.namespace, seeds=(1,), max_parallel=3)
    # No node matches: pods stay Pending and the Jobs active until the test fails one.
    obj["spec"]["cluster"]["nodeSelector"] = {"xstilts.dev/no-such-node": "true"}
    _, plan = planned(obj)
    intermediate = next(r for r in plan.runs if r.labels.target is None)
    dependant = next(r for r in plan.runs if intermediate.run_id in r.depends_on)
    failing_job = job_name("fails", intermediate.run_id)
    env.apply(obj)
    with env.controller() as controller:
        env.cp.wait_for(lambda: len(list_jobs(env.cp, env.namespace, "fails")) == 2, timeout=60, what="2 Jobs")
        # What the Job controller itself marks when a podFailurePolicy FailJob rule matches
        # (the trainer's exit code 42): it then fails the Job.
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        reason = "Container trainer for pod fails-x exited with 42, matching FailJob rule at index 1"
        env.cp.kubectl("patch", "job", failing_job, "--subresource=status", "--type=merge", "-p", json.dumps(
            {"status": {"conditions": [{"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy",
                                        "message": reason, "lastTransitionTime": now, "lastProbeTime": now}]}}),
                       namespace=env.namespace)

        def blocked() -> dict[str, Any] | None:
            status = get_experiment(env.cp, env.namespace, "fails").get("status") or {}
            runs = status.get("runs") or {}
            done = runs.get(intermediate.run_id) == "failed" and runs.get(dependant.run_id) == "blocked"
            return status if done else None

        status = env.cp.wait_for(blocked, timeout=60, what="the dependant blocked")
        assert status["counts"]["failed"] == 1 and status["counts"]["blocked"] == 1
        assert status["failures"][intermediate.run_id].startswith("PodFailurePolicy: Container trainer")
        degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
        assert degraded["status"] == "True" and "1 dependant runs blocked" in degraded["message"]
        # Events follow the status write.
        env.cp.wait_for(lambda: events(env.cp, env.namespace, "RunsBlocked"), timeout=10, what="RunsBlocked")
        (failed_event,) = events(env.cp, env.namespace, "RunFailed")
        assert intermediate.run_id in failed_event["message"] and reason in failed_event["message"]
        (blocked_event,) = events(env.cp, env.namespace, "RunsBlocked")
        assert blocked_event["type"] == "Warning" and dependant.run_id in blocked_event["message"]
        table = env.cp.kubectl("get", "experiments", namespace=env.namespace).stdout.splitlines()
        assert table[1].split()[5] == "1"  # the FAILED column

        # The failure is remembered after its Job is gone (as when ttlSecondsAfterFinished
        # removes it): neither the run nor its dependant is created again.
        env.cp.kubectl("delete", "job", failing_job, namespace=env.namespace)
        time.sleep(6)  # past a resync
        names = {j["metadata"]["name"] for j in list_jobs(env.cp, env.namespace, "fails")}
        assert names == {job_name("fails", r.run_id) for r in plan.runs if r.labels.intermediate == "baseline"}

        # Retry, as reconcile documents it: drop the run from the status.
        env.cp.kubectl("patch", "experiment", "fails", "--subresource=status", "--type=json", "-p", json.dumps([
            {"op": "remove", "path": f"/status/runs/{intermediate.run_id}"},
            {"op": "remove", "path": f"/status/failures/{intermediate.run_id}"}]), namespace=env.namespace)
        env.cp.wait_for(lambda: failing_job in {j["metadata"]["name"] for j in list_jobs(env.cp, env.namespace,
                                                                                           "fails")},
                        timeout=30, what="the failed run's Job created again")
        controller.assert_calls_declared()

