"""Evaluation by token budget: the rows of all of a target's languages are sorted by length
together and packed into batches of at most `max_tokens` padded tokens. Whatever the batches,
every split gets the predictions and metrics of evaluating it one row at a time (no padding,
no batching), and every batch keeps to its budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fixtures.tiny_hub import TinyHub

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def encoded_splits(hub: TinyHub, cache: Path, task: str) -> list[Any]:
    """The splits a run evaluates: every test language of a multilingual target, else the dev set."""
    from transformers import AutoTokenizer
    from xstilts.trainer.config import RunConfig
    from xstilts.trainer.data import dev_splits, open_split, test_splits, training_splits
    from xstilts.trainer.features import load_encoded, tokenizer_fingerprint

    multilingual = task in ("xnli", "pawsx")
    config = RunConfig.model_validate({"model": str(hub.model), "stage": "target" if multilingual else "intermediate",
                                       "tasks": [task], "task_data": hub.task_data(task),
                                       "hyperparameters": {"max_seq_length": 64}})
    tokenizer = AutoTokenizer.from_pretrained(hub.model)

    def encoded(ref: Any, labels: Any = None) -> Any:
        return load_encoded(open_split(config, ref), tokenizer, tokenizer_fingerprint(tokenizer), 64, cache, labels)

    labels = encoded(training_splits(config)[0]).labels  # label ids as a run numbers them
    return [encoded(ref, labels) for ref in (test_splits(config) if multilingual else dev_splits(config))]


class Recorded:
    """The model, and the shape and real tokens of every batch it was run on."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.batches: list[tuple[tuple[int, ...], int]] = []

    def __call__(self, batch: dict[str, torch.Tensor]) -> Any:
        self.batches.append((tuple(batch["input_ids"].shape), int(batch["attention_mask"].sum())))
        return self.model(**batch)


@pytest.mark.parametrize("task", ["xnli", "squad_v2", "ccg", "hellaswag"])
def test_token_budget_batches_give_the_metrics_of_one_row_at_a_time(tiny_hub: TinyHub, tiny_cache: Path,
                                                                    task: str) -> None:
    from xstilts.trainer.batching import Collator
    from xstilts.trainer.evaluate import Predictor, evaluate_split, evaluate_splits
    from xstilts.trainer.model import HeadSpec, build_model
    from xstilts.trainer.tasks import Format

    splits = encoded_splits(tiny_hub, tiny_cache, task)
    fmt = splits[0].task.format
    labels = splits[0].labels if fmt in (Format.CLASSIFICATION, Format.TAGGING) else ()
    torch.manual_seed(0)
    model = build_model(tiny_hub.model, [HeadSpec(task, fmt, labels)], seed=0).eval()
    collator = Collator(pad_token_id=1)
    budget = 512

    def predictor(forward: Recorded, max_tokens: int, max_rows: int) -> Predictor:
        return Predictor(forward, collator, torch.device("cpu"), max_tokens=max_tokens, max_rows=max_rows)

    together = Recorded(model)
    records: list[list[dict[str, Any]]] = []
    metrics = evaluate_splits(predictor(together, budget, 64), splits, 0, records=records)
    # the per-example outcomes (predictions.parquet) give back each split's primary metric
    metric = splits[0].task.metric
    for split_records, got in zip(records, metrics, strict=True):
        assert split_records and len({r["example"] for r in split_records}) == len(split_records)
        recomputed = sum(r["score"] for r in split_records) / sum(r["weight"] for r in split_records)
        assert recomputed == pytest.approx(got[metric])
    one_row = Recorded(model)
    for encoded, got in zip(splits, metrics, strict=True):
        assert got == evaluate_split(predictor(one_row, 1, 1), encoded, 0)
    assert all(shape[0] == 1 for shape, _ in one_row.batches)

    # every row once, in batches within the budget and nearly free of padding
    assert sum(shape[0] for shape, _ in together.batches) == sum(len(e.features) for e in splits)
    computed = 0
    for shape, _ in together.batches:
        tokens = shape[0] * shape[1] * (shape[2] if len(shape) == 3 else 1)
        assert tokens <= budget or shape[0] == 1, shape
        computed += tokens
    if fmt is not Format.MULTIPLE_CHOICE:  # (a row's choices are padded to its longest, batched or not)
        assert sum(real for _, real in together.batches) >= 0.9 * computed
    if len(splits) > 1:  # languages batched together need fewer, fuller batches than one by one
        apart = Recorded(model)
        for encoded in splits:
            evaluate_split(predictor(apart, budget, 64), encoded, 0)
        assert len(together.batches) < len(apart.batches)


def test_predictions_come_back_in_the_order_of_the_rows_asked_for(tiny_hub: TinyHub, tiny_cache: Path) -> None:
    from xstilts.trainer.batching import Collator
    from xstilts.trainer.evaluate import Predictor
    from xstilts.trainer.model import HeadSpec, build_model
    from xstilts.trainer.tasks import Format

    en, fr = encoded_splits(tiny_hub, tiny_cache, "xnli")[:2]
    model = build_model(tiny_hub.model, [HeadSpec("xnli", Format.CLASSIFICATION, en.labels)], seed=0).eval()
    predictor = Predictor(lambda batch: model(**batch), Collator(1), torch.device("cpu"), max_tokens=256, max_rows=16)
    rows_en, rows_fr = [7, 3, 0, 12], [5, 1]
    both = predictor.predict_splits([en, fr], 0, [rows_en, rows_fr])
    assert both == [[predictor.predict(en, 0, [i])[0] for i in rows_en],
                    [predictor.predict(fr, 0, [i])[0] for i in rows_fr]]


def test_oracle_selection_takes_each_languages_test_score_at_its_best_dev_step() -> None:
    from xstilts.trainer.evaluate import oracle_test_scores

    history = [
        {"step": 10, "dev": {"en": 0.70, "de": 0.50}, "test": {"en": {"accuracy": 0.69}, "de": {"accuracy": 0.48}}},
        {"step": 20, "dev": {"en": 0.75, "de": 0.50}, "test": {"en": {"accuracy": 0.74}, "de": {"accuracy": 0.52}}},
        {"step": 30, "dev": {"en": 0.72, "de": 0.55}, "test": {"en": {"accuracy": 0.71}, "de": {"accuracy": 0.57}}},
    ]
    # en: best dev at step 20; de: best at step 30 (English dev would have picked step 20: 0.52)
    assert oracle_test_scores(history) == {"en": {"accuracy": 0.74}, "de": {"accuracy": 0.57}}
    # a tie goes to the earlier step, as the Trainer's own best-checkpoint choice does
    tied = [history[0], {**history[0], "step": 40, "test": {"en": {"accuracy": 0.1}, "de": {"accuracy": 0.1}}}]
    assert oracle_test_scores(tied) == {"en": {"accuracy": 0.69}, "de": {"accuracy": 0.48}}
    assert oracle_test_scores([]) == {}
