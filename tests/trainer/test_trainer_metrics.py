"""Metrics and span decoding, against values worked out by hand and the SQuAD rules."""

from __future__ import annotations

import pytest
from xstilts.trainer.evaluate import dev_metrics
from xstilts.trainer.evaluate import test_metrics as target_metrics
from xstilts.trainer.scoring import (
    Span,
    accuracy,
    answer_text,
    best_span,
    exact_match,
    f1,
    normalize_answer,
    squad_scores,
    token_accuracy,
)
from xstilts.trainer.tasks import TASKS, selection_metric


def test_accuracy_and_token_accuracy() -> None:
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    # -100 positions (later sub-tokens, specials) are skipped; -1 (unknown tag) always counts wrong
    assert token_accuracy([[5, 1, 2, 9], [0, 0]], [[-100, 1, 3, -100], [-1, 0]]) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        accuracy([1, 2, 3], [1, 2])


def test_squad_normalisation_exact_match_and_f1() -> None:
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the eiffel tower", "Eiffel Tower.") == 1.0
    assert f1("eiffel tower in paris", "the eiffel tower") == pytest.approx(2 * (2 / 4) * 1.0 / (2 / 4 + 1.0))
    assert f1("", "") == 1.0 and f1("paris", "") == 0.0 and f1("", "paris") == 0.0
    scores = squad_scores({"a": "Paris", "b": "", "c": "in london"},
                          {"a": ["paris", "Paris, France"], "b": [], "c": ["London"]})
    assert scores["exact_match"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx((1 + 1 + 2 / 3) / 3)


def test_best_span_stays_inside_the_context_and_in_order() -> None:
    offsets = [[-1, -1], [-1, -1], [0, 3], [4, 9], [10, 12], [-1, -1]]
    start = [9.0, 8.0, 0.1, 2.0, 0.5, 7.0]
    end = [9.0, 0.2, 0.3, 0.1, 3.0, 7.0]
    span = best_span(start, end, offsets)
    assert (span.start_char, span.end_char) == (4, 12)
    assert span.score == pytest.approx(5.0) and span.null_score == pytest.approx(18.0)
    # an end before the start, or a span longer than allowed, is never chosen
    span = best_span([0, -10.0, 5.0, 0], [0, 9.0, 0, 1.0], [[-1, -1], [0, 1], [2, 3], [4, 5]])
    assert (span.start_char, span.end_char) == (2, 5)
    assert best_span([0, 5.0, 0, 0], [0, 0, 0, 4.0], [[-1, -1], [0, 1], [2, 3], [4, 5]],
                     max_answer_tokens=2).end_char != 5


def test_no_answer_only_where_the_task_allows_it() -> None:
    context = "the cat sat"
    spans = [Span(1.0, 4, 7, 3.0), Span(2.0, 8, 11, 5.0)]
    assert answer_text(context, spans, no_answer=False) == "sat"
    assert answer_text(context, spans, no_answer=True) == ""  # min null score 3.0 beats 2.0
    assert answer_text(context, [Span(4.0, 4, 7, 3.0)], no_answer=True) == "cat"
    assert TASKS["squad_v2"].no_answer and not TASKS["squad_v1"].no_answer


def test_metric_names_for_one_task_several_tasks_and_targets() -> None:
    mnli, squad = TASKS["mnli"], TASKS["squad_v1"]
    assert dev_metrics([mnli], {"mnli": {"accuracy": 0.8}}) == {"dev.accuracy": 0.8}
    multi = dev_metrics([mnli, squad], {"mnli": {"accuracy": 0.8}, "squad_v1": {"exact_match": 0.5, "f1": 0.6}})
    assert multi == {"dev.mnli.accuracy": 0.8, "dev.squad_v1.exact_match": 0.5, "dev.squad_v1.f1": 0.6,
                     "dev.score": pytest.approx(0.7)}
    assert selection_metric([mnli, TASKS["qqp"]]) == "accuracy" and selection_metric([mnli, squad]) == "score"
    assert target_metrics("xnli", {"en": {"accuracy": 0.9}, "de": {"accuracy": 0.7}}) == {
        "xnli.test.accuracy.en": 0.9, "xnli.test.accuracy.de": 0.7, "xnli.test.accuracy.avg": pytest.approx(0.8)}
