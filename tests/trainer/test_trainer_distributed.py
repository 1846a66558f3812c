"""Real DeepSpeed and real preemption, with the trainer as the cluster starts it:

- the same tiny run under `DS_ACCELERATOR=cpu torchrun --nproc_per_node=2` with ZeRO-2 and
  ZeRO-3 completes and matches the single-process run (the global batch is split, not changed);
- SIGTERM mid-training saves a checkpoint and exits with ExitCode.INTERRUPTED; started again,
  the run resumes from that checkpoint and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures.tiny_hub import TinyHub, tiny_run_config
from xstilts.trainer.config import ExitCode, RunConfig, RunResult
from xstilts.trainer.rundir import RunDir
from xstilts.trainer.train import newest_checkpoint, run

pytestmark = pytest.mark.slow


def launch(config: RunConfig, run_json: Path, processes: int = 1) -> subprocess.Popen[str]:
    run_json.write_text(config.to_json())
    trainer = ["-m", "xstilts.trainer", str(run_json)]
    command = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                *trainer] if processes > 1 else [sys.executable, *trainer])
    env = os.environ | {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen[str], timeout: float = 900) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def encoder_weights(config: RunConfig) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(RunDir.of(config).model / "model.safetensors"))


@pytest.fixture(scope="module")
def single(tiny_hub: TinyHub, tiny_cache: Path, tiny_tracking_uri: str,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, RunResult]:
    config = tiny_run_config(tiny_hub, tmp_path_factory.mktemp("single"), ("mnli",), tracking_uri=tiny_tracking_uri,
                             experiment="trainer-zero-0", hyperparameters={"epochs": 3})
    return config, run(config)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_zero_on_two_ranks_matches_the_single_process_run(
        zero_stage: int, single: tuple[RunConfig, RunResult], tiny_hub: TinyHub, tiny_cache: Path,
        tiny_tracking_uri: str, tmp_path: Path) -> None:
    base, expected = single
    config = tiny_run_config(tiny_hub, tmp_path / "out", ("mnli",), tracking_uri=tiny_tracking_uri,
                             experiment=f"trainer-zero-{zero_stage}", hyperparameters={"epochs": 3},
                             deepspeed={"zero_stage": zero_stage}, resources={"processes_per_node": 2})
    assert config.run_id == base.run_id  # how many processes computed a run is not part of what it is
    code, output = finish(launch(config, tmp_path / "run.json", processes=2))
    assert code == ExitCode.OK, output[-4000:]
    result = RunResult.model_validate_json(RunDir.of(config).result.read_text())
    assert result.train_steps == expected.train_steps == 90
    assert result.tokens_seen == expected.tokens_seen  # both ranks' tokens, counted once
    assert result.metrics["dev.accuracy"] == pytest.approx(expected.metrics["dev.accuracy"], abs=0.05)
    # the same global batches, summed over two ranks instead of one: the same model up to rounding
    ours, theirs = encoder_weights(config), encoder_weights(base)
    assert set(ours) == set(theirs)
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    assert worst < 0.05, worst
    assert [h["task"] for h in json.loads((RunDir.of(config).model / "heads.json").read_text())["heads"]] == [
        "mnli"]


def wait_for_step(progress: Path, step: int, process: subprocess.Popen[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-4000:]
        try:
            if json.loads(progress.read_text())["step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {timeout} s")


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_to_the_same_end(
        tiny_hub: TinyHub, tiny_cache: Path, tiny_tracking_uri: str, tmp_path: Path) -> None:
    hp = {"max_steps": 300, "batch_size": 4}
    uninterrupted = run(tiny_run_config(tiny_hub, tmp_path / "straight", ("mnli",), tracking_uri=tiny_tracking_uri,
                                        experiment="trainer-straight", hyperparameters=hp))
    config = tiny_run_config(tiny_hub, tmp_path / "preempted", ("mnli",), tracking_uri=tiny_tracking_uri,
                             experiment="trainer-preempted", hyperparameters=hp)
    first = launch(config, tmp_path / "run.json")
    wait_for_step(Path(config.run_dir) / "progress.json", 20, first)
    first.send_signal(signal.SIGTERM)
    code, output = finish(first, timeout=120)
    assert code == ExitCode.INTERRUPTED, output[-4000:]
    assert f"run {config.run_id} stopped by SIGTERM; a retry resumes from its last checkpoint" in output
    checkpoint = newest_checkpoint(RunDir.of(config).resume)
    assert checkpoint is not None and not RunDir.of(config).result.exists()
    stopped_at = int(Path(checkpoint).name.split("-")[1])
    assert 20 <= stopped_at < 300

    code, output = finish(launch(config, tmp_path / "run.json"))
    assert code == ExitCode.OK, output[-4000:]
    assert f"resuming from {checkpoint}" in output
    resumed = RunResult.model_validate_json(RunDir.of(config).result.read_text())
    assert resumed.train_steps == uninterrupted.train_steps == 300
    # the resumed run skipped exactly the batches it had trained on: the same rows, the same tokens
    assert resumed.tokens_seen == uninterrupted.tokens_seen
    assert resumed.metrics["dev.accuracy"] == pytest.approx(uninterrupted.metrics["dev.accuracy"], abs=0.05)
