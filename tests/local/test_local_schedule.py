"""The local executor's pure parts: the time estimate, the progress lines, and how a run is
placed and launched on this machine. Which run may start and what a failure blocks is
reconcile()'s (tests/local/test_engine_agreement.py, tests/cluster/test_reconcile.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from xstilts.operator.cli.local_commands import default_parallel, follow_up_commands, parse_formats
from xstilts.operator.experiment.plan import Plan, plan
from xstilts.operator.experiment.spec import load_spec_text
from xstilts.operator.local.display import ProgressView, RunningRow, counts_line, format_seconds, progress_text
from xstilts.operator.local.eta import estimate_remaining_seconds, relative_cost
from xstilts.operator.local.executor import (
    LocalRunError,
    Placement,
    place,
    threads_per_process,
    tracking_uri_for,
    trainer_env,
    with_tracking,
)
from xstilts.trainer.config import Resources, Stage
from xstilts.trainer.launch import trainer_command

SPEC = """
name: sched
models:
  - {name: a, pretrained: local/a, parameters: 1000, resources: {gpus: 0}}
  - {name: b, pretrained: local/b, parameters: 4000, resources: {gpus: 0}}
intermediateTasks: [mnli]
targets: [pawsx]
seeds: [1]
"""


def the_plan() -> Plan:
    return plan(load_spec_text(SPEC, "sched.yaml"))


def run_of(p: Plan, model: str, arm: str, stage: Stage) -> str:
    return next(r.run_id for r in p.runs if r.labels.model == model and r.labels.intermediate == arm
                and r.config.stage is stage)


def test_remaining_time_from_observed_rate() -> None:
    p = the_plan()
    states = {r.run_id: "queued" if not r.depends_on else "waiting" for r in p.runs}
    costs = {r.run_id: relative_cost(r) for r in p.runs}
    # nothing timed yet and nothing reporting progress: unknown
    assert estimate_remaining_seconds(costs, states, [], {}, {}, parallel=2) is None
    # one unit of cost per second observed; 6 pending runs shared by 2 slots
    rate_obs = [(1000.0, 1000.0)]
    expected = sum(costs.values()) / 2
    assert estimate_remaining_seconds(costs, states, rate_obs, {}, {}, parallel=2) == pytest.approx(expected)
    # a running run contributes the eta it reports
    first = next(r for r, s in states.items() if s == "queued")
    states[first] = "running"
    pending = sum(c for r, c in costs.items() if r != first)
    got = estimate_remaining_seconds(costs, states, rate_obs, {first: 5.0}, {first: 30.0}, parallel=2)
    assert got == pytest.approx((pending + 30.0) / 2)
    # ... or, without one, its expected length minus what it has run
    got = estimate_remaining_seconds(costs, states, rate_obs, {first: 5.0}, {first: None}, parallel=2)
    assert got == pytest.approx((pending + costs[first] - 5.0) / 2)
    # failed and blocked runs never start: no time for them
    states = dict.fromkeys(states, "failed") | {first: "succeeded"}
    assert estimate_remaining_seconds(costs, states, rate_obs, {}, {}, parallel=2) == 0.0


def test_bigger_models_cost_more() -> None:
    p = the_plan()
    a = p.by_id[run_of(p, "a", "baseline", Stage.TARGET)]
    b = p.by_id[run_of(p, "b", "baseline", Stage.TARGET)]
    assert relative_cost(b) == pytest.approx(4 * relative_cost(a))


def test_placement_on_this_machine() -> None:
    assert place(Resources(), machine_gpus=0) == Placement(1, 0)
    assert place(Resources(processes_per_node=2), machine_gpus=0) == Placement(2, 0)  # DeepSpeed on CPU ranks
    assert place(Resources(gpus_per_node=4), machine_gpus=0) == Placement(1, 0)  # no GPU: CPU fallback
    assert place(Resources(gpus_per_node=2), machine_gpus=8) == Placement(2, 2)
    with pytest.raises(LocalRunError, match="asks for 4 GPUs and this machine has 2"):
        place(Resources(gpus_per_node=4), machine_gpus=2)
    with pytest.raises(LocalRunError, match="xstilts submit"):
        place(Resources(gpus_per_node=8, nodes=2), machine_gpus=8)


def test_trainer_command_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "run.json"
    assert trainer_command(str(config), 1, python=sys.executable) == [sys.executable, "-m", "xstilts.trainer",
                                                                      str(config)]
    torchrun = trainer_command(str(config), 2, python=sys.executable)
    assert torchrun[:3] == [sys.executable, "-m", "xstilts.trainer.launch"] and "--standalone" in torchrun
    assert "--nproc_per_node=2" in torchrun and torchrun[-3:] == ["-m", "xstilts.trainer", str(config)]

    cpu = trainer_env({"PATH": "/bin"}, Placement(1, 0), [], threads_per_process(2, 2, 1))
    assert cpu["DS_ACCELERATOR"] == "cpu" and cpu["CUDA_VISIBLE_DEVICES"] == ""
    assert cpu["OMP_NUM_THREADS"] == "1" and cpu["PATH"] == "/bin"
    gpu = trainer_env({"OMP_NUM_THREADS": "7"}, Placement(2, 2), ["2", "3"], 4)
    assert "DS_ACCELERATOR" not in gpu and gpu["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert gpu["OMP_NUM_THREADS"] == "7"  # the user's choice stands
    assert threads_per_process(16, 2, 2) == 4 and threads_per_process(2, 4, 1) == 1


def test_tracking_target_and_plan_with_tracking(tmp_path: Path) -> None:
    spec = load_spec_text(SPEC, "sched.yaml")
    local = tracking_uri_for(spec, None, tmp_path)
    assert local == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri_for(spec, "http://mlflow:5000", tmp_path) == "http://mlflow:5000"
    p = plan(spec, str(tmp_path))
    tracked = with_tracking(p, local, "abc123")
    assert [r.run_id for r in tracked.runs] == [r.run_id for r in p.runs]  # tracking is not identity
    assert all(r.config.tracking.parent_run_id == "abc123" and r.config.tracking.tracking_uri == local
               for r in tracked.runs)
    assert all(r.config.tracking.experiment_name == "sched" for r in tracked.runs)


def test_cli_helpers() -> None:
    spec = load_spec_text(SPEC, "sched.yaml")  # cluster.maxParallel defaults to 8
    assert default_parallel(spec, machine_gpus=0, cpus=2) == 2
    assert default_parallel(spec, machine_gpus=4, cpus=64) == 4
    assert default_parallel(spec, machine_gpus=0, cpus=64) == 8
    report, ui = follow_up_commands(Path("my spec.yaml"), Path("out"), None)
    assert report == "xstilts report 'my spec.yaml' --output-dir out"
    assert ui == "xstilts ui 'my spec.yaml' --output-dir out"
    assert parse_formats("md, HTML ,png") == ["md", "html", "png"]
    with pytest.raises(ValueError, match="pdf is not a report format"):
        parse_formats("pdf")


def test_progress_lines() -> None:
    assert format_seconds(None) == "?" and format_seconds(75) == "1:15" and format_seconds(3725) == "1:02:05"
    row = RunningRow("abc", "a mnli seed 1", {"phase": "train", "step": 3, "total_steps": 10, "loss": 0.51234,
                                              "eta_s": 42}, 12.0)
    assert progress_text(row) == "train, step 3/10, loss 0.512, ~0:42 left"
    assert progress_text(RunningRow("abc", "t", None, 1.0)) == "starting"
    view = ProgressView("sched", {"total": 6, "succeeded": 3, "running": 1, "pending": 1, "failed": 1,
                                  "blocked": 0}, 2, [row], 61.0, 30.0)
    assert counts_line(view) == ("sched: 3/6 done (2 earlier), 1 running, 1 pending, 1 failed;"
                                 " elapsed 1:01, ~0:30 left")


def test_live_view_renders_counts_and_running_runs() -> None:
    from rich.console import Console
    from xstilts.operator.local.display import render

    row = RunningRow("abc123def456", "a mnli→pawsx seed 1", {"phase": "train", "step": 5, "total_steps": 20,
                                                            "loss": 0.7, "eta_s": 30}, 9.0)
    view = ProgressView("sched", {"total": 6, "succeeded": 2, "running": 1, "pending": 3}, 0, [row], 125.0, None,
                        note="stopping: waiting for 1 run(s) to checkpoint and exit")
    console = Console(record=True, width=160, force_terminal=False)
    console.print(render(view))
    text = console.export_text()
    assert "sched: 2/6 done, 1 running, 3 pending; elapsed 2:05, ~? left" in text
    assert "abc123def456" in text and "a mnli→pawsx seed 1" in text
    assert "train, step 5/20, loss 0.700, ~0:30 left" in text
    assert "stopping: waiting for 1 run(s)" in text


def test_credentials_leave_the_tracking_uri_for_the_environment() -> None:
    from xstilts.operator.local.executor import split_credentials

    assert split_credentials("https://bot:s%40cret@mlflow.example.org:8443/x") == (
        "https://mlflow.example.org:8443/x", {"MLFLOW_TRACKING_USERNAME": "bot", "MLFLOW_TRACKING_PASSWORD": "s@cret"})
    assert split_credentials("http://mlflow:5000") == ("http://mlflow:5000", {})
    db = "postgresql://mlflow:pw@db:5432/mlflow"  # a database driver takes credentials in the URL only
    assert split_credentials(db) == (db, {})
    assert split_credentials("sqlite:////tmp/x/mlflow.db") == ("sqlite:////tmp/x/mlflow.db", {})
