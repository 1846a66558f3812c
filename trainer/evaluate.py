"""Evaluation: English dev sets for model selection, then the zero-shot test set of every
language of a target task.

Rows are sorted by length and packed into big batches by token budget (`eval_batches`), so
almost nothing is spent on padding. Under data parallelism (DDP, DeepSpeed) the batches are
dealt to the ranks in turn and every rank runs the same number of forward passes (a rank with
fewer batches repeats one and drops its output): ZeRO-3 gathers each layer's weights
collectively, so a rank that stopped early would leave the others waiting forever. Each rank
reduces its model outputs to small per-row predictions before they are gathered.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from xstilts.trainer.batching import Collator, eval_batches
from xstilts.trainer.features import Encoded
from xstilts.trainer.scoring import (
    IGNORE,
    Span,
    accuracy,
    answer_text,
    best_span,
    is_bio,
    mean,
    squad_scores,
    tag_f1,
    token_accuracy,
    word_tags,
)
from xstilts.trainer.tasks import Format, Task, selection_metric

Forward = Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]]


# On a CPU a batch of a few thousand tokens runs fastest: its activations stay in the caches
# (benchmarks/eval_throughput.py). A GPU takes the trainer's budget as it is.
CPU_EVAL_TOKENS = 4096


def eval_token_budget(tokens: int, device: torch.device) -> int:
    """Padded tokens per evaluation batch on `device`, from the budget the trainer derives from
    its training micro batch."""
    return min(tokens, CPU_EVAL_TOKENS) if device.type == "cpu" else tokens


class _Pool:
    """The rows of several splits of one task, addressed as one list: item k is row
    `rows[k]` of split `split_of[k]`. Columns are read from Arrow once per split and batch (a
    datasets lookup per row, or per Column iteration, costs tens of microseconds)."""

    def __init__(self, splits: Sequence[Encoded], rows: Sequence[Sequence[int]]) -> None:
        self.splits = list(splits)
        self.split_of = [s for s, r in enumerate(rows) for _ in r]
        self.rows = [i for r in rows for i in r]
        self.lengths: list[int] = []
        self._columns: dict[tuple[int, str], Any] = {}
        for encoded, r in zip(splits, rows, strict=True):
            all_lengths = encoded.features["length"][:]
            self.lengths += [all_lengths[i] for i in r]

    def column(self, name: str, items: Sequence[int]) -> list[Any]:
        """Column `name` of `items`, in their order."""
        by_split: dict[int, list[int]] = defaultdict(list)
        for at, k in enumerate(items):
            by_split[self.split_of[k]].append(at)
        out: list[Any] = [None] * len(items)
        for s, positions in by_split.items():
            if (s, name) not in self._columns:  # the Arrow column, honouring a select()
                self._columns[s, name] = self.splits[s].features.with_format("arrow")[name]
            values = self._columns[s, name].take([self.rows[items[at]] for at in positions]).to_pylist()
            for at, value in zip(positions, values, strict=True):
                out[at] = value
        return out


@dataclass
class Predictor:
    """Runs a model over feature rows on this rank's share of the batches."""

    forward: Forward  # the model (or its DeepSpeed / DDP wrapper) called on a padded batch
    collator: Collator
    device: torch.device
    rank: int = 0
    world_size: int = 1
    max_tokens: int = 32768  # padded tokens per evaluation batch
    max_rows: int = 512

    def predict(self, encoded: Encoded, task_index: int, rows: Sequence[int]) -> list[Any]:
        """One prediction per row of `rows` (indices into encoded.features), in that order:
        a class id, a list of tag ids, or a Span."""
        return self.predict_splits([encoded], task_index, [rows])[0]

    def predict_splits(self, splits: Sequence[Encoded], task_index: int,
                       rows: Sequence[Sequence[int]]) -> list[list[Any]]:
        """predict() of several splits of one task (a target's test languages) in one pass:
        their rows are batched together, so rows of the same length fill whole batches that
        need no padding, where one small split would leave a few rows of each length."""
        if not splits:
            return []
        pool = _Pool(splits, rows)
        fmt = splits[0].task.format
        lengths = pool.lengths
        if fmt is Format.MULTIPLE_CHOICE and lengths:  # the model sees choices x width tokens per row
            n_choices = len(pool.column("input_ids", [0])[0])
            lengths = [n * n_choices for n in lengths]
        batches = eval_batches(lengths, self.max_tokens, self.max_rows)
        rounds = math.ceil(len(batches) / self.world_size) if batches else 0
        mine = batches[self.rank::self.world_size]
        results: list[tuple[int, Any]] = []
        for r in range(rounds):
            padding_round = r >= len(mine)
            batch = mine[r] if not padding_round else batches[0]
            outputs = self._run(pool, batch, task_index)
            if not padding_round:
                results += zip(batch, _reduce(fmt, pool, batch, outputs), strict=True)
        by_item = dict(_gather(results, self.world_size))
        out: list[list[Any]] = [[] for _ in splits]
        for k, s in enumerate(pool.split_of):
            out[s].append(by_item[k])
        return out

    def _run(self, pool: _Pool, batch: list[int], task_index: int) -> dict[str, torch.Tensor]:
        inputs = self.collator([{"input_ids": ids, "task_index": task_index}
                                for ids in pool.column("input_ids", batch)])
        model_inputs = {k: inputs[k].to(self.device) for k in ("input_ids", "attention_mask", "task_index")}
        with torch.inference_mode():
            outputs = self.forward(model_inputs)
        return {k: v.float().cpu() for k, v in outputs.items() if k != "loss" and v is not None}


def _reduce(fmt: Format, pool: _Pool, batch: list[int], outputs: dict[str, torch.Tensor]) -> list[Any]:
    """Per-row predictions from a batch's outputs: small enough to gather across ranks."""
    if fmt in (Format.CLASSIFICATION, Format.MULTIPLE_CHOICE):
        labels: list[int] = outputs["logits"].argmax(-1).tolist()
        return labels
    lengths = [pool.lengths[k] for k in batch]
    if fmt is Format.TAGGING:
        tags = outputs["logits"].argmax(-1).tolist()
        return [row[: n] for row, n in zip(tags, lengths, strict=True)]
    spans = []
    for i, (n, offsets) in enumerate(zip(lengths, pool.column("offsets", batch), strict=True)):
        spans.append(best_span(outputs["start_logits"][i, :n].tolist(), outputs["end_logits"][i, :n].tolist(),
                               offsets))
    return spans


def _gather(results: list[tuple[int, Any]], world_size: int) -> list[tuple[int, Any]]:
    if world_size == 1:
        return results
    everyone: list[list[tuple[int, Any]] | None] = [None] * world_size
    torch.distributed.all_gather_object(everyone, results)
    return [item for part in everyone for item in (part or [])]


def capped_rows(encoded: Encoded, max_examples: int | None) -> list[int]:
    """Feature rows of the first `max_examples` examples (all windows of each span-QA
    example), or every row."""
    if max_examples is None:
        return list(range(len(encoded.features)))
    return [i for i, e in enumerate(encoded.features["example_index"][:]) if e < max_examples]


def score(task: Task, encoded: Encoded, rows: Sequence[int], predictions: Sequence[Any]) -> dict[str, float]:
    """The task's metrics of predictions for `rows`."""
    features = encoded.features.select(rows)

    def column(name: str) -> list[Any]:  # one read, not one per row
        values: list[Any] = features[name][:]
        return values

    if task.format in (Format.CLASSIFICATION, Format.MULTIPLE_CHOICE):
        return {"accuracy": accuracy(list(predictions), column("label"))}
    if task.format is Format.TAGGING:
        labels = column("labels")
        scores = {"accuracy": token_accuracy(list(predictions), labels)}
        if task.metric == "f1":  # UD-POS, PAN-X (XTREME's metric); CCG supertagging keeps accuracy
            predicted_tags, gold_tags = word_tags(list(predictions), labels, encoded.labels)
            scores["f1"] = tag_f1(predicted_tags, gold_tags, entities=is_bio(encoded.labels))
        return scores
    windows: dict[int, list[Span]] = defaultdict(list)
    for example_index, span in zip(column("example_index"), predictions, strict=True):
        windows[example_index].append(span)
    examples = encoded.examples
    answers: dict[str, str] = {}
    golds: dict[str, list[str]] = {}
    for example_index, spans in windows.items():
        example = examples[example_index]
        answers[example["id"]] = answer_text(example["context"], spans, task.no_answer)
        golds[example["id"]] = list(example["answers"]["text"])
    return squad_scores(answers, golds)


def outcomes(task: Task, encoded: Encoded, rows: Sequence[int], predictions: Sequence[Any]) -> list[dict[str, Any]]:
    """One record per test example, enough to recompute any metric: "example" (its index),
    "prediction" and "gold" (JSON text: a class id, a tag list, an answer), and "score" with
    "weight" such that the task's primary metric is sum(score) / sum(weight) where it is a
    mean over examples (accuracy, span F1 and exact match; token accuracy weighs each word).
    Entity F1 of tagging pools over examples: recompute it from prediction and gold."""
    features = encoded.features.select(rows)
    index = features["example_index"][:]
    if task.format in (Format.CLASSIFICATION, Format.MULTIPLE_CHOICE):
        return [{"example": int(i), "prediction": json.dumps(p), "gold": json.dumps(y), "score": float(p == y),
                 "weight": 1.0} for i, p, y in zip(index, predictions, features["label"][:], strict=True)]
    if task.format is Format.TAGGING:
        out = []
        for i, p, y in zip(index, predictions, features["labels"][:], strict=True):
            kept = [(a, b) for a, b in zip(p, y, strict=False) if b != IGNORE]
            out.append({"example": int(i), "prediction": json.dumps([a for a, _ in kept]),
                        "gold": json.dumps([b for _, b in kept]), "score": float(sum(a == b for a, b in kept)),
                        "weight": float(len(kept))})
        return out
    windows: dict[int, list[Span]] = defaultdict(list)
    for example_index, span in zip(index, predictions, strict=True):
        windows[example_index].append(span)
    examples = encoded.examples
    out = []
    for example_index, spans in sorted(windows.items()):
        example = examples[example_index]
        answer = answer_text(example["context"], spans, task.no_answer)
        golds = list(example["answers"]["text"]) or [""]
        values = squad_scores({"q": answer}, {"q": golds})
        out.append({"example": int(example_index), "prediction": json.dumps(answer), "gold": json.dumps(golds),
                    "score": values[task.metric] if task.metric in values else values["f1"], "weight": 1.0})
    return out


def evaluate_split(predictor: Predictor, encoded: Encoded, task_index: int,
                   max_examples: int | None = None) -> dict[str, float]:
    return evaluate_splits(predictor, [encoded], task_index, max_examples)[0]


def evaluate_splits(predictor: Predictor, splits: Sequence[Encoded], task_index: int,
                    max_examples: int | None = None,
                    records: list[list[dict[str, Any]]] | None = None) -> list[dict[str, float]]:
    """The metrics of each split of one task (a target's test languages), predicted in one
    pass (Predictor.predict_splits); each split is scored on its own. With `records`, each
    split's per-example outcomes are appended to it too."""
    rows = [capped_rows(e, max_examples) for e in splits]
    predictions = predictor.predict_splits(splits, task_index, rows)
    if records is not None:
        records += [outcomes(e.task, e, r, p) for e, r, p in zip(splits, rows, predictions, strict=True)]
    return [score(e.task, e, r, p) for e, r, p in zip(splits, rows, predictions, strict=True)]


# --- naming the numbers ------------------------------------------------------------------------


def dev_metrics(tasks: Sequence[Task], per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Flat dev metric names: "dev.<metric>" for one task; for several, "dev.<task>.<metric>"
    of each and "dev.<selection metric>", the mean of their primary metrics."""
    if len(tasks) == 1:
        return {f"dev.{m}": v for m, v in per_task[tasks[0].name].items()}
    out = {f"dev.{t}.{m}": v for t, values in per_task.items() for m, v in values.items()}
    out[f"dev.{selection_metric(tasks)}"] = mean([per_task[t.name][t.metric] for t in tasks])
    return out


def oracle_test_scores(history: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Target-dev ("oracle") model selection: for each language, the test metrics at the
    evaluation step whose dev score in that language was best (the earliest on a tie). Each
    history entry is {"step", "dev": {lang: primary metric}, "test": {lang: {metric: value}}},
    recorded at every evaluation step; English is selected by the English dev set, as usual."""
    out: dict[str, dict[str, float]] = {}
    languages = sorted({lang for h in history for lang in h["test"]})
    for lang in languages:
        candidates = [h for h in history if lang in h["dev"] and lang in h["test"]]
        if candidates:
            best = max(candidates, key=lambda h: (h["dev"][lang], -h["step"]))
            out[lang] = dict(best["test"][lang])
    return out


def test_metrics(target: str, per_language: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """"<target>.test.<metric>.<lang>" for every language and ".avg", their mean."""
    out: dict[str, float] = {}
    metrics = sorted({m for values in per_language.values() for m in values})
    for m in metrics:
        for lang, values in per_language.items():
            out[f"{target}.test.{m}.{lang}"] = values[m]
        out[f"{target}.test.{m}.avg"] = mean([values[m] for values in per_language.values()])
    return out
