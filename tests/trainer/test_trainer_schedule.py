"""Global batch layout, steps, evaluation cadence and the DeepSpeed config, from a RunConfig."""

from __future__ import annotations

import pytest
from xstilts.trainer.batch_plan import (
    InvalidRun,
    check_batch_layout,
    check_runtime,
    deepspeed_config,
    default_micro_batch,
    mixed_precision,
    plan_steps,
)
from xstilts.trainer.config import DeepSpeedSettings, HyperParameters, Resources, RunConfig


def config(**overrides: object) -> RunConfig:
    base: dict[str, object] = {"model": "m", "stage": "intermediate", "tasks": ("mnli",)}
    return RunConfig.model_validate(base | overrides)


def test_global_batch_splits_into_micro_batches_ranks_and_accumulation() -> None:
    c = config(hyperparameters=HyperParameters(batch_size=32, epochs=3), resources=Resources(micro_batch_size=4))
    s = plan_steps(c, world_size=2, train_sizes=[1000], row_tokens=128)
    assert (s.micro_batch_size, s.accumulation) == (4, 4)  # 4 rows × 2 ranks × 4 steps = 32
    assert s.steps_per_epoch == 32 and s.total_steps == 96  # ceil(1000 / 32) per epoch
    assert s.eval_steps == 32  # once per epoch


def test_default_micro_batch_fits_a_token_budget_and_divides_the_batch() -> None:
    assert default_micro_batch(32, 128) == 32
    assert default_micro_batch(32, 4 * 256) == 8  # 4-choice multiple choice at 256 tokens
    assert default_micro_batch(24, 4 * 512) == 4  # the largest divisor of 24 within 8192 tokens
    assert default_micro_batch(7, 100_000) == 1


def test_max_steps_overrides_epochs_and_evaluations_are_capped() -> None:
    c = config(hyperparameters=HyperParameters(batch_size=8, max_steps=1000))
    s = plan_steps(c, 1, [80], 64)
    assert s.total_steps == 1000 and s.eval_steps == 100  # at most 10 evaluations
    short = plan_steps(config(hyperparameters=HyperParameters(batch_size=8, epochs=0.5)), 1, [80], 64)
    assert short.total_steps == 5 and short.eval_steps == 5


def test_a_batch_that_cannot_be_split_evenly_is_invalid() -> None:
    with pytest.raises(InvalidRun, match="batch_size 32 is not a multiple of the 3 processes"):
        check_batch_layout(config(), world_size=3)
    with pytest.raises(InvalidRun, match="micro_batch_size 5 does not divide the per-process batch 16"):
        check_batch_layout(config(resources=Resources(micro_batch_size=5)), world_size=2)


def test_deepspeed_config_per_zero_stage() -> None:
    assert deepspeed_config(config()) is None  # ZeRO-0: plain data parallelism
    two = deepspeed_config(config(deepspeed=DeepSpeedSettings(zero_stage=2)))
    assert two is not None and two["zero_optimization"]["stage"] == 2 and "optimizer" not in two
    assert two["train_batch_size"] == "auto" and two["bf16"] == {"enabled": "auto"}
    three = deepspeed_config(config(deepspeed=DeepSpeedSettings(zero_stage=3, offload="all")))
    assert three is not None
    zero = three["zero_optimization"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert three["optimizer"]["type"] == "AdamW"


def test_what_the_machine_must_offer() -> None:
    check_runtime(config(deepspeed=DeepSpeedSettings(zero_stage=3)), cuda=False, deepspeed_available=True)
    with pytest.raises(InvalidRun, match="offload 'optimizer' moves state from GPU to CPU memory"):
        check_runtime(config(deepspeed=DeepSpeedSettings(zero_stage=2, offload="optimizer")), cuda=False,
                      deepspeed_available=True)
    with pytest.raises(InvalidRun, match="precision 'fp16' needs a GPU"):
        check_runtime(config(precision="fp16"), cuda=False, deepspeed_available=True)
    with pytest.raises(InvalidRun, match="needs the deepspeed package"):
        check_runtime(config(deepspeed=DeepSpeedSettings(zero_stage=1)), cuda=True, deepspeed_available=False)


def test_auto_precision_is_bf16_on_a_gpu_that_has_it_and_fp32_elsewhere() -> None:
    assert mixed_precision(config(), cuda=True, bf16_supported=True) == "bf16"
    assert mixed_precision(config(), cuda=True, bf16_supported=False) == "fp32"
    assert mixed_precision(config(), cuda=False, bf16_supported=False) == "fp32"
    assert mixed_precision(config(precision="fp16"), cuda=True, bf16_supported=True) == "fp16"
