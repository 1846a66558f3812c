"""Length-grouped batches, multi-task sampling, evaluation batches and the collator."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from xstilts.trainer.batching import (
    Collator,
    MultiTaskBatchSampler,
    TrainSet,
    eval_batches,
    length_grouped_batches,
    task_probabilities,
)


def padded_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


@given(st.lists(st.integers(1, 200), min_size=1, max_size=400), st.integers(1, 33), st.integers(0, 10**6))
@settings(max_examples=60, deadline=None)
def test_length_grouped_batches_cover_every_row_once(lengths: list[int], batch_size: int, seed: int) -> None:
    batches = length_grouped_batches(lengths, batch_size, random.Random(seed))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    longest = max(max(lengths[i] for i in b) * len(b) for b in batches)
    assert max(lengths[i] for i in batches[0]) * len(batches[0]) == longest


def test_length_grouping_pads_far_less_than_random_batches() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(10, 128) for _ in range(5000)]
    grouped = length_grouped_batches(lengths, 32, random.Random(1))
    order = list(range(len(lengths)))
    random.Random(1).shuffle(order)
    shuffled = [order[i: i + 32] for i in range(0, len(order), 32)]
    real = sum(lengths)
    assert padded_tokens(grouped, lengths) < 1.1 * real
    assert padded_tokens(shuffled, lengths) > 1.4 * real


def test_task_probabilities_follow_the_temperature() -> None:
    assert task_probabilities([100, 300], 1.0) == pytest.approx([0.25, 0.75])
    assert task_probabilities([100, 400], 2.0) == pytest.approx([1 / 3, 2 / 3])
    assert task_probabilities([10, 10_000], 100.0)[0] == pytest.approx(0.5, abs=0.05)


def test_sampler_yields_global_batches_of_one_task_cut_into_micro_batches() -> None:
    sampler = MultiTaskBatchSampler([[5] * 40, [7] * 100], batch_size=8, micro_batch_size=2, steps_per_epoch=50)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 50 * 4
    for step in range(50):
        rows = [i for b in batches[4 * step: 4 * step + 4] for i in b]
        assert len(rows) == 8 and all(len(b) == 2 for b in batches[4 * step: 4 * step + 4])
        assert all(i < 40 for i in rows) or all(40 <= i < 140 for i in rows)


def test_sampler_rows_per_step_do_not_depend_on_the_micro_batch() -> None:
    """What makes a run's result independent of the number of ranks and accumulation steps."""
    lengths = [[random.Random(i).randint(3, 60) for i in range(90)], [9] * 30]

    def steps(micro: int) -> list[list[int]]:
        batches = list(MultiTaskBatchSampler(lengths, 12, micro, steps_per_epoch=20, temperature=2.0, seed=3))
        per_step = 12 // micro
        return [sorted(i for b in batches[s: s + per_step] for i in b) for s in range(0, len(batches), per_step)]

    assert steps(12) == steps(6) == steps(3) == steps(1)


def test_sampler_order_depends_only_on_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[list[int]]:
        sampler = MultiTaskBatchSampler([[4] * 50, [6] * 50], 4, 4, steps_per_epoch=10, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)


def test_sampler_draws_tasks_in_proportion_to_size_and_covers_each_pass() -> None:
    sampler = MultiTaskBatchSampler([[3] * 100, [3] * 300], batch_size=4, micro_batch_size=4, steps_per_epoch=4000)
    tasks = Counter(0 if b[0] < 100 else 1 for b in sampler)
    assert tasks[0] / 4000 == pytest.approx(0.25, abs=0.03)
    single = MultiTaskBatchSampler([[3] * 10], batch_size=4, micro_batch_size=4, steps_per_epoch=5)
    first_pass = [i for b in list(single)[:2] for i in b]
    assert len(set(first_pass)) == 8  # no row twice before the pass is through


def test_a_task_smaller_than_the_batch_still_fills_it() -> None:
    sampler = MultiTaskBatchSampler([[3] * 5], batch_size=8, micro_batch_size=8, steps_per_epoch=3)
    assert all(len(b) == 8 and set(b) <= set(range(5)) for b in sampler)


def test_eval_batches_respect_the_token_budget_and_sort_by_length() -> None:
    lengths = [random.Random(i).randint(1, 100) for i in range(500)]
    batches = eval_batches(lengths, max_tokens=1000, max_rows=64)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(len(b) <= 64 and (len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 1000) for b in batches)
    widths = [max(lengths[i] for i in b) for b in batches]
    assert widths == sorted(widths, reverse=True)
    assert padded_tokens(batches, lengths) < 1.05 * sum(lengths)


def test_collator_pads_to_the_longest_row_with_a_mask() -> None:
    batch = Collator(pad_token_id=1)([{"input_ids": [0, 5, 2], "label": 2, "task_index": 0},
                                      {"input_ids": [0, 7, 8, 9, 2], "label": 0, "task_index": 0}])
    assert batch["input_ids"].tolist() == [[0, 5, 2, 1, 1], [0, 7, 8, 9, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [2, 0]
    assert batch["task_index"].tolist() == [0, 0]
    assert Collator(1, pad_to_multiple_of=8)([{"input_ids": [0, 2], "label": 1}])["input_ids"].shape == (1, 8)


def test_collator_shapes_multiple_choice_tagging_and_spans() -> None:
    mc = Collator(1)([{"input_ids": [[0, 4, 2], [0, 4, 5, 2]], "label": 1},
                      {"input_ids": [[0, 2], [0, 6, 2]], "label": 0}])
    assert mc["input_ids"].shape == (2, 2, 4) and mc["attention_mask"][1, 0].tolist() == [1, 1, 0, 0]
    tags = Collator(1)([{"input_ids": [0, 3, 2], "labels": [-100, 1, -100]},
                        {"input_ids": [0, 2], "labels": [-100, -100]}])
    assert tags["labels"].tolist() == [[-100, 1, -100], [-100, -100, -100]]
    spans = Collator(1)([{"input_ids": [0, 3, 2], "start_positions": 1, "end_positions": 1}])
    assert spans["start_positions"].tolist() == [1] and spans["end_positions"].dtype == torch.long


def test_train_set_lays_tasks_end_to_end_with_their_index() -> None:
    datasets = pytest.importorskip("datasets")
    a = datasets.Dataset.from_dict({"input_ids": [[1], [2]], "label": [0, 1], "length": [1, 1]})
    b = datasets.Dataset.from_dict({"input_ids": [[3]], "labels": [[-100]], "length": [1]})
    train = TrainSet([a, b])
    assert len(train) == 3
    assert train[1] == {"input_ids": [2], "label": 1, "task_index": 0}
    assert train[2] == {"input_ids": [3], "labels": [-100], "task_index": 1}


def test_accelerate_deals_each_steps_micro_batches_to_the_ranks() -> None:
    """The loader under torchrun wraps the sampler in accelerate's BatchSamplerShard: each of 2
    ranks must get 2 of the 4 micro-batches of every step, together the whole global batch."""
    from accelerate.data_loader import BatchSamplerShard

    sampler = MultiTaskBatchSampler([[5] * 30, [9] * 50], batch_size=8, micro_batch_size=2, steps_per_epoch=6)
    everything = list(sampler)
    ranks = [list(BatchSamplerShard(sampler, num_processes=2, process_index=r)) for r in (0, 1)]
    assert [len(r) for r in ranks] == [12, 12]  # 6 steps × 2 accumulation micro-batches each
    for step in range(6):
        dealt = sorted(i for r in ranks for b in r[2 * step: 2 * step + 2] for i in b)
        assert dealt == sorted(i for b in everything[4 * step: 4 * step + 4] for i in b)
