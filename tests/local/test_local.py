"""`xstilts run` end to end with the real trainer on tiny local models and data: the DAG in
dependency order with runs side by side, nothing retrained on a rerun, resuming after Ctrl-C and
after the executor is killed, and going on past a failing run.

Each test runs the real CLI as a subprocess (stdout is not a terminal, so it logs plain lines),
and reads what happened from the run directories: result.json files and their times, and each
run's train.log, where the executor marks every start of a training process."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fixtures.tiny_hub import TinyHub
from xstilts.operator.experiment.plan import Plan, PlannedRun, plan
from xstilts.operator.experiment.spec import load_spec_text
from xstilts.operator.local.executor import ATTEMPT_MARK
from xstilts.trainer.config import ExitCode, RunResult, Stage
from xstilts.trainer.rundir import RunDir

pytestmark = pytest.mark.slow  # every test here trains several tiny runs, 20-40 s each on 2 cores


def spec_text(hub: TinyHub, *, name: str = "local-test", intermediates: tuple[str, ...] = ("mnli",),
              seeds: tuple[int, ...] = (1,), steps: int = 8, data: dict[str, str] | None = None) -> str:
    tasks = {t: str(hub.data[t]) for t in (*intermediates, "pawsx")} | (data or {})
    stage = (f"{{learningRate: 1.0e-3, batchSize: 16, maxSteps: {steps}, maxSeqLength: 64,"
             " maxEvalExamples: 20}")
    return f"""
name: {name}
models:
  - {{name: tiny, pretrained: {hub.model}, parameters: 80000, resources: {{gpus: 0}}}}
intermediateTasks: [{", ".join(intermediates)}]
targets: [pawsx]
evalLanguages: {{pawsx: [en, de]}}
seeds: [{", ".join(map(str, seeds))}]
data: {{{", ".join(f"{t}: {p}" for t, p in tasks.items())}}}
hyperparameters:
  intermediate: {stage}
  target: {stage}
"""


def write_spec(tmp_path: Path, text: str) -> tuple[Path, Plan]:
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    return path, plan(load_spec_text(text, str(path)), str(tmp_path / "out"))


def run_command(spec: Path, tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "xstilts.operator.cli", "run", str(spec), "--output-dir", str(tmp_path / "out"),
            *args]


def xstilts_run(spec: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(run_command(spec, tmp_path, *args), cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, check=False)


def run_dir(p: Plan, run_id: str) -> Path:
    return Path(p.by_id[run_id].config.run_dir)


def result_path(p: Plan, run_id: str) -> Path:
    return RunDir.of(p.by_id[run_id].config).result


def attempts(p: Plan, run_id: str) -> list[str]:
    """The executor's start marks in the run's train.log: one per training process started."""
    log = RunDir(run_dir(p, run_id)).train_log
    if not log.exists():
        return []
    return [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
            if line.startswith(ATTEMPT_MARK)]


def finished(p: Plan) -> dict[str, int]:
    """Runs with a result, and the result file's modification time (ns)."""
    return {r.run_id: result_path(p, r.run_id).stat().st_mtime_ns for r in p.runs if result_path(p, r.run_id).exists()}


def run_of(p: Plan, arm: str, stage: Stage, seed: int = 1) -> str:
    return next(r.run_id for r in p.runs if r.labels.intermediate == arm and r.config.stage is stage
                and r.config.seed == seed)


def line_index(lines: list[str], text: str) -> int:
    return next(i for i, line in enumerate(lines) if text in line)


def test_runs_the_dag_in_order_side_by_side_and_a_rerun_starts_nothing(
        tiny_hub: TinyHub, tiny_cache: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    spec, p = write_spec(tmp_path, spec_text(tiny_hub))
    inter, base, target = (run_of(p, "mnli", Stage.INTERMEDIATE), run_of(p, "baseline", Stage.TARGET),
                           run_of(p, "mnli", Stage.TARGET))
    first = xstilts_run(spec, tmp_path, "--parallel", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    assert set(finished(p)) == {inter, base, target}
    assert all(len(attempts(p, r.run_id)) == 1 for r in p.runs)

    lines = first.stdout.splitlines()
    # the two runs without dependencies started before either finished: they ran side by side
    assert max(line_index(lines, f"start  {inter}"), line_index(lines, f"start  {base}")) < min(
        line_index(lines, f"done   {inter}"), line_index(lines, f"done   {base}"))
    # the target run started from the intermediate checkpoint only once that run had finished
    assert line_index(lines, f"done   {inter}") < line_index(lines, f"start  {target}")
    inter_done = datetime.fromisoformat(RunResult.model_validate_json(
        result_path(p, inter).read_text(encoding="utf-8")).finished_at)
    started = re.search(r" at (\S+): ", attempts(p, target)[0])
    assert started is not None
    assert inter_done <= datetime.fromisoformat(started.group(1)) + timedelta(seconds=1)
    assert "3/3 runs done (3 now, 0 earlier)" in first.stdout
    assert f"xstilts report {spec} --output-dir {tmp_path / 'out'}" in first.stdout

    # MLflow: one parent for the experiment, one child per run linked to it
    client = MlflowClient(f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("local-test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("xstilts.parent") == "true"]
    children = [r for r in runs if "xstilts.run_id" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {c.data.tags["xstilts.run_id"] for c in children} == {inter, base, target}
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)

    before = finished(p)
    second = xstilts_run(spec, tmp_path, "--parallel", "2")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "3 runs, 3 already done, 0 to run" in second.stdout
    assert "start  " not in second.stdout
    assert all(len(attempts(p, r.run_id)) == 1 for r in p.runs)  # no training process started
    assert finished(p) == before  # no result rewritten


def wait_for(condition, what: str, proc: subprocess.Popen[str], timeout: float = 300):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"xstilts run exited ({proc.returncode}) before {what}: {output}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def attempt_started(p: Plan, run_id: str) -> float:
    """When the run's latest training process started (epoch seconds), from its start mark."""
    marks = attempts(p, run_id)
    found = re.search(r" at (\S+): ", marks[-1]) if marks else None
    return datetime.fromisoformat(found.group(1)).timestamp() if found else float("inf")


def training_midway(p: Plan, done: set[str]) -> str | None:
    """A run that is not done and, in its current attempt (not a stale progress file of an
    earlier one), has trained at least one step but not half of its steps."""
    from xstilts.trainer.rundir import read_progress

    for r in p.runs:
        if r.run_id in done or result_path(p, r.run_id).exists():
            continue
        progress = read_progress(RunDir(run_dir(p, r.run_id)).progress, since=attempt_started(p, r.run_id))
        if progress and progress.get("phase") == "train" and 1 <= progress["step"] <= progress["total_steps"] // 2:
            return r.run_id
    return None


def test_resumes_after_ctrl_c_and_after_being_killed_without_training_anything_twice(
        tiny_hub: TinyHub, tiny_cache: Path, tmp_path: Path) -> None:
    # Runs forked ready-made train 60 steps in about a second, faster than progress.json (written
    # once a second) can show one mid-way: 400 steps leave time to catch each run training.
    spec, p = write_spec(tmp_path, spec_text(tiny_hub, name="resume-test", steps=400))

    # 1. Ctrl-C (SIGINT to the executor) once a run has finished and another is training
    proc = subprocess.Popen(run_command(spec, tmp_path, "--parallel", "1"), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(lambda: finished(p), "a run finished", proc)
    paused = wait_for(lambda: training_midway(p, set(finished(p))), "a run trains", proc)
    done_before_ctrl_c = finished(p)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    assert f"paused {paused}" in out and f"exit {ExitCode.INTERRUPTED:d} (interrupted)" in out
    assert not result_path(p, paused).exists()
    assert finished(p) == done_before_ctrl_c

    # 2. SIGKILL the executor's whole process group mid-run: its trainer, in a session of its own,
    # is told by the kernel (parent-death signal) to checkpoint and exit
    proc = subprocess.Popen(run_command(spec, tmp_path, "--parallel", "1"), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(lambda: len(finished(p)) > len(done_before_ctrl_c), "another run finished", proc)
    killed = wait_for(lambda: training_midway(p, set(finished(p))), "a run trains", proc)
    done_before_kill = finished(p)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)

    # 3. the rerun finishes the rest; nothing that had finished is trained again
    last = xstilts_run(spec, tmp_path, "--parallel", "1")
    assert last.returncode == 0, last.stdout + last.stderr
    assert len(finished(p)) == len(p.runs) == 3
    for run_id, mtime in done_before_kill.items():
        assert finished(p)[run_id] == mtime, f"{run_id} was trained again"
        if run_id not in (paused, killed):
            assert len(attempts(p, run_id)) == 1, run_id
    # the interrupted runs started again and resumed from the checkpoint they wrote on SIGTERM
    for run_id in {paused, killed}:
        assert len(attempts(p, run_id)) == 2, run_id
        log = (RunDir(run_dir(p, run_id)).train_log).read_text(encoding="utf-8", errors="replace")
        assert "resuming from" in log.split(attempts(p, run_id)[1])[1], run_id
    assert sum(len(attempts(p, r.run_id)) for r in p.runs) == len(p.runs) + len({paused, killed})


def test_a_failing_run_blocks_its_dependants_only_and_is_retried_on_request(
        tiny_hub: TinyHub, tiny_cache: Path, tmp_path: Path) -> None:
    missing = tmp_path / "mnli-data-not-there"
    spec, p = write_spec(tmp_path, spec_text(tiny_hub, intermediates=("mnli", "hellaswag"),
                                             data={"mnli": str(missing)}))
    bad, bad_target = run_of(p, "mnli", Stage.INTERMEDIATE), run_of(p, "mnli", Stage.TARGET)
    good = {r.run_id for r in p.runs} - {bad, bad_target}

    first = xstilts_run(spec, tmp_path, "--parallel", "2")
    assert first.returncode == 1, first.stdout + first.stderr
    assert set(finished(p)) == good  # everything that does not need the failed run finished
    assert f"FAILED {bad} tiny mnli seed 1: exit {ExitCode.INVALID:d} (invalid config or data)" in first.stdout
    assert "invalid run" in first.stdout  # the tail of the trainer's log, with its one-line reason
    assert f"blocked {bad_target}" in first.stdout
    assert RunDir(run_dir(p, bad)).failure.exists()
    assert attempts(p, bad_target) == []  # never started

    # an invalid run is not retried by a plain rerun
    again = xstilts_run(spec, tmp_path, "--parallel", "2")
    assert again.returncode == 1
    assert "--retry-failed" in again.stdout and "start  " not in again.stdout
    assert len(attempts(p, bad)) == 1

    # once the data is there, --retry-failed runs it and what it blocked
    shutil.copytree(tiny_hub.data["mnli"], missing)
    retried = xstilts_run(spec, tmp_path, "--parallel", "2", "--retry-failed")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert len(finished(p)) == len(p.runs)
    assert len(attempts(p, bad)) == 2 and len(attempts(p, bad_target)) == 1
    assert all(len(attempts(p, r)) == 1 for r in good)
    assert not RunDir(run_dir(p, bad)).failure.exists()


def test_a_run_asking_for_several_processes_runs_under_torchrun(
        tiny_hub: TinyHub, tiny_cache: Path, tmp_path: Path) -> None:
    text = spec_text(tiny_hub, name="ddp-test", intermediates=()).replace(
        "resources: {gpus: 0}", "resources: {gpus: 0, processesPerNode: 2}")
    spec, p = write_spec(tmp_path, text)
    (only,) = p.runs
    done = xstilts_run(spec, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(finished(p)) == {only.run_id}
    (mark,) = attempts(p, only.run_id)
    assert ("-m xstilts.trainer.launch --nproc_per_node=2 --nnodes=1 --standalone --max_restarts=0"
            " -m xstilts.trainer") in mark


def test_replication_adds_a_paired_seed_locally_and_a_rerun_starts_nothing(
        tiny_hub: TinyHub, tiny_cache: Path, tmp_path: Path) -> None:
    """Seeds 1-2 train; their scores are then edited so that the cell's two paired gains
    disagree by 20 points (tiny runs often score alike, which reaches any precision); the rerun's
    reconcile adds seed 3 (maxSeeds): a baseline and an mnli run with it, trained for real."""
    text = spec_text(tiny_hub, name="rep-test").replace(
        "seeds: [1]", "replication: {targetHalfWidth: 1.0, minSeeds: 2, maxSeeds: 3}")
    spec, p = write_spec(tmp_path, text)
    assert sorted({r.config.seed for r in p.runs}) == [1, 2] and len(p.reserve) == 3
    first = xstilts_run(spec, tmp_path, "--parallel", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    assert {r.run_id for r in p.runs} <= set(finished_all(p))
    for seed, gain in ((1, 0.0), (2, 0.2)):
        base = RunResult.model_validate_json(result_path(p, run_of(p, "baseline", Stage.TARGET, seed)).read_text())
        arm_path = result_path(p, run_of(p, "mnli", Stage.TARGET, seed))
        arm = RunResult.model_validate_json(arm_path.read_text())
        languages = {lang: {k: v + gain for k, v in scores.items()} for lang, scores in base.languages.items()}
        arm_path.write_text(arm.model_copy(update={"languages": languages}).model_dump_json())
    second = xstilts_run(spec, tmp_path, "--parallel", "2")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "9/9 runs done" in second.stdout
    model = p.runs[0].labels.model
    said = " ".join(second.stdout.split())  # the console wraps long lines
    assert f"replication: 3 runs added (seeds 3) for {model}/mnli: gain interval still wider" in said
    assert set(finished_all(p)) == {r.run_id for r in (*p.runs, *p.reserve)}
    assert all(len(attempts_any(r)) == 1 for r in (*p.runs, *p.reserve))  # each trained once
    third = xstilts_run(spec, tmp_path, "--parallel", "2")
    assert third.returncode == 0, third.stdout + third.stderr
    assert "start  " not in third.stdout and "9 runs, 9 already done, 0 to run" in third.stdout


def finished_all(p: Plan) -> list[str]:
    """Runs of the plan and its replication reserve that have a result."""
    return [r.run_id for r in (*p.runs, *p.reserve) if RunDir.of(r.config).has_result()]


def attempts_any(run: PlannedRun) -> list[str]:
    log = RunDir.of(run.config).train_log
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    return [line for line in text.splitlines() if line.startswith(ATTEMPT_MARK)]


def test_a_phase2_learning_rate_search_trains_the_target_run_of_the_selected_rate_only(
        tiny_hub: TinyHub, tiny_cache: Path, tmp_path: Path) -> None:
    """Two phase-2 rates train; reconcile selects the one with the better English dev score
    and the executor trains the mnli→pawsx run from it, and not from the other."""
    text = spec_text(tiny_hub, name="search-test").replace(
        "  intermediate: {learningRate: 1.0e-3,", "  intermediate: {search: {learningRate: [1.0e-3, 1.0e-6]},"
        " learningRate: 1.0e-3,")
    spec, p = write_spec(tmp_path, text)
    assert len(p.runs) == 3 and len(p.held) == 2
    done = xstilts_run(spec, tmp_path, "--parallel", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "learning-rate search: 1 target runs added" in done.stdout
    phase2 = {r.run_id: RunResult.model_validate_json(result_path(p, r.run_id).read_text())
              for r in p.runs if r.config.stage is Stage.INTERMEDIATE}
    dev = {r.config.hyperparameters.learning_rate: r.metrics["dev.accuracy"] for r in phase2.values()}
    best = max(dev, key=lambda lr: (dev[lr], lr == 1.0e-3))  # a tie: the rate listed first
    trained = [r for r in p.held if RunDir.of(r.config).has_result()]
    assert len(trained) == 1
    assert phase2[trained[0].depends_on[0]].config.hyperparameters.learning_rate == best


def test_a_failed_phase2_candidate_leaves_the_selection_to_the_others(
        tiny_hub: TinyHub, tiny_cache: Path, tmp_path: Path) -> None:
    """One phase-2 rate's run fails (its run directory cannot take its config.json); reconcile
    selects the rate that succeeded and the executor trains the mnli→pawsx run from it, instead
    of leaving the arm searching."""
    text = spec_text(tiny_hub, name="search-fail").replace(
        "  intermediate: {learningRate: 1.0e-3,", "  intermediate: {search: {learningRate: [1.0e-3, 1.0e-4]},"
        " learningRate: 1.0e-3,")
    spec, p = write_spec(tmp_path, text)
    broken = next(r for r in p.runs if r.config.stage is Stage.INTERMEDIATE
                  and r.config.hyperparameters.learning_rate == 1.0e-3)
    (RunDir.of(broken.config).config).mkdir(parents=True)  # a directory where the trainer writes a file
    done = xstilts_run(spec, tmp_path, "--parallel", "2")
    assert done.returncode == ExitCode.FAILED, done.stdout + done.stderr
    assert "learning-rate search: 1 target runs added" in done.stdout
    assert not RunDir.of(broken.config).has_result() and RunDir.of(broken.config).failure.is_file()
    trained = [r for r in p.held if RunDir.of(r.config).has_result()]
    assert len(trained) == 1
    assert p.by_id[trained[0].depends_on[0]].config.hyperparameters.learning_rate == 1.0e-4
