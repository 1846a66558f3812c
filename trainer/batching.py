"""Batches: length-grouped training batches, multi-task sampling, evaluation batches by
token budget, and the collator that pads each batch only to its own longest row.

Padding to the batch's own longest row (dynamic padding) and putting rows of similar length
together (length grouping) is where the throughput over pad-to-max-length comes from; see
benchmarks/train_throughput.py.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from xstilts.trainer.scoring import IGNORE

MEGABATCH_FACTOR = 50  # rows sorted together: enough to find similar lengths, few enough to stay random


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random,
                           megabatch_factor: int = MEGABATCH_FACTOR) -> list[list[int]]:
    """One pass over all rows in batches of similar length: a random permutation cut into
    megabatches of `megabatch_factor` batches, each sorted by length and cut into batches; the
    batch order is then shuffled, with the longest batch first so that a batch too big for
    memory fails at the first step, not hours in."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * megabatch_factor
    batches: list[list[int]] = []
    for at in range(0, len(order), mega):
        group = sorted(order[at: at + mega], key=lambda i: -lengths[i])
        batches += [group[b: b + batch_size] for b in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]) * len(batches[b]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def task_probabilities(sizes: Sequence[int], temperature: float) -> list[float]:
    """P(task) ∝ n_task^(1/T): T=1 proportional to size, T→∞ uniform."""
    weights = [n ** (1.0 / temperature) for n in sizes]
    total = sum(weights)
    return [w / total for w in weights]


class MultiTaskBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Micro-batches for the training loop, as indices into the tasks' train sets laid end to
    end (`offsets`).

    Each optimizer step draws a task with `task_probabilities` and takes the next global batch
    (`batch_size` rows) of that task's length-grouped stream (a fresh shuffled pass whenever one
    runs out; a pass's last, short batch is topped up with random rows of the task). The global
    batch is cut into `batch_size / micro_batch_size` micro-batches of neighbouring lengths;
    the data loader deals them to the ranks in turn and each rank accumulates its share. So the
    rows of every step, and the task, are the same whatever the number of ranks, and a result
    does not depend on how many GPUs computed it. The order depends only on (seed, epoch): a
    resumed run skips exactly the batches it already trained on.
    """

    def __init__(self, task_lengths: Sequence[Sequence[int]], batch_size: int, micro_batch_size: int,
                 steps_per_epoch: int, temperature: float = 1.0, seed: int = 0,
                 megabatch_factor: int = MEGABATCH_FACTOR, last_share: float | None = None) -> None:
        """`last_share`: the last part (continued MLM's corpus) is drawn with this probability
        whatever its size, the tasks before it share the rest by `task_probabilities`."""
        if batch_size % micro_batch_size:
            raise ValueError(f"batch_size {batch_size} is not a multiple of micro_batch_size {micro_batch_size}")
        self.task_lengths = [list(lengths) for lengths in task_lengths]
        self.offsets = [sum(len(t) for t in self.task_lengths[:i]) for i in range(len(self.task_lengths))]
        # not "batch_size": accelerate's BatchSamplerShard would take it for the size of each
        # yielded (micro-)batch and drop every batch of another size
        self.global_batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.steps_per_epoch = steps_per_epoch
        if last_share is None:
            self.probabilities = task_probabilities([len(t) for t in self.task_lengths], temperature)
        else:
            tasks = task_probabilities([len(t) for t in self.task_lengths[:-1]], temperature)
            self.probabilities = [p * (1 - last_share) for p in tasks] + [last_share]
        self.seed = seed
        self.megabatch_factor = megabatch_factor  # 1: random batches, no length grouping
        self.epoch = 0

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch_size // self.micro_batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch * self.micro_batches_per_step

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        streams = [self._stream(t, random.Random(rng.random())) for t in range(len(self.task_lengths))]
        tasks = range(len(self.task_lengths))
        for _ in range(self.steps_per_epoch):
            task = rng.choices(tasks, weights=self.probabilities)[0]
            rows = next(streams[task])
            for at in range(0, self.global_batch_size, self.micro_batch_size):
                yield rows[at: at + self.micro_batch_size]

    def _stream(self, task: int, rng: random.Random) -> Iterator[list[int]]:
        lengths = self.task_lengths[task]
        offset = self.offsets[task]
        while True:
            for batch in length_grouped_batches(lengths, self.global_batch_size, rng, self.megabatch_factor):
                if len(batch) < self.global_batch_size:
                    batch = batch + rng.choices(range(len(lengths)), k=self.global_batch_size - len(batch))
                batch.sort(key=lambda i: -lengths[i])
                yield [offset + i for i in batch]


# Evaluation batches hold rows of one length while there are EVAL_MIN_ROWS of them: a batch
# without padding needs no attention mask, and attention runs its fastest kernel. The rarer
# lengths (a distribution's tails) share batches, a row joining only while the batch's padding
# stays under MAX_EVAL_PADDING of its tokens (or a few tokens: for short rows one more forward
# pass costs more than the padding).
EVAL_MIN_ROWS = 16
MAX_EVAL_PADDING = 0.1
FEW_PAD_TOKENS = 4


def eval_batches(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Rows sorted by length (longest first) and packed into batches of at most `max_tokens`
    padded tokens and `max_rows` rows; a batch of EVAL_MIN_ROWS rows takes no shorter row, and
    every row is within MAX_EVAL_PADDING (or FEW_PAD_TOKENS) of its batch's longest. Evaluation
    wastes almost nothing on padding, however small the split is against the token budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        full = (len(current) + 1) * width > max_tokens or len(current) >= max_rows
        shorter = lengths[i] < width and len(current) >= EVAL_MIN_ROWS
        too_short = width - lengths[i] > max(FEW_PAD_TOKENS, MAX_EVAL_PADDING * width)
        if current and (full or shorter or too_short):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


# --- collation ----------------------------------------------------------------------------------


def _pad(rows: Sequence[Sequence[int]], value: int, width: int) -> torch.Tensor:
    # one tensor from padded lists: a fifth of the time of copying row by row into a tensor
    return torch.tensor([list(row) + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def _mask(rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    return (torch.arange(width) < torch.tensor([len(row) for row in rows])[:, None]).long()


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


class Collator:
    """Pads a single-task batch of feature rows to its longest row (rounded up to
    `pad_to_multiple_of`, 8 on GPUs for tensor cores) and builds the attention mask.
    Multiple-choice rows become (batch, choices, width)."""

    LABEL_KEYS = ("label", "labels", "start_positions", "end_positions")

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1, mlm_task_index: int | None = None,
                 masker: Any = None, special_ids: frozenset[int] = frozenset()) -> None:
        """`mlm_task_index`: batches of that part are MLM batches, masked by `masker`
        (trainer/mlm.py) except at `special_ids`."""
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mlm_task_index = mlm_task_index
        self.masker = masker
        self.special_ids = special_ids

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        first = rows[0]
        choices = isinstance(first["input_ids"][0], list)
        flat = [c for r in rows for c in r["input_ids"]] if choices else [r["input_ids"] for r in rows]
        width = _round_up(max(len(r) for r in flat), self.pad_to_multiple_of)
        input_ids = _pad(flat, self.pad_token_id, width)
        attention_mask = _mask(flat, width)
        if choices:
            input_ids = input_ids.view(len(rows), -1, width)
            attention_mask = attention_mask.view(len(rows), -1, width)
        batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.mlm_task_index is not None and first.get("task_index") == self.mlm_task_index:
            from xstilts.trainer.mlm import mask_batch

            batch["input_ids"], batch["labels"] = mask_batch(self.masker, input_ids, attention_mask, self.special_ids)
            batch["task_index"] = torch.full((len(rows),), self.mlm_task_index, dtype=torch.long)
            return batch
        if "task_index" in first:
            batch["task_index"] = torch.tensor([r["task_index"] for r in rows], dtype=torch.long)
        if "label" in first:
            batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
        if "labels" in first:
            batch["labels"] = _pad([r["labels"] for r in rows], IGNORE, width)
        for key in ("start_positions", "end_positions"):
            if key in first:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
        return batch


class TrainSet(torch.utils.data.Dataset[dict[str, Any]]):
    """The training features of one or more tasks laid end to end; each row carries its
    task's index, which selects the head."""

    COLUMNS = ("input_ids", "label", "labels", "start_positions", "end_positions")

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = [p.select_columns([c for c in self.COLUMNS if c in p.column_names]) for p in parts]
        self.offsets = [sum(len(p) for p in self.parts[:i]) for i in range(len(self.parts))]
        self.total = sum(len(p) for p in self.parts)

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, index: int) -> dict[str, Any]:
        task = bisect.bisect_right(self.offsets, index) - 1
        row = dict(self.parts[task][index - self.offsets[task]])
        row["task_index"] = task
        return row

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A whole batch in one read per task (the DataLoader's batched fetch): one Arrow slice
        instead of a lookup per row."""
        rows: list[dict[str, Any]] = [{} for _ in indices]
        by_task: dict[int, list[int]] = {}
        for at, index in enumerate(indices):
            by_task.setdefault(bisect.bisect_right(self.offsets, index) - 1, []).append(at)
        for task, positions in by_task.items():
            columns = self.parts[task][[indices[at] - self.offsets[task] for at in positions]]
            for k, at in enumerate(positions):
                rows[at] = {name: values[k] for name, values in columns.items()} | {"task_index": task}
        return rows
