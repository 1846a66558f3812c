"""The task registry: one entry per task. Adding a task is one `Task(...)` in TASKS.

An entry says where the data lives (a Hugging Face hub dataset, or local JSON-lines files in
the same schema), its format, labels, languages and metric, and how to turn one raw row into
the format's normalised example:

    classification   {"text_a": str, "text_b": str | None, "label": int}
    multiple_choice  {"context": str, "choices": [str, ...], "label": int}
    span_qa          {"id": str, "question": str, "context": str,
                      "answers": {"text": [str], "answer_start": [int]}}   (empty: no answer)
    tagging          {"tokens": [str], "tags": [str]}
    retrieval        {"source": str, "target": str}   (a sentence and its translation)

Local files: `<dir>/<split>.jsonl`, or `<dir>/<language>/<split>.jsonl` for multilingual
targets, with the hub dataset's columns. Pure Python: no torch, no datasets import.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
    RETRIEVAL = "retrieval"  # no training: sentences are embedded by the encoder and matched


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
    # Hub config names that spell a language otherwise than the task's code: "udpos.English"
    # for "en", "tatoeba.deu" for "de". Codes not listed are used as they are.
    language_names: Mapping[str, str] = field(default_factory=dict)

    def config_for(self, language: str) -> str | None:
        if self.config is None:
            return None
        return self.config.format(lang=self.language_names.get(language, language))


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
    # One hub split holding every language (TyDiQA-GoldP): the language of a row, so that a
    # language's split keeps only its rows.
    language_of: Callable[[Row], str] | None = None
    xtreme: bool = False  # one of the nine tasks of the XTREME benchmark's average

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


def _hub_tags(column: str, names: tuple[str, ...]) -> Callable[[Row], Example | None]:
    """A tagging row of a hub dataset whose tags are class ids (a ClassLabel sequence; a
    local copy may also spell them as names)."""

    def normalize(row: Row) -> Example | None:
        tags = [names[t] if isinstance(t, int) else str(t) for t in row[column]]
        return _tagging({"tokens": row["tokens"], "tags": tags})

    return normalize


def _retrieval(row: Row) -> Example | None:
    return {"source": str(row["source_sentence"]), "target": str(row["target_sentence"])}


# TyDiQA-GoldP holds every language in one split; an id starts with the language's name.
TYDIQA_NAMES = {"en": "english", "ar": "arabic", "bn": "bengali", "fi": "finnish", "id": "indonesian",
                "ko": "korean", "ru": "russian", "sw": "swahili", "te": "telugu"}
_TYDIQA_CODES = {name: code for code, name in TYDIQA_NAMES.items()}


def _tydiqa_language(row: Row) -> str:
    return _TYDIQA_CODES.get(str(row["id"]).split("-", 1)[0], "")


NLI_LABELS = ("entailment", "neutral", "contradiction")
XNLI_LANGUAGES = ("en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh", "hi", "sw", "ur")
PAWSX_LANGUAGES = ("en", "de", "es", "fr", "ja", "ko", "zh")
GLUE = "nyu-mll/glue"
# google/xtreme on the hub: Parquet files on its main branch (one directory per config), so
# no loading script runs. Languages and metrics are those of the XTREME paper (Hu et al.
# 2020, Table 1 and its scripts).
XTREME = "google/xtreme"
SQUAD_V1 = HubSource("rajpurkar/squad", None, {"train": "train", "validation": "validation"})
XQUAD_LANGUAGES = ("en", "es", "de", "el", "ru", "tr", "ar", "vi", "th", "zh", "hi")
MLQA_LANGUAGES = ("en", "es", "de", "ar", "hi", "vi", "zh")
TYDIQA_LANGUAGES = tuple(TYDIQA_NAMES)
PANX_LANGUAGES = ("en", "af", "ar", "bg", "bn", "de", "el", "es", "et", "eu", "fa", "fi", "fr", "he", "hi", "hu",
                  "id", "it", "ja", "jv", "ka", "kk", "ko", "ml", "mr", "ms", "my", "nl", "pt", "ru", "sw", "ta",
                  "te", "th", "tl", "tr", "ur", "vi", "yo", "zh")
PANX_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
# UD v2.5 treebanks by language name, as the hub's configs name them ("udpos.English")
UDPOS_NAMES = {"en": "English", "af": "Afrikaans", "ar": "Arabic", "bg": "Bulgarian", "de": "German",
               "el": "Greek", "es": "Spanish", "et": "Estonian", "eu": "Basque", "fa": "Persian", "fi": "Finnish",
               "fr": "French", "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian", "id": "Indonesian",
               "it": "Italian", "ja": "Japanese", "kk": "Kazakh", "ko": "Korean", "mr": "Marathi", "nl": "Dutch",
               "pt": "Portuguese", "ru": "Russian", "ta": "Tamil", "te": "Telugu", "th": "Thai", "tl": "Tagalog",
               "tr": "Turkish", "ur": "Urdu", "vi": "Vietnamese", "yo": "Yoruba", "zh": "Chinese"}
UDPOS_TAGS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
              "SCONJ", "SYM", "VERB", "X")
BUCC_LANGUAGES = ("de", "fr", "ru", "zh")
# Tatoeba configs by ISO 639-3 code. XTREME has 36 languages; the hub has no Telugu config.
TATOEBA_NAMES = {"af": "afr", "ar": "ara", "bg": "bul", "bn": "ben", "de": "deu", "el": "ell", "es": "spa",
                 "et": "est", "eu": "eus", "fa": "pes", "fi": "fin", "fr": "fra", "he": "heb", "hi": "hin",
                 "hu": "hun", "id": "ind", "it": "ita", "ja": "jpn", "jv": "jav", "ka": "kat", "kk": "kaz",
                 "ko": "kor", "ml": "mal", "mr": "mar", "nl": "nld", "pt": "por", "ru": "rus", "sw": "swh",
                 "ta": "tam", "th": "tha", "tl": "tgl", "tr": "tur", "ur": "urd", "vi": "vie", "zh": "cmn"}


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
         train_examples=392_702, tokens_per_example=40, xtreme=True),
    Task("pawsx", Format.CLASSIFICATION, "PAWS-X paraphrase identification, 7 languages",
         (HubSource("google-research-datasets/paws-x", "{lang}"),),
         _pair("sentence1", "sentence2"), ("different", "paraphrase"), PAWSX_LANGUAGES,
         is_target=True, train_examples=49_401, tokens_per_example=50, xtreme=True),
    # Question answering: span head, SQuAD's F1 and exact match.
    Task("xquad", Format.SPAN_QA, "XQuAD: SQuAD v1.1 training, 11-language zero-shot test",
         (SQUAD_V1, HubSource(XTREME, "XQuAD.{lang}", {"test": "validation"})),
         _squad, languages=XQUAD_LANGUAGES, is_target=True, metric="f1", train_examples=87_599,
         tokens_per_example=160, default_max_seq_length=384, xtreme=True),
    Task("mlqa", Format.SPAN_QA, "MLQA: SQuAD v1.1 training, 7-language zero-shot test",
         (SQUAD_V1, HubSource(XTREME, "MLQA.{lang}.{lang}", {"test": "test"})),
         _squad, languages=MLQA_LANGUAGES, is_target=True, metric="f1", train_examples=87_599,
         tokens_per_example=160, default_max_seq_length=384, xtreme=True),
    Task("tydiqa", Format.SPAN_QA, "TyDiQA-GoldP: English training, 9-language zero-shot test (its dev set)",
         (HubSource(XTREME, "tydiqa", {"train": "train", "validation": "validation", "test": "validation"}),),
         _squad, languages=TYDIQA_LANGUAGES, is_target=True, metric="f1", train_examples=3_696,
         tokens_per_example=160, default_max_seq_length=384, language_of=_tydiqa_language, xtreme=True),
    # Structured prediction: tagging head, F1 (entity-level for PAN-X's BIO tags).
    Task("udpos", Format.TAGGING, "UD POS (v2.5): English training, 33-language zero-shot test",
         (HubSource(XTREME, "udpos.{lang}", language_names=UDPOS_NAMES),),
         _hub_tags("pos_tags", UDPOS_TAGS), UDPOS_TAGS, tuple(UDPOS_NAMES), is_target=True, metric="f1",
         train_examples=21_253, tokens_per_example=40, xtreme=True),
    Task("panx", Format.TAGGING, "PAN-X (WikiANN) NER: English training, 40-language zero-shot test",
         (HubSource(XTREME, "PAN-X.{lang}"),),
         _hub_tags("ner_tags", PANX_TAGS), PANX_TAGS, PANX_LANGUAGES, is_target=True, metric="f1",
         train_examples=20_000, tokens_per_example=30, xtreme=True),
    # Sentence retrieval: no training; mean-pooled hidden states of a middle layer.
    Task("bucc2018", Format.RETRIEVAL, "BUCC 2018 parallel sentence mining (to English), F1",
         (HubSource(XTREME, "bucc18.{lang}", {"validation": "validation", "test": "test"}),),
         _retrieval, languages=BUCC_LANGUAGES, is_target=True, metric="f1", tokens_per_example=40,
         xtreme=True),
    Task("tatoeba", Format.RETRIEVAL, "Tatoeba sentence retrieval (to English), 35 languages, accuracy",
         (HubSource(XTREME, "tatoeba.{lang}", {"test": "validation"}, language_names=TATOEBA_NAMES),),
         _retrieval, languages=tuple(TATOEBA_NAMES), is_target=True, tokens_per_example=20, xtreme=True),
]

TASKS: dict[str, Task] = {t.name: t for t in _TASK_LIST}
INTERMEDIATE_TASKS = tuple(n for n, t in TASKS.items() if not t.is_target)
TARGET_TASKS = tuple(n for n, t in TASKS.items() if t.is_target)


def unknown_task_message(name: str) -> str:
    return f"unknown task {name!r}; known tasks: {', '.join(TASKS)}"


def selection_metric(tasks: Sequence[Task]) -> str:
    """The name of the dev number that selects the best checkpoint: the tasks' primary metric,
    or "score" (the mean of each task's primary metric) when a multi-task run mixes metrics."""
    names = {t.metric for t in tasks}
    return names.pop() if len(names) == 1 else "score"
