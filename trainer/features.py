"""Tokenized features of one split, per task format, and their on-disk cache.

Features (one row per model input; "length" is the padded width the row needs):

    classification   input_ids [int], label
    multiple_choice  input_ids [[int] per choice], label
    span_qa          input_ids, start_positions, end_positions (0, 0: no answer in this window),
                     example_index, offsets [[start, end] char span per token; -1, -1 outside
                     the context]; a long context gives several overlapping windows
    tagging          input_ids, labels [tag id on each word's first sub-token, -100 elsewhere,
                     -1 for a tag the label set lacks (scored as wrong)]

Every row also has "example_index" (its example) and "length". Span QA keeps its examples
(id, context, answers) beside the features, for scoring predicted spans against the text.

The cache key is (tokenizer identity, task, split, language, max length, label set, data
fingerprint, FEATURES_VERSION), so reruns and other runs of the same model family reuse the
work; entries are written to a temporary directory and renamed into place, so concurrent runs
never read a half-written entry, and a lock file lets one process (rank) tokenize while the
others wait and then read its entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xstilts.trainer.data import TRAIN, RawSplit, SplitRef, normalize_rows
from xstilts.trainer.rundir import file_lock
from xstilts.trainer.scoring import IGNORE
from xstilts.trainer.tasks import TASKS, Example, Format, Task

log = logging.getLogger(__name__)

FEATURES_VERSION = 1  # bump when encoding changes: invalidates every cache entry
CACHE_ENV = "XSTILTS_CACHE"
ENCODE_CHUNK = 1000  # examples per tokenizer call
PARALLEL_MIN_EXAMPLES = 20_000  # splits at least this big are tokenized by several processes
MAX_TOKENIZER_WORKERS = 16
NO_TAG = -1  # a tag outside the label set: never predicted, so scored as wrong
MAX_QUESTION_TOKENS = 64


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "xstilts" / "tokenized")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What the tokenizer does, not where it was loaded from: its serialised pipeline (fast
    tokenizers) or vocabulary, its class and special tokens."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update(json.dumps(tokenizer.all_special_tokens).encode())
    return digest.hexdigest()[:16]


def doc_stride(max_length: int) -> int:
    """Overlap of span-QA windows: 128 tokens at the usual 384, as in the SQuAD reference."""
    return max(max_length // 3, 1)


# --- encoders, one per format -----------------------------------------------------------------


def encode_classification(examples: Sequence[Example], tokenizer: Any, max_length: int,
                          offset: int) -> dict[str, list[Any]]:
    pairs = [e["text_b"] for e in examples]
    firsts = [e["text_a"] for e in examples]
    if all(b is None for b in pairs):
        ids = tokenizer(firsts, truncation=True, max_length=max_length)["input_ids"]
    else:
        ids = tokenizer(firsts, [b or "" for b in pairs], truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": ids, "label": [e["label"] for e in examples],
            "example_index": list(range(offset, offset + len(examples))), "length": [len(i) for i in ids]}


def encode_multiple_choice(examples: Sequence[Example], tokenizer: Any, max_length: int,
                           offset: int) -> dict[str, list[Any]]:
    contexts = [e["context"] for e in examples for _ in e["choices"]]
    choices = [c for e in examples for c in e["choices"]]
    flat = tokenizer(contexts, choices, truncation=True, max_length=max_length)["input_ids"]
    ids, at = [], 0
    for e in examples:
        ids.append(flat[at: at + len(e["choices"])])
        at += len(e["choices"])
    return {"input_ids": ids, "label": [e["label"] for e in examples],
            "example_index": list(range(offset, offset + len(examples))),
            "length": [max(len(c) for c in i) for i in ids]}


def _short_question(question: str, tokenizer: Any) -> str:
    """Questions are cut to MAX_QUESTION_TOKENS so that the context always gets a window."""
    enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= MAX_QUESTION_TOKENS:
        return question
    return question[: enc["offset_mapping"][MAX_QUESTION_TOKENS - 1][1]]


def encode_span_qa(examples: Sequence[Example], tokenizer: Any, max_length: int,
                   offset: int) -> dict[str, list[Any]]:
    """Sliding windows over each context (question first, as in the SQuAD reference). A window
    holding the whole first answer is labelled with its token span, any other with (0, 0), the
    first token: "no answer here"."""
    enc = tokenizer(
        [_short_question(e["question"], tokenizer) for e in examples], [e["context"] for e in examples],
        truncation="only_second", max_length=max_length, stride=doc_stride(max_length),
        return_overflowing_tokens=True, return_offsets_mapping=True,
    )
    keys = ("input_ids", "start_positions", "end_positions", "example_index", "offsets", "length")
    out: dict[str, list[Any]] = {k: [] for k in keys}
    for i, ids in enumerate(enc["input_ids"]):
        local = enc["overflow_to_sample_mapping"][i]
        sequence_ids = enc.sequence_ids(i)
        offsets = [list(o) if s == 1 else [-1, -1] for o, s in zip(enc["offset_mapping"][i], sequence_ids, strict=True)]
        answers = examples[local]["answers"]
        start = end = 0
        if answers["text"]:
            a_start = answers["answer_start"][0]
            a_end = a_start + len(answers["text"][0])
            context_tokens = [t for t, s in enumerate(sequence_ids) if s == 1]
            if offsets[context_tokens[0]][0] <= a_start and offsets[context_tokens[-1]][1] >= a_end:
                start = next(t for t in context_tokens if offsets[t][1] > a_start)
                end = max(t for t in context_tokens if offsets[t][0] < a_end)
        out["input_ids"].append(ids)
        out["start_positions"].append(start)
        out["end_positions"].append(end)
        out["example_index"].append(offset + local)
        out["offsets"].append(offsets)
        out["length"].append(len(ids))
    return out


def encode_tagging(examples: Sequence[Example], tokenizer: Any, max_length: int, offset: int,
                   tag_ids: dict[str, int]) -> dict[str, list[Any]]:
    enc = tokenizer([e["tokens"] for e in examples], is_split_into_words=True, truncation=True,
                    max_length=max_length)
    labels = []
    for i, e in enumerate(examples):
        row, previous = [], None
        for word in enc.word_ids(i):
            if word is None or word == previous:
                row.append(IGNORE)
            else:
                row.append(tag_ids.get(e["tags"][word], NO_TAG))
            previous = word
        labels.append(row)
    ids = enc["input_ids"]
    return {"input_ids": ids, "labels": labels, "example_index": list(range(offset, offset + len(examples))),
            "length": [len(i) for i in ids]}


def encode_chunk(task: Task, chunk: Sequence[Example], tokenizer: Any, max_length: int, offset: int,
                 tag_ids: dict[str, int]) -> dict[str, list[Any]]:
    if task.format is Format.CLASSIFICATION:
        return encode_classification(chunk, tokenizer, max_length, offset)
    if task.format is Format.MULTIPLE_CHOICE:
        return encode_multiple_choice(chunk, tokenizer, max_length, offset)
    if task.format is Format.SPAN_QA:
        return encode_span_qa(chunk, tokenizer, max_length, offset)
    return encode_tagging(chunk, tokenizer, max_length, offset, tag_ids)


def tokenizer_workers(examples: int) -> int:
    """Processes to tokenize a split with: one for a small split (starting workers would cost
    more than it saves), else every CPU this process may use but one, at most
    MAX_TOKENIZER_WORKERS. Only one process per cache entry tokenizes (the others wait on its
    lock), so the other ranks' CPUs are idle meanwhile."""
    if examples < PARALLEL_MIN_EXAMPLES:
        return 1
    return max(1, min(MAX_TOKENIZER_WORKERS, len(os.sched_getaffinity(0)) - 1))


# The worker processes' tokenizing context: set once per worker by the pool's initializer.
_worker: dict[str, Any] = {}


def _start_worker(task: Task, tokenizer: Any, max_length: int, tag_ids: dict[str, int]) -> None:
    _worker.update(task=task, tokenizer=tokenizer, max_length=max_length, tag_ids=tag_ids)


def _encode_in_worker(job: tuple[int, Sequence[Example]]) -> dict[str, list[Any]]:
    offset, chunk = job
    return encode_chunk(_worker["task"], chunk, _worker["tokenizer"], _worker["max_length"], offset,
                        _worker["tag_ids"])


def encode(task: Task, examples: Sequence[Example], tokenizer: Any, max_length: int,
           labels: Sequence[str] = (), workers: int | None = None) -> dict[str, list[Any]]:
    """All features of a split, as columns; chunks are tokenized by `workers` processes
    (default: `tokenizer_workers`), in order, so the result does not depend on their number."""
    import concurrent.futures
    import multiprocessing

    columns: dict[str, list[Any]] = {}
    tag_ids = {tag: i for i, tag in enumerate(labels)}
    jobs = [(at, examples[at: at + ENCODE_CHUNK]) for at in range(0, len(examples), ENCODE_CHUNK)]
    workers = tokenizer_workers(len(examples)) if workers is None else workers
    if workers > 1:
        # fork: the workers inherit the tokenizer instead of loading it again
        with concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker,
                initargs=(task, tokenizer, max_length, tag_ids)) as pool:
            parts = list(pool.map(_encode_in_worker, jobs))
    else:
        parts = [encode_chunk(task, chunk, tokenizer, max_length, at, tag_ids) for at, chunk in jobs]
    for part in parts:
        for key, values in part.items():
            columns.setdefault(key, []).extend(values)
    return columns


def learned_tags(examples: Sequence[Example]) -> tuple[str, ...]:
    """A tagging task without a fixed label set learns it from its training split."""
    return tuple(sorted({tag for e in examples for tag in e["tags"]}))


# --- one split, tokenized and cached -----------------------------------------------------------


@dataclass
class Encoded:
    """The tokenized features of one split (a `datasets.Dataset`, memory-mapped from the cache),
    the label names they use, and for span QA the examples they score against."""

    ref: SplitRef
    features: Any
    labels: tuple[str, ...]
    examples: Any = None  # span QA: datasets.Dataset of id, context, answers

    @property
    def task(self) -> Task:
        return TASKS[self.ref.task]

    def __len__(self) -> int:
        return len(self.features)


def cache_key(tokenizer_id: str, raw: RawSplit, max_length: int, labels: Sequence[str]) -> str:
    doc = {"version": FEATURES_VERSION, "tokenizer": tokenizer_id, "task": raw.ref.task, "split": raw.ref.split,
           "language": raw.ref.language, "max_length": max_length, "labels": list(labels), "data": raw.fingerprint}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


def split_labels(task: Task, train_labels: Sequence[str] | None) -> tuple[str, ...]:
    """The label names a split is encoded with: the task's, or for a tagging task without them
    the set its training split taught (None while encoding that training split)."""
    if task.labels or task.format is not Format.TAGGING:
        return task.labels
    return tuple(train_labels or ())


def load_encoded(raw: RawSplit, tokenizer: Any, tokenizer_id: str, max_length: int, cache_dir: Path,
                 train_labels: Sequence[str] | None = None) -> Encoded:
    """The split's features from the cache, or tokenized now and cached."""
    import datasets

    task = TASKS[raw.ref.task]
    learns_tags = task.format is Format.TAGGING and not task.labels and raw.ref.split == TRAIN
    labels = () if learns_tags else split_labels(task, train_labels)
    entry = cache_dir / cache_key(tokenizer_id, raw, max_length, labels)
    if not (entry / "meta.json").is_file():
        # One process tokenizes while the others (the other ranks, a concurrent run) wait for it.
        with file_lock(cache_dir / f"{entry.name}.lock"):
            if not (entry / "meta.json").is_file():
                _write_entry(entry, task, raw, tokenizer, max_length, labels, learns_tags)
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    features = datasets.load_from_disk(str(entry / "features"))
    examples = datasets.load_from_disk(str(entry / "examples")) if (entry / "examples").is_dir() else None
    return Encoded(raw.ref, features, tuple(meta["labels"]), examples)


def _write_entry(entry: Path, task: Task, raw: RawSplit, tokenizer: Any, max_length: int,
                 labels: tuple[str, ...], learns_tags: bool) -> None:
    import datasets

    examples = normalize_rows(task, raw.rows(), raw.where)
    if learns_tags:
        labels = learned_tags(examples)
    log.info("tokenizing %s: %d examples from %s", raw.ref.name, len(examples), raw.where)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        datasets.Dataset.from_dict(encode(task, examples, tokenizer, max_length, labels)).save_to_disk(
            str(tmp / "features"))
        if task.format is Format.SPAN_QA:
            kept = [{"id": e["id"], "context": e["context"], "answers": e["answers"]} for e in examples]
            datasets.Dataset.from_list(kept).save_to_disk(str(tmp / "examples"))
        meta = {"split": raw.ref.name, "source": raw.where, "examples": len(examples), "labels": list(labels),
                "max_length": max_length}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / "meta.json").is_file():  # not a concurrent writer's finished entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
