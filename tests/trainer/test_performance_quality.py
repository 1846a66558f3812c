"""The speed-ups leave results unchanged, and their parts do what they claim.

- Quality: the same runs with and without the padding optimisations (length-grouped batches
  padded to their own longest row, against random batches padded to max_seq_length) reach the
  same English dev accuracy within seed noise.
- The automatic micro batch fits memory and divides the batch; the attention kernel is SDPA on a
  CPU; evaluation batches stay nearly free of padding even when a split is small against the
  token budget; the training set reads a batch at once; tokenizing with worker processes gives
  the same features; throughput counts training steps, not evaluations.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fixtures.tiny_hub import TinyHub, tiny_run_config
from xstilts.trainer.batch_plan import default_micro_batch, plan_steps
from xstilts.trainer.config import (
    DeepSpeedSettings,
    HyperParameters,
    RunConfig,
    choose_deepspeed,
    choose_micro_batch,
    model_state_bytes_per_gpu,
)

SEEDS = (0, 1, 2)


# --- quality --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dev_accuracy_with_and_without_the_padding_optimisations_agrees_within_seed_noise(
        tiny_hub: TinyHub, tiny_cache: Path, tiny_tracking_uri: str, tmp_path: Path) -> None:
    from xstilts.trainer.train import Batching, run

    accuracy: dict[str, list[float]] = {}
    for name, batching in (("optimised", Batching()),
                           ("padded", Batching(length_grouping=False, dynamic_padding=False))):
        accuracy[name] = []
        for seed in SEEDS:
            config = tiny_run_config(tiny_hub, tmp_path / name, ("mnli",), tracking_uri=tiny_tracking_uri,
                                     experiment=f"quality-{name}", seed=seed, hyperparameters={"epochs": 3})
            accuracy[name].append(run(config, batching=batching).metrics["dev.accuracy"])
    optimised, padded = accuracy["optimised"], accuracy["padded"]
    # Both learn the task (chance is 1/3), so agreeing is not agreeing on noise.
    assert statistics.mean(optimised) >= 0.6 and statistics.mean(padded) >= 0.6, accuracy
    # Seed noise: the widest spread of one configuration over its seeds, plus two dev examples
    # (a configuration whose seeds all agree would otherwise allow no difference at all).
    noise = max(max(optimised) - min(optimised), max(padded) - min(padded)) + 2 / tiny_hub.sizes["validation"]
    assert abs(statistics.mean(optimised) - statistics.mean(padded)) <= noise, accuracy


def test_the_plain_setting_pads_to_max_length_in_random_batches() -> None:
    """What the quality test compares against really is the slow setting."""
    from xstilts.trainer.batching import Collator, MultiTaskBatchSampler
    from xstilts.trainer.train import Batching

    rng = random.Random(0)
    lengths = [min(128, max(10, round(rng.lognormvariate(3.7, 0.45)))) for _ in range(3200)]

    def padding(batching: Batching) -> float:
        sampler = MultiTaskBatchSampler([lengths], 32, 32, steps_per_epoch=100,
                                        megabatch_factor=batching.megabatch_factor)
        collate = Collator(1, pad_to_multiple_of=batching.pad_to_multiple_of(128, cuda=False))
        real = padded = 0
        for batch in sampler:
            mask = collate([{"input_ids": [5] * lengths[i]} for i in batch])["attention_mask"]
            real, padded = real + int(mask.sum()), padded + mask.numel()
        return 1 - real / padded

    assert padding(Batching()) < 0.05
    assert padding(Batching(length_grouping=False)) > 0.25  # random batches, each to its longest row
    assert padding(Batching(length_grouping=False, dynamic_padding=False)) > 0.6  # every row to 128


# --- automatic micro batch ------------------------------------------------------------------------

XLMR = {"base": 278_000_000, "large": 560_000_000, "xl": 3_500_000_000, "xxl": 10_700_000_000}


def test_the_micro_batch_divides_the_batch_and_grows_with_memory() -> None:
    previous = 0
    for memory in (16, 24, 40, 80, 141):
        micro = choose_micro_batch(XLMR["large"], 4 * 128, memory, per_rank_batch=32)
        assert 32 % micro == 0 and micro >= previous
        previous = micro
    assert previous == 32  # an H200 holds the whole batch of 4-choice rows
    assert choose_micro_batch(XLMR["large"], 128, 80, per_rank_batch=24) in (1, 2, 3, 4, 6, 8, 12, 24)


def test_the_micro_batch_leaves_room_for_the_model_states() -> None:
    """Activations get what the model states leave: a tighter ZeRO stage frees memory for rows,
    and when the states alone fill the GPU one row is all there is."""
    xxl, world = XLMR["xxl"], 8
    zero2 = choose_micro_batch(xxl, 512, 80, 4, world, DeepSpeedSettings(zero_stage=2))
    zero3 = choose_micro_batch(xxl, 512, 80, 4, world, DeepSpeedSettings(zero_stage=3))
    assert zero2 <= zero3
    assert model_state_bytes_per_gpu(xxl, world, 0) > 80 * 2**30
    assert choose_micro_batch(xxl, 128, 80, 32, world, DeepSpeedSettings(zero_stage=0)) == 1


def test_fp32_activations_take_twice_the_memory() -> None:
    bf16 = choose_micro_batch(XLMR["large"], 512, 24, 64)
    fp32 = choose_micro_batch(XLMR["large"], 512, 24, 64, bytes_per_value=4)
    assert fp32 < bf16


def test_every_xlmr_size_gets_a_micro_batch_on_the_gpus_zero_auto_picks() -> None:
    for name, gpus in (("base", 1), ("large", 1), ("xl", 4), ("xxl", 8)):
        ds = choose_deepspeed(XLMR[name], 80, gpus)
        micro = choose_micro_batch(XLMR[name], 128, 80, 32 // gpus, gpus, ds)
        assert micro >= 1 and (32 // gpus) % micro == 0, name
    assert choose_micro_batch(XLMR["base"], 128, 80, 32) == 32  # base is small: no accumulation


def test_the_schedule_uses_the_gpu_micro_batch_only_with_gpu_facts(tiny_hub: TinyHub, tmp_path: Path) -> None:
    config = tiny_run_config(tiny_hub, tmp_path, ("mnli",), hyperparameters={"batch_size": 64})
    cpu = plan_steps(config, 1, [1000], 4 * 512)
    assert cpu.micro_batch_size == default_micro_batch(64, 4 * 512)  # the token budget: 4 rows
    gpu = plan_steps(config, 1, [1000], 4 * 512, gpu_memory_gb=80, parameters=XLMR["large"])
    assert gpu.micro_batch_size == choose_micro_batch(XLMR["large"], 4 * 512, 80, 64)
    assert gpu.micro_batch_size * gpu.accumulation == 64
    fixed = RunConfig.model_validate(config.model_dump() | {"resources": {"micro_batch_size": 2}})
    assert plan_steps(fixed, 1, [1000], 512, gpu_memory_gb=80, parameters=XLMR["large"]).micro_batch_size == 2


def test_hyperparameters_are_untouched_by_the_micro_batch() -> None:
    """The micro batch is layout, not identity: the run id does not move with it."""
    base = RunConfig.model_validate({"model": "m", "stage": "intermediate", "tasks": ["mnli"],
                                     "hyperparameters": HyperParameters().model_dump()})
    other = RunConfig.model_validate(base.model_dump() | {"resources": {"micro_batch_size": 4}})
    assert base.run_id == other.run_id


# --- kernels and loading --------------------------------------------------------------------------


def test_the_encoder_uses_sdpa_on_a_cpu_and_its_size_is_counted_without_loading(tiny_hub: TinyHub) -> None:
    from transformers import XLMRobertaModel
    from xstilts.trainer.model import attention_kernel, load_encoder, parameter_count_of

    encoder = load_encoder(tiny_hub.model)
    assert encoder.config._attn_implementation == "sdpa"
    assert parameter_count_of(tiny_hub.model) == sum(p.numel() for p in encoder.parameters())
    # flash-attention-2 needs a GPU, half precision and the flash_attn package
    assert attention_kernel(XLMRobertaModel, cuda=False, half_precision=True) == "sdpa"
    assert attention_kernel(XLMRobertaModel, cuda=True, half_precision=False) == "sdpa"

    class NoFusedAttention:
        _supports_sdpa = False

    assert attention_kernel(NoFusedAttention, cuda=False, half_precision=False) == "eager"


# --- batches ------------------------------------------------------------------------------------


def test_evaluation_batches_stay_tight_when_a_split_is_small_against_the_budget() -> None:
    from xstilts.trainer.batching import FEW_PAD_TOKENS, MAX_EVAL_PADDING, eval_batches

    rng = random.Random(1)
    lengths = [min(128, max(10, round(rng.lognormvariate(3.7, 0.45)))) for _ in range(300)]
    batches = eval_batches(lengths, max_tokens=16384, max_rows=1024)  # the budget would hold every row
    assert sorted(i for b in batches for i in b) == list(range(300))
    for b in batches:
        width = max(lengths[i] for i in b)
        assert all(width - lengths[i] <= max(FEW_PAD_TOKENS, MAX_EVAL_PADDING * width) for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert 1 - sum(lengths) / padded < 0.06


def test_the_training_set_reads_a_batch_at_once_as_it_reads_rows() -> None:
    import datasets
    from xstilts.trainer.batching import TrainSet

    classify = datasets.Dataset.from_dict({"input_ids": [[0, i, 2] for i in range(20)],
                                           "label": [i % 3 for i in range(20)]})
    tag = datasets.Dataset.from_dict({"input_ids": [[0, i] for i in range(8)],
                                      "labels": [[-100, i % 2] for i in range(8)]})
    train = TrainSet([classify, tag])
    batch = [27, 3, 20, 19, 0, 25]
    assert train.__getitems__(batch) == [train[i] for i in batch]


def test_tokenizing_in_worker_processes_gives_the_same_features(tiny_hub: TinyHub) -> None:
    import json

    from transformers import AutoTokenizer
    from xstilts.trainer.features import encode, tokenizer_workers
    from xstilts.trainer.tasks import TASKS

    task = TASKS["mnli"]
    rows = [json.loads(line) for line in (tiny_hub.data["mnli"] / "train.jsonl").read_text().splitlines()]
    examples = [task.normalize(r) for r in rows] * 10  # 2,400 examples: three chunks of 1,000
    tokenizer = AutoTokenizer.from_pretrained(tiny_hub.model)
    serial = encode(task, examples, tokenizer, 64, workers=1)
    assert encode(task, examples, tokenizer, 64, workers=2) == serial
    assert serial["example_index"] == list(range(len(examples)))
    assert tokenizer_workers(len(examples)) == 1  # too small to be worth worker processes


# --- what throughput counts ---------------------------------------------------------------------


def test_throughput_counts_training_steps_not_evaluations_or_saves(tmp_path: Path) -> None:
    from xstilts.trainer.interrupt import Interruption
    from xstilts.trainer.loop import RunCallback
    from xstilts.trainer.rundir import ProgressFile

    callback = RunCallback(ProgressFile(tmp_path / "progress.json"), tracker=None, interruption=Interruption())
    state = SimpleNamespace(num_input_tokens_seen=0, global_step=0, max_steps=2, epoch=0.0)
    args = SimpleNamespace(world_size=1)
    callback.on_train_begin(args, state, SimpleNamespace())
    time.sleep(0.05)  # a step
    state.global_step = 1
    callback.on_step_end(args, state, SimpleNamespace())
    with callback.pause():  # an evaluation and a save
        time.sleep(0.3)
    time.sleep(0.05)  # another step
    state.global_step = 2
    callback.on_step_end(args, state, SimpleNamespace())
    with callback.pause():  # the final evaluation: after the last step, never counted
        time.sleep(0.3)
    assert 0.1 <= callback.train_seconds < 0.3


def test_an_fp32_run_gets_a_micro_batch_for_fp32_activations(tiny_hub: TinyHub, tmp_path: Path) -> None:
    """"auto" resolves to fp32 on a GPU without bf16: the resolved precision sizes the rows."""
    config = tiny_run_config(tiny_hub, tmp_path, ("mnli",), hyperparameters={"batch_size": 64})
    gpu = {"gpu_memory_gb": 24, "parameters": XLMR["large"]}
    fp32 = plan_steps(config, 1, [1000], 512, **gpu, precision="fp32").micro_batch_size
    assert fp32 == choose_micro_batch(XLMR["large"], 512, 24, 64, bytes_per_value=4)
    assert fp32 < plan_steps(config, 1, [1000], 512, **gpu, precision="bf16").micro_batch_size
