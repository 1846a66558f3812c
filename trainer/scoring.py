"""Metrics and span decoding: pure functions over plain Python values.

accuracy for classification and multiple choice; token accuracy for tagging (over each word's
first sub-token) and F1: entity-level over BIO spans (conlleval's rule, as seqeval scores
PAN-X in XTREME) or, for tag sets without BIO prefixes (POS), micro F1 over words, which with
one tag per word is word accuracy; exact match and F1 for span QA with the SQuAD reference's answer
normalisation (lower case, no punctuation, no articles, single spaces), maximised over the gold
answers; an unanswerable question's gold answer is the empty string.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

IGNORE = -100
N_BEST = 20  # start and end candidates considered per window
MAX_ANSWER_TOKENS = 30


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        return 0.0
    return sum(int(p == y) for p, y in zip(predictions, labels, strict=True)) / len(labels)


def token_accuracy(predictions: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> float:
    """Accuracy over the positions whose label is not IGNORE (each word's first sub-token)."""
    correct = total = 0
    for row_p, row_y in zip(predictions, labels, strict=True):
        for p, y in zip(row_p, row_y, strict=False):
            if y != IGNORE:
                total += 1
                correct += int(p == y)
    return correct / total if total else 0.0


def bio_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, first, last) of each entity in a BIO sequence. An I- tag that does not continue
    an entity of its type starts one (conlleval's rule)."""
    entities: set[tuple[str, int, int]] = set()
    kind, start = None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind
        if kind is not None and not continues:
            entities.add((kind, start, i - 1))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = label, i
    return entities


def is_bio(labels: Sequence[str]) -> bool:
    return any(t.startswith(("B-", "I-")) for t in labels)


def tag_f1(predictions: Sequence[Sequence[str]], golds: Sequence[Sequence[str]], entities: bool) -> float:
    """Micro F1 over sentences of word tags: of entity spans when `entities`, else of words
    (every word has one gold and one predicted tag, so precision = recall = accuracy)."""
    if not entities:
        pairs = [(p, g) for row_p, row_g in zip(predictions, golds, strict=True)
                 for p, g in zip(row_p, row_g, strict=True)]
        return sum(p == g for p, g in pairs) / len(pairs) if pairs else 0.0
    found = gold = correct = 0
    for row_p, row_g in zip(predictions, golds, strict=True):
        p, g = bio_entities(row_p), bio_entities(row_g)
        found, gold, correct = found + len(p), gold + len(g), correct + len(p & g)
    if not correct:
        return 0.0
    precision, recall = correct / found, correct / gold
    return 2 * precision * recall / (precision + recall)


def word_tags(predictions: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
              names: Sequence[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Predicted and gold tag names of each word (the positions whose label is not IGNORE);
    a gold tag outside the label set (id -1) gets a name no prediction has."""
    preds, golds = [], []
    for row_p, row_y in zip(predictions, labels, strict=True):
        kept = [(p, y) for p, y in zip(row_p, row_y, strict=False) if y != IGNORE]
        preds.append([names[p] for p, _ in kept])
        golds.append([names[y] if y >= 0 else "<unknown>" for _, y in kept])
    return preds, golds


# --- SQuAD --------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:  # "no answer" against "no answer" is a match
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Mapping[str, str], golds: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Mean exact match and F1 (in [0, 1]) of predicted answer texts against each question's
    gold answers, the best gold answer counting."""
    if not golds:
        return {"exact_match": 0.0, "f1": 0.0}
    em = f = 0.0
    for qid, answers in golds.items():
        prediction = predictions.get(qid, "")
        candidates = list(answers) or [""]
        em += max(exact_match(prediction, a) for a in candidates)
        f += max(f1(prediction, a) for a in candidates)
    return {"exact_match": em / len(golds), "f1": f / len(golds)}


@dataclass(frozen=True)
class Span:
    """The best answer of one window: character span in the context, and the score of the
    best span against the score of "no answer" (the first token)."""

    score: float
    start_char: int
    end_char: int
    null_score: float


def best_span(start_logits: Sequence[float], end_logits: Sequence[float], offsets: Sequence[Sequence[int]],
              n_best: int = N_BEST, max_answer_tokens: int = MAX_ANSWER_TOKENS) -> Span:
    """The highest-scoring valid span of one window: start and end inside the context,
    start <= end, at most `max_answer_tokens` long. score is -inf if no span is valid."""
    width = min(len(start_logits), len(offsets))
    starts = sorted(range(width), key=lambda i: -start_logits[i])[:n_best]
    ends = sorted(range(width), key=lambda i: -end_logits[i])[:n_best]
    best = Span(float("-inf"), 0, 0, float(start_logits[0] + end_logits[0]))
    for s in starts:
        if offsets[s][0] < 0:
            continue
        for e in ends:
            if offsets[e][0] < 0 or e < s or e - s + 1 > max_answer_tokens:
                continue
            score = float(start_logits[s] + end_logits[e])
            if score > best.score:
                best = Span(score, int(offsets[s][0]), int(offsets[e][1]), best.null_score)
    return best


def answer_text(context: str, spans: Sequence[Span], no_answer: bool) -> str:
    """The answer to one question from its windows' best spans: the best-scoring span, or ""
    when the task allows no answer and the best "no answer" score beats every span (SQuAD
    v2.0's rule with threshold 0)."""
    best = max(spans, key=lambda s: s.score)
    if no_answer and min(s.null_score for s in spans) > best.score:
        return ""
    if best.score == float("-inf"):
        return ""
    # Metaspace tokenizers (XLM-R's) count the space before a word into its first piece
    return context[best.start_char: best.end_char].strip()


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
