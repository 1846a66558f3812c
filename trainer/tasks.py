"""The task registry: one entry per task. Adding a task is one `Task(...)` in TASKS.

An entry says where the data lives (a Hugging Face hub dataset, or local JSON-lines files in
the same schema), its format, labels, languages and metric, and how to turn one raw row into
the format's normalised example:

    classification   {"text_a": str, "text_b": str | None, "label": int}
    multiple_choice  {"context": str, "choices": [str, ...], "label": int}
    span_qa          {"id": str, "question": str, "context": str,
                      "answers": {"text": [str], "answer_start": [int]}}   (empty: no answer)
    tagging          {"tokens": [str], "tags": [str]}

Local files: `<dir>/<split>.jsonl`, or `<dir>/<language>/<split>.jsonl` for multilingual
targets, with the hub dataset's columns. Pure Python: no torch, no datasets import.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

Row = Mapping[str, Any]
Example = dict[str, Any]


class Format(StrEnum):
    CLASSIFICATION = "classification"
    MULTIPLE_CHOICE = "multiple_choice"
    SPAN_QA = "span_qa"
    TAGGING = "tagging"


@dataclass(frozen=True)
class HubSource:
    """One hub dataset. `config` may contain "{lang}" for per-language configurations.
    `revision` names a branch or ref to load instead of the main branch: the hub's Parquet
    conversion (`refs/convert/parquet`) for datasets whose main branch holds a loading script,
    which `datasets` no longer runs."""

    path: str
    config: str | None = None
    splits: Mapping[str, str] = field(
        default_factory=lambda: {"train": "train", "validation": "validation", "test": "test"}
    )
    revision: str | None = None


@dataclass(frozen=True)
class Task:
    name: str
    format: Format
    description: str
    hub: tuple[HubSource, ...]  # several sources are concatenated (ANLI+); empty: local only
    normalize: Callable[[Row], Example | None]  # None drops the row (e.g. unlabeled)
    labels: tuple[str, ...] = ()  # classification and tagging; tagging may learn them from data
    languages: tuple[str, ...] = ("en",)
    is_target: bool = False
    metric: str = "accuracy"  # the primary metric for model selection and reports
    train_examples: int = 0  # size of the real training set, for GPU-hour estimates
    tokens_per_example: int = 64  # typical tokens per example (all choices for multiple choice)
    default_max_seq_length: int = 128
    # Span QA: some questions have no answer in the context (SQuAD v2.0), so predicting
    # "no answer" is allowed when it scores higher than every span.
    no_answer: bool = False

    @property
    def is_multilingual(self) -> bool:
        return len(self.languages) > 1


# --- normalisers -----------------------------------------------------------------------------


def _pair(a: str, b: str, label: str = "label") -> Callable[[Row], Example | None]:
    def normalize(row: Row) -> Example | None:
        y = int(row[label])
        if y < 0:  # SNLI and GLUE test splits mark unlabeled pairs with -1
            return None
        return {"text_a": row[a], "text_b": row[b], "label": y}

    return normalize


def _hellaswag(row: Row) -> Example | None:
    if row.get("label") in (None, ""):
        return None
    context = f"{row['ctx_a']} {row['ctx_b']}".strip() if "ctx_a" in row else row["ctx"]
    return {"context": context, "choices": list(row["endings"]), "label": int(row["label"])}


def _commonsense_qa(row: Row) -> Example | None:
    if not row.get("answerKey"):
        return None
    letters = list(row["choices"]["label"])
    return {
        "context": row["question"],
        "choices": list(row["choices"]["text"]),
        "label": letters.index(row["answerKey"]),
    }


def _cosmos_qa(row: Row) -> Example | None:
    if row.get("label") is None or int(row["label"]) < 0:
        return None
    return {
        "context": f"{row['context']} {row['question']}",
        "choices": [row[f"answer{i}"] for i in range(4)],
        "label": int(row["label"]),
    }


def _squad(row: Row) -> Example | None:
    answers = row["answers"]
    return {
        "id": str(row["id"]),
        "question": row["question"],
        "context": row["context"],
        "answers": {"text": list(answers["text"]), "answer_start": list(answers["answer_start"])},
    }


def _tagging(row: Row) -> Example | None:
    if len(row["tokens"]) != len(row["tags"]):
        raise ValueError(
            f"tagging row has {len(row['tokens'])} tokens but {len(row['tags'])} tags"
        )
    return {"tokens": list(row["tokens"]), "tags": list(row["tags"])}


NLI_LABELS = ("entailment", "neutral", "contradiction")
XNLI_LANGUAGES = ("en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh", "hi", "sw", "ur")
PAWSX_LANGUAGES = ("en", "de", "es", "fr", "ja", "ko", "zh")
GLUE = "nyu-mll/glue"


def _anli_round(r: int) -> HubSource:
    return HubSource("facebook/anli", None, {"train": f"train_r{r}", "validation": f"dev_r{r}", "test": f"test_r{r}"})


_TASK_LIST = [
    # --- English intermediate tasks (Phang et al. 2020) ---
    Task("mnli", Format.CLASSIFICATION, "MultiNLI natural language inference",
         (HubSource(GLUE, "mnli", {"train": "train", "validation": "validation_matched"}),),
         _pair("premise", "hypothesis"), NLI_LABELS, train_examples=392_702, tokens_per_example=40),
    Task("anli_plus", Format.CLASSIFICATION, "ANLI rounds 1-3 + MNLI + SNLI",
         (_anli_round(1), _anli_round(2), _anli_round(3),
          HubSource(GLUE, "mnli", {"train": "train", "validation": "validation_matched"}),
          HubSource("stanfordnlp/snli")),
         _pair("premise", "hypothesis"), NLI_LABELS, train_examples=1_105_719, tokens_per_example=40),
    Task("qqp", Format.CLASSIFICATION, "Quora Question Pairs paraphrase detection",
         (HubSource(GLUE, "qqp", {"train": "train", "validation": "validation"}),),
         _pair("question1", "question2"), ("not_duplicate", "duplicate"),
         train_examples=363_846, tokens_per_example=30),
    Task("squad_v1", Format.SPAN_QA, "SQuAD v1.1 extractive question answering",
         (HubSource("rajpurkar/squad", None, {"train": "train", "validation": "validation"}),),
         _squad, metric="f1", train_examples=87_599, tokens_per_example=160,
         default_max_seq_length=384),
    Task("squad_v2", Format.SPAN_QA, "SQuAD v2.0 question answering with unanswerable questions",
         (HubSource("rajpurkar/squad_v2", None, {"train": "train", "validation": "validation"}),),
         _squad, metric="f1", train_examples=130_319, tokens_per_example=160,
         default_max_seq_length=384, no_answer=True),
    Task("hellaswag", Format.MULTIPLE_CHOICE, "HellaSwag commonsense sentence completion",
         (HubSource("Rowan/hellaswag", None, {"train": "train", "validation": "validation"}),),
         _hellaswag, train_examples=39_905, tokens_per_example=4 * 70),
    Task("commonsenseqa", Format.MULTIPLE_CHOICE, "CommonsenseQA multiple-choice questions",
         (HubSource("tau/commonsense_qa", None, {"train": "train", "validation": "validation"}),),
         _commonsense_qa, train_examples=9_741, tokens_per_example=5 * 20),
    Task("cosmosqa", Format.MULTIPLE_CHOICE, "Cosmos QA reading comprehension with commonsense",
         (HubSource("allenai/cosmos_qa", None, {"train": "train", "validation": "validation"},
                    revision="refs/convert/parquet"),),
         _cosmos_qa, train_examples=25_262, tokens_per_example=4 * 110, default_max_seq_length=256),
    Task("ccg", Format.TAGGING, "CCGbank supertagging (local files only: CCGbank is licensed)",
         (), _tagging, train_examples=38_015, tokens_per_example=40),
    # --- cross-lingual targets: train English, evaluate zero-shot on every language ---
    Task("xnli", Format.CLASSIFICATION, "XNLI: MNLI-style training, 15-language zero-shot test",
         (HubSource("facebook/xnli", "{lang}"),),
         _pair("premise", "hypothesis"), NLI_LABELS, XNLI_LANGUAGES, is_target=True,
         train_examples=392_702, tokens_per_example=40),
    Task("pawsx", Format.CLASSIFICATION, "PAWS-X paraphrase identification, 7 languages",
         (HubSource("google-research-datasets/paws-x", "{lang}"),),
         _pair("sentence1", "sentence2"), ("different", "paraphrase"), PAWSX_LANGUAGES,
         is_target=True, train_examples=49_401, tokens_per_example=50),
]

TASKS: dict[str, Task] = {t.name: t for t in _TASK_LIST}
INTERMEDIATE_TASKS = tuple(n for n, t in TASKS.items() if not t.is_target)
TARGET_TASKS = tuple(n for n, t in TASKS.items() if t.is_target)


def unknown_task_message(name: str) -> str:
    return f"unknown task {name!r}; known tasks: {', '.join(TASKS)}"
