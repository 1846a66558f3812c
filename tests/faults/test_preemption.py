"""Preemption, proven: a run stopped several times at random steps, once by a SIGKILL in the
middle of writing a checkpoint, ends exactly where the same run ends uninterrupted.

The scenario (module fixture `preempted`, the trainer as a cluster starts it:
`python -m xstilts.trainer RUN.json`): SIGTERM at two seeded-random steps, each attempt exits
75 after checkpointing; then SIGTERM at a third random step and a SIGKILL as soon as the
checkpoint's staging directory appears (the end of a grace period during the write); then a
last attempt to the end. Each attempt resumes from the checkpoint of the attempt before it, the
torn one never. The final metrics, the final model and the MLflow history (one point per step)
are those of the uninterrupted run, to the bit: a deterministic single-process CPU run.

A ZeRO-3 run on two ranks (torchrun, DeepSpeed on CPU), stopped in its second epoch and
resumed, ends with the uninterrupted two-rank run's tokens, metrics and weights. The fast tests
at the top check the checkpoint directory rules on the filesystem.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures.tiny_hub import TinyHub, tiny_run_config
from xstilts.trainer.checkpoints import (
    PARTIAL_PREFIX,
    TRAINER_STATE,
    load_loss_window,
    newest_checkpoint,
    publish,
    remove_partial_checkpoints,
    save_loss_window,
    staging_dir,
)
from xstilts.trainer.config import ExitCode, RunConfig, RunResult
from xstilts.trainer.rundir import RunDir
from xstilts.trainer.train import run

# Enough steps that progress.json, written once a second (some 20-60 steps here), still lets the
# signals come at steps spread over the run; 7 dev evaluations, so the best checkpoint moves.
HYPERPARAMETERS = {"max_steps": 400, "batch_size": 4}
SEED = 6  # picks the steps at which the signals come
KILL_TRIES = 3  # a kill that comes after the rename did not land in the write: try again later
TIMINGS = {"tokens_per_second"}  # the one logged metric that measures the machine, not the run


# --- the checkpoint directory (fast) -----------------------------------------------------------


def complete_checkpoint(root: Path, step: int) -> Path:
    staged = staging_dir(root, step)
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(b"weights")
    (staged / TRAINER_STATE).write_text("{}")
    final = root / f"checkpoint-{step}"
    publish(staged, final)
    return final


def test_only_complete_checkpoints_count_and_partials_are_removed(tmp_path: Path) -> None:
    assert newest_checkpoint(tmp_path / "none") is None
    complete_checkpoint(tmp_path, 10)
    newest = complete_checkpoint(tmp_path, 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-20"]  # no staging left
    staging_dir(tmp_path, 30).mkdir(parents=True)  # a save killed midway, complete files and all
    (staging_dir(tmp_path, 30) / TRAINER_STATE).write_text("{}")
    (tmp_path / "checkpoint-40").mkdir()  # torn in place by a writer that did not stage
    assert newest_checkpoint(tmp_path) == str(newest)
    assert remove_partial_checkpoints(tmp_path) == [tmp_path / f"{PARTIAL_PREFIX}checkpoint-30"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-20", "checkpoint-40"]
    assert newest_checkpoint(tmp_path) == str(newest)


def test_publishing_a_step_again_replaces_the_older_copy(tmp_path: Path) -> None:
    complete_checkpoint(tmp_path, 10)
    staged = staging_dir(tmp_path, 10)
    staged.mkdir(parents=True)
    (staged / TRAINER_STATE).write_text('{"again": true}')
    publish(staged, tmp_path / "checkpoint-10")
    assert json.loads((tmp_path / "checkpoint-10" / TRAINER_STATE).read_text()) == {"again": True}
    assert not (tmp_path / "checkpoint-10" / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-10"]


def test_the_loss_window_is_restored_only_for_the_same_number_of_ranks(tmp_path: Path) -> None:
    save_loss_window(tmp_path, rank=1, world_size=2, loss_sum=3.0625, since_step=48)
    assert load_loss_window(tmp_path, rank=1, world_size=2) == (3.0625, 48)
    assert load_loss_window(tmp_path, rank=1, world_size=4) is None  # resumed on more GPUs
    assert load_loss_window(tmp_path, rank=0, world_size=2) is None  # not saved


# --- the scenario (slow) -----------------------------------------------------------------------


@dataclass
class Attempt:
    code: int
    output: str
    signalled_at: int  # the step progress.json showed when SIGTERM was sent
    checkpoint: str | None  # the newest complete checkpoint after the attempt
    partials: list[str]  # staging directories left behind


def launch(config: RunConfig, processes: int = 1) -> subprocess.Popen[str]:
    run_json = Path(config.storage_root) / "run.json"
    run_json.parent.mkdir(parents=True, exist_ok=True)
    run_json.write_text(config.to_json())
    trainer = ["-m", "xstilts.trainer", str(run_json)]
    command = ([sys.executable, "-m", "xstilts.trainer.launch", "--standalone", f"--nproc_per_node={processes}",
                *trainer] if processes > 1 else [sys.executable, *trainer])
    env = os.environ | {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def progress_step(config: RunConfig) -> int:
    try:
        return int(json.loads((Path(config.run_dir) / "progress.json").read_text())["step"])
    except (OSError, ValueError, KeyError):  # not there yet, or replaced while read
        return -1


def interrupt(config: RunConfig, at_step: int, kill_in_write: bool = False, processes: int = 1) -> Attempt:
    """One attempt: SIGTERM once progress.json shows `at_step`; with `kill_in_write`, SIGKILL
    as soon as a checkpoint's staging directory appears."""
    process = launch(config, processes)
    while (step := progress_step(config)) < at_step:
        assert process.poll() is None, f"the run ended before step {at_step}:\n{process.communicate()[0][-4000:]}"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    checkpoints = RunDir.of(config).resume
    while kill_in_write and process.poll() is None:
        if checkpoints.is_dir() and any(p.name.startswith(PARTIAL_PREFIX) for p in checkpoints.iterdir()):
            process.kill()
            break
    output, _ = process.communicate(timeout=300)
    partials = sorted(p.name for p in checkpoints.glob(f"{PARTIAL_PREFIX}*"))
    return Attempt(process.returncode, output, step, newest_checkpoint(checkpoints), partials)


@dataclass
class Preempted:
    config: RunConfig
    attempts: list[Attempt]  # the interrupted ones, the killed one last
    final: Attempt
    result: RunResult


def tiny_target_run(hub: TinyHub, root: Path, tracking_uri: str) -> RunConfig:
    return tiny_run_config(hub, root, ("xnli",), stage="target", tracking_uri=tracking_uri,
                           experiment=f"preemption-{uuid.uuid4().hex[:8]}", hyperparameters=HYPERPARAMETERS)


@pytest.fixture(scope="module")
def tracking_uri(_mlflow_server_process) -> str:  # type: ignore[no-untyped-def]
    _mlflow_server_process.start()
    return str(_mlflow_server_process.uri)


@pytest.fixture(scope="module")
def uninterrupted(tiny_hub: TinyHub, tiny_cache: Path, tracking_uri: str,
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, RunResult]:
    config = tiny_target_run(tiny_hub, tmp_path_factory.mktemp("uninterrupted"), tracking_uri)
    return config, run(config)


@pytest.fixture(scope="module")
def preempted(tiny_hub: TinyHub, tiny_cache: Path, tracking_uri: str, uninterrupted: tuple[RunConfig, RunResult],
              tmp_path_factory: pytest.TempPathFactory) -> Preempted:
    config = tiny_target_run(tiny_hub, tmp_path_factory.mktemp("preempted"), tracking_uri)
    rng = random.Random(SEED)
    attempts: list[Attempt] = []
    stopped = 0
    for low, high in ((20, 100), (150, 230)):
        attempts.append(interrupt(config, max(rng.randrange(low, high), stopped + 5)))
        assert attempts[-1].checkpoint, attempts[-1].output[-4000:]
        stopped = int(attempts[-1].checkpoint.rsplit("-", 1)[1])
    for _ in range(KILL_TRIES):
        killed = interrupt(config, max(rng.randrange(270, 330), stopped + 5), kill_in_write=True)
        attempts.append(killed)
        if killed.partials:
            break
        # the kill came after the rename: a complete checkpoint, resumed from like any other
        assert killed.checkpoint, killed.output[-4000:]
        stopped = int(killed.checkpoint.rsplit("-", 1)[1])
    final_process = launch(config)
    output, _ = final_process.communicate(timeout=300)
    final = Attempt(final_process.returncode, output, -1, None, [])
    assert final.code == ExitCode.OK, output[-4000:]
    return Preempted(config, attempts, final, RunResult.model_validate_json(RunDir.of(config).result.read_text()))


@pytest.mark.slow
def test_sigterm_at_random_steps_resumes_each_time_and_ends_exactly_as_the_uninterrupted_run(
        preempted: Preempted, uninterrupted: tuple[RunConfig, RunResult]) -> None:
    from safetensors.torch import load_file

    config, expected = uninterrupted
    run_id = preempted.config.run_id
    terminated = [a for a in preempted.attempts if a.code == ExitCode.INTERRUPTED]
    assert len(terminated) >= 2, [a.code for a in preempted.attempts]
    for previous, attempt in zip([None, *preempted.attempts], preempted.attempts, strict=False):
        if attempt.code == ExitCode.INTERRUPTED:
            assert f"run {run_id} stopped by SIGTERM; a retry resumes from its last checkpoint" in attempt.output
            # it stopped at the end of the step it was in, or a few steps later (progress.json is
            # written once a second), never before
            assert attempt.checkpoint and int(attempt.checkpoint.rsplit("-", 1)[1]) >= attempt.signalled_at
        if previous is not None:
            assert f"resuming from {previous.checkpoint}" in attempt.output
    assert f"resuming from {preempted.attempts[-1].checkpoint}" in preempted.final.output

    result = preempted.result
    assert result.train_steps == expected.train_steps == HYPERPARAMETERS["max_steps"]
    assert result.tokens_seen == expected.tokens_seen
    # dev accuracy, every language's test accuracy: exactly equal, not approximately
    assert result.metrics == expected.metrics
    assert result.languages == expected.languages
    ours, theirs = (load_file(str(RunDir.of(c).model / "model.safetensors")) for c in (preempted.config, config))
    assert ours.keys() == theirs.keys()
    assert all(ours[k].equal(theirs[k]) for k in ours), "the final model differs from the uninterrupted run's"


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_is_never_resumed_from(preempted: Preempted) -> None:
    killed = preempted.attempts[-1]
    assert killed.code == -signal.SIGKILL, killed.output[-4000:]
    assert killed.partials, f"no kill in {KILL_TRIES} tries landed inside a checkpoint write"
    # the torn checkpoint was not renamed into place: the newest complete one is older (the
    # previous attempt's, or one of this attempt's dev evaluations), and the last attempt
    # removed the torn one and resumed from that
    torn_step = int(killed.partials[0].rsplit("-", 1)[1])
    assert killed.checkpoint and int(killed.checkpoint.rsplit("-", 1)[1]) < torn_step
    assert "a checkpoint whose writing was interrupted" in preempted.final.output
    assert f"resuming from {killed.checkpoint}" in preempted.final.output


@pytest.mark.slow
def test_mlflow_has_each_step_once_with_the_uninterrupted_values(
        preempted: Preempted, uninterrupted: tuple[RunConfig, RunResult], tracking_uri: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    ours, theirs = (client.get_run(r.mlflow_run_id) for r in (preempted.result, uninterrupted[1]))
    experiment = ours.info.experiment_id
    assert len(client.search_runs([experiment], f"tags.`xstilts.run_id` = '{preempted.config.run_id}'")) == 1
    assert ours.info.status == "FINISHED"
    # the killed attempt logged steps past its last complete checkpoint, and the last attempt
    # trained them again: still one point per step, and the same as without interruptions
    assert set(ours.data.metrics) == set(theirs.data.metrics)
    for key in set(ours.data.metrics) - TIMINGS:
        history = [(m.step, m.value) for m in client.get_metric_history(ours.info.run_id, key)]
        steps = [step for step, _ in history]
        assert len(steps) == len(set(steps)), f"{key} has a step twice: {sorted(steps)}"
        assert sorted(history) == sorted((m.step, m.value) for m in client.get_metric_history(theirs.info.run_id, key)
                                         ), key


@pytest.mark.slow
def test_a_zero3_run_on_two_ranks_resumes_mid_epoch_exactly(tiny_hub: TinyHub, tiny_cache: Path,
                                                            tiny_tracking_uri: str, tmp_path: Path) -> None:
    """DeepSpeed's own checkpoint (each rank's ZeRO-3 shards) is staged and renamed with the rest,
    and a resume on several ranks continues with the batches of the epoch it stopped in."""
    from safetensors.torch import load_file

    hp = {"max_steps": 100, "batch_size": 4}  # 60 steps an epoch: the stop falls in the second
    straight, preempted = (tiny_run_config(
        tiny_hub, tmp_path / name, ("mnli",), tracking_uri=tiny_tracking_uri, experiment=f"preemption-zero3-{name}",
        hyperparameters=hp, deepspeed={"zero_stage": 3}, resources={"processes_per_node": 2})
        for name in ("straight", "preempted"))
    output, _ = launch(straight, processes=2).communicate(timeout=600)
    assert RunDir.of(straight).result.exists(), output[-4000:]

    stopped = interrupt(preempted, 62, processes=2)
    assert stopped.code == ExitCode.INTERRUPTED, stopped.output[-4000:]  # torchrun's 1, passed on as a retry
    assert f"run {preempted.run_id} stopped by SIGTERM" in stopped.output, stopped.output[-4000:]
    assert stopped.checkpoint and 60 < (step := int(stopped.checkpoint.rsplit("-", 1)[1])) < 100
    files = {p.name for p in Path(stopped.checkpoint).iterdir()}
    assert {f"global_step{step}", "latest", "rng_state_0.pth", "rng_state_1.pth", "loss_window_0.json",
            "loss_window_1.json"} <= files, files
    assert not stopped.partials

    output, _ = launch(preempted, processes=2).communicate(timeout=600)
    assert f"resuming from {stopped.checkpoint}" in output and RunDir.of(preempted).result.exists(), output[-4000:]
    ours, theirs = (RunResult.model_validate_json(RunDir.of(c).result.read_text()) for c in (preempted, straight))
    assert ours.tokens_seen == theirs.tokens_seen and ours.metrics == theirs.metrics
    ours_weights, their_weights = (load_file(str(RunDir.of(c).model / "model.safetensors"))
                                   for c in (preempted, straight))
    assert all(ours_weights[k].equal(their_weights[k]) for k in their_weights)
