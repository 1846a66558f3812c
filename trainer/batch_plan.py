"""How a run's global batch is computed, how many steps it trains, when it evaluates, and the
DeepSpeed configuration: pure functions of the RunConfig, the world size and the data sizes.

`batch_size` is global (examples per optimizer step, summed over ranks and accumulation), so
micro batch × world size × accumulation = batch_size exactly, or the run is invalid. No torch
import: the checks run before the training stack is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from xstilts.trainer.config import HyperParameters, RunConfig, choose_micro_batch

# Default micro batch: as many rows as fit in this many tokens (rows × choices × max length),
# at most the per-rank batch. Big enough to keep a GPU busy at max length 128 (64 rows),
# small enough for 4-choice multiple choice at 256 tokens (8 rows).
TOKENS_PER_MICRO_BATCH = 8192
MAX_EVALUATIONS = 10  # dev evaluations (and best-checkpoint candidates) per run


class InvalidRun(ValueError):
    """The RunConfig cannot run as given (never retried)."""


def per_rank_batch(hp: HyperParameters, world_size: int) -> int:
    if hp.batch_size % world_size:
        raise InvalidRun(
            f"hyperparameters.batch_size {hp.batch_size} is not a multiple of the {world_size} processes: it is the"
            f" global batch; use a multiple of {world_size} or change the process count")
    return hp.batch_size // world_size


def check_batch_layout(config: RunConfig, world_size: int) -> None:
    """Fails early (before any model is loaded) on a batch that cannot be split evenly."""
    per_rank = per_rank_batch(config.hyperparameters, world_size)
    micro = config.resources.micro_batch_size
    if micro is not None and per_rank % micro:
        raise InvalidRun(
            f"resources.micro_batch_size {micro} does not divide the per-process batch {per_rank}"
            f" (batch_size {config.hyperparameters.batch_size} / {world_size} processes), so gradient accumulation"
            f" would not be a whole number; choose a divisor of {per_rank}")


def default_micro_batch(per_rank: int, row_tokens: int) -> int:
    """The largest divisor of the per-rank batch that fits TOKENS_PER_MICRO_BATCH."""
    cap = max(1, TOKENS_PER_MICRO_BATCH // max(row_tokens, 1))
    return max(d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= cap)


@dataclass(frozen=True)
class StepPlan:
    """How one run steps: its batch layout over processes, its length, and how often it
    evaluates and logs."""

    world_size: int
    micro_batch_size: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int
    eval_steps: int
    logging_steps: int


def plan_steps(config: RunConfig, world_size: int, train_sizes: Sequence[int], row_tokens: int,
               gpu_memory_gb: float | None = None, parameters: int | None = None,
               precision: str | None = None) -> StepPlan:
    """Steps from epochs (or max_steps), the micro batch and accumulation from the global
    batch, and how often to evaluate: once per epoch, between 1 and MAX_EVALUATIONS times.

    Without resources.micro_batch_size the micro batch is chosen: on a GPU (its memory and the
    model's parameter count given) the most rows whose activations fit beside the model states
    (`choose_micro_batch`; `precision` is the resolved one, default the config's), else the most
    rows within TOKENS_PER_MICRO_BATCH."""
    hp = config.hyperparameters
    per_rank = per_rank_batch(hp, world_size)
    micro = config.resources.micro_batch_size
    if micro is None and gpu_memory_gb and parameters:
        micro = choose_micro_batch(parameters, row_tokens, gpu_memory_gb, per_rank, world_size, config.deepspeed,
                                   bytes_per_value=4 if (precision or config.precision) == "fp32" else 2)
    micro = micro or default_micro_batch(per_rank, row_tokens)
    check_batch_layout(config, world_size)
    steps_per_epoch = max(1, math.ceil(sum(train_sizes) / hp.batch_size))
    if config.mlm is not None:  # the tasks keep their epochs: MLM steps come on top, a ratio share of all
        steps_per_epoch = max(1, math.ceil(steps_per_epoch / (1 - config.mlm.ratio)))
    total = hp.max_steps or max(1, math.ceil(hp.epochs * steps_per_epoch))
    evaluations = min(MAX_EVALUATIONS, max(1, math.ceil(total / steps_per_epoch)))
    return StepPlan(
        world_size=world_size, micro_batch_size=micro, accumulation=per_rank // micro,
        steps_per_epoch=steps_per_epoch, total_steps=total,
        eval_steps=max(1, math.ceil(total / evaluations)),
        logging_steps=max(1, min(50, total // 20)),
    )


# --- DeepSpeed ---------------------------------------------------------------------------------


def deepspeed_config(config: RunConfig) -> dict[str, Any] | None:
    """The DeepSpeed config for the run's ZeRO settings, "auto" wherever the Trainer knows the
    value (batch sizes, accumulation, clipping, precision, learning rate); None for ZeRO-0,
    which is plain data parallelism without DeepSpeed."""
    ds = config.deepspeed
    if ds.zero_stage == 0:
        return None
    zero: dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}
    if ds.zero_stage == 3:
        zero |= {"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                 # the final checkpoint is a plain from_pretrained directory, so gather the weights
                 "stage3_gather_16bit_weights_on_model_save": True}
    if ds.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    out: dict[str, Any] = {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }
    if ds.offload != "none":
        # With offload DeepSpeed's own AdamW runs the step on the CPU (DeepSpeedCPUAdam).
        out["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                        "weight_decay": "auto"}}
    return out


def check_runtime(config: RunConfig, cuda: bool, deepspeed_available: bool) -> None:
    """What the machine must offer for the config: a GPU for fp16 and for offload (it moves
    state from GPU memory to CPU memory), DeepSpeed for ZeRO 1-3."""
    if config.precision == "fp16" and not cuda:
        raise InvalidRun("precision 'fp16' needs a GPU; use 'auto' (fp32 on CPU) or 'fp32'")
    if config.deepspeed.offload != "none" and not cuda:
        raise InvalidRun(
            f"deepspeed.offload {config.deepspeed.offload!r} moves state from GPU to CPU memory and this run has"
            " no GPU; set offload 'none'")
    if config.deepspeed.zero_stage > 0 and not deepspeed_available:
        raise InvalidRun(f"deepspeed.zero_stage {config.deepspeed.zero_stage} needs the deepspeed package"
                         " (the [train] extra); install it or set zero_stage 0")


def mixed_precision(config: RunConfig, cuda: bool, bf16_supported: bool) -> str:
    """'bf16', 'fp16' or 'fp32': "auto" is bf16 on a GPU that has it, fp32 elsewhere."""
    if config.precision == "auto":
        return "bf16" if cuda and bf16_supported else "fp32"
    return config.precision
