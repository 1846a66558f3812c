"""Raw data of a run: which splits it needs, where each lives (local JSON-lines files or the
Hugging Face hub), reading them, normalising rows to the task format's examples, and a
fingerprint of the data for the tokenized-data cache.

Local layout (trainer/tasks.py): `<dir>/<split>.jsonl`, or `<dir>/<language>/<split>.jsonl` for
a multilingual target. Hub: `datasets.load_dataset(source.path, source.config, split=...)` for
every source of the task, concatenated.

No torch import: `check_local_files` runs before the training stack is loaded, so a run with a
missing file fails in a second with a one-line reason.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xstilts.trainer.config import RunConfig, Stage
from xstilts.trainer.tasks import TASKS, Example, Format, Row, Task

TRAIN, VALIDATION, TEST = "train", "validation", "test"
ENGLISH = "en"


class DataError(ValueError):
    """The run's data is missing or malformed: the run is invalid, retrying cannot help."""


@dataclass(frozen=True)
class SplitRef:
    """One split of one task in one language."""

    task: str
    split: str
    language: str = ENGLISH

    @property
    def name(self) -> str:
        per_language = TASKS[self.task].is_multilingual or self.language != ENGLISH
        return f"{self.task}/{self.split}" + (f"/{self.language}" if per_language else "")


def is_retrieval(config: RunConfig) -> bool:
    """A retrieval target (BUCC, Tatoeba) trains nothing: it only evaluates an encoder."""
    return TASKS[config.tasks[0]].format is Format.RETRIEVAL


def training_splits(config: RunConfig) -> list[SplitRef]:
    """Each task's English training split, then (translate-train) each translation of it."""
    if is_retrieval(config):
        return []
    return [SplitRef(t, TRAIN, lang) for t in config.tasks for lang in (ENGLISH, *config.train_languages)]


def dev_splits(config: RunConfig) -> list[SplitRef]:
    """English dev sets: model selection."""
    return [] if is_retrieval(config) else [SplitRef(t, VALIDATION) for t in config.tasks]


def eval_languages(config: RunConfig) -> tuple[str, ...]:
    if config.stage is not Stage.TARGET:
        return ()
    return config.eval_languages or TASKS[config.tasks[0]].languages


def test_splits(config: RunConfig) -> list[SplitRef]:
    """Zero-shot test sets of a target run, one per language; none for an intermediate run."""
    return [SplitRef(config.tasks[0], TEST, lang) for lang in eval_languages(config)]


def tuning_splits(config: RunConfig) -> list[SplitRef]:
    """Per-language dev sets of a retrieval target that has them (BUCC): its score threshold
    is chosen on them, as in XTREME."""
    task = TASKS[config.tasks[0]]
    if task.format is not Format.RETRIEVAL or not any(VALIDATION in s.splits for s in task.hub):
        return []
    return [SplitRef(task.name, VALIDATION, lang) for lang in eval_languages(config)]


def target_dev_splits(config: RunConfig) -> list[SplitRef]:
    """Dev sets of a target run in its languages other than English: the target-dev ("oracle")
    model-selection protocol next to the English-dev one. Only where the task has a dev set
    apart from its test set in those languages (local <dir>/<language>/validation.jsonl; a hub
    source whose per-language config has a validation split that is not its test split): the
    protocol is then reported as unavailable rather than failing the run."""
    if config.stage is not Stage.TARGET:
        return []
    task = TASKS[config.tasks[0]]
    refs = [SplitRef(task.name, VALIDATION, lang) for lang in eval_languages(config) if lang != ENGLISH]
    data_dir = config.task_data.get(task.name)
    if data_dir is not None:
        return [ref for ref in refs if local_path(data_dir, ref).is_file()]
    per_language = [s for s in task.hub if s.config and "{lang}" in s.config]
    if per_language and all(VALIDATION in s.splits and s.splits[VALIDATION] != s.splits.get(TEST)
                            for s in per_language):
        return refs
    return []


def required_splits(config: RunConfig) -> list[SplitRef]:
    return training_splits(config) + dev_splits(config) + tuning_splits(config) + test_splits(config)


# --- local files ----------------------------------------------------------------------------


def local_path(data_dir: str | Path, ref: SplitRef) -> Path:
    """`<dir>/<split>.jsonl`; `<dir>/<language>/<split>.jsonl` for a multilingual target, and for
    a translation of an English task's split (translate-train)."""
    base = Path(data_dir)
    if TASKS[ref.task].is_multilingual or ref.language != ENGLISH:
        base = base / ref.language
    return base / f"{ref.split}.jsonl"


def check_local_files(config: RunConfig) -> None:
    """Every local file the run will read exists; else a DataError naming the first missing
    one, the task_data entry it comes from and the layout expected."""
    for ref in required_splits(config):
        data_dir = config.task_data.get(ref.task)
        if data_dir is None:
            if not TASKS[ref.task].hub:
                raise DataError(
                    f"task {ref.task!r} has no hub dataset: set task_data[{ref.task!r}] to a directory of"
                    f" {TRAIN}.jsonl and {VALIDATION}.jsonl files")
            continue
        path = local_path(data_dir, ref)
        if not path.is_file():
            layout = ("<dir>/<language>/<split>.jsonl" if TASKS[ref.task].is_multilingual or ref.language != ENGLISH
                      else "<dir>/<split>.jsonl")
            why = f" (the {ref.language} translation of its training data: translate-train)" if (
                ref.language != ENGLISH and not TASKS[ref.task].is_multilingual) else ""
            raise DataError(
                f"missing data file {path} for {ref.name}{why}: task_data[{ref.task!r}] = {data_dir!r} must hold"
                f" {layout}")
    if config.mlm is not None:
        from xstilts.trainer.mlm import corpus_files

        corpus_files(config.mlm.corpus)


def read_jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: a row must be a JSON object, got {type(row).__name__}")
            yield row


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- the hub --------------------------------------------------------------------------------


def hub_datasets(task: Task, ref: SplitRef) -> list[Any]:
    """The task's hub datasets for one split (several sources: ANLI+), loaded with
    `datasets.load_dataset`. Sources without that split are skipped. A task whose split holds
    every language (TyDiQA-GoldP) keeps the rows of the split's language."""
    import datasets

    loaded = []
    for source in task.hub:
        split_name = source.splits.get(ref.split)
        if split_name is None:
            continue
        dataset = datasets.load_dataset(source.path, source.config_for(ref.language), split=split_name,
                                        revision=source.revision)
        if task.language_of is not None:
            dataset = dataset.filter(_of_language(task, ref.language))
        loaded.append(dataset)
    if not loaded:
        raise DataError(f"task {task.name!r} has no hub split {ref.split!r}; give local files with task_data")
    return loaded


def _of_language(task: Task, language: str) -> Any:
    language_of = task.language_of
    assert language_of is not None
    return lambda row: language_of(row) == language


# --- one split, raw --------------------------------------------------------------------------


@dataclass(frozen=True)
class RawSplit:
    """Where a split's rows come from and a fingerprint of their content. Rows are read
    lazily: a cache hit on the tokenized data never reads them."""

    ref: SplitRef
    where: str
    fingerprint: str
    _path: Path | None = None
    _hub: tuple[Any, ...] = ()

    def rows(self) -> Iterator[Row]:
        if self._path is not None:
            yield from read_jsonl(self._path)
        for dataset in self._hub:
            yield from dataset


def open_split(config: RunConfig, ref: SplitRef) -> RawSplit:
    task = TASKS[ref.task]
    data_dir = config.task_data.get(ref.task)
    if data_dir is not None:
        path = local_path(data_dir, ref)
        if not path.is_file():
            raise DataError(f"missing data file {path} for {ref.name}")
        return RawSplit(ref, str(path), f"file:{file_digest(path)}", _path=path)
    loaded = hub_datasets(task, ref)
    fingerprint = "hub:" + ",".join(str(getattr(d, "_fingerprint", "")) for d in loaded)
    where = "+".join(s.path for s in task.hub)
    return RawSplit(ref, f"{where} ({ref.split}, {ref.language})", fingerprint, _hub=tuple(loaded))


# --- normalisation ---------------------------------------------------------------------------


def normalize_rows(task: Task, rows: Iterable[Row], where: str) -> list[Example]:
    """The task's normalised examples; rows the task drops (unlabeled) are skipped. A row that
    does not fit the schema is a DataError naming the row and the problem."""
    examples: list[Example] = []
    for number, row in enumerate(rows, 1):
        try:
            example = task.normalize(row)
        except KeyError as e:
            raise DataError(f"{where}: row {number} has no column {e.args[0]!r} ({task.name} needs"
                            f" the columns of its hub dataset)") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise DataError(f"{where}: row {number}: {e}") from None
        if example is None:
            continue
        _check_example(task, example, where, number)
        examples.append(example)
    if not examples:
        raise DataError(f"{where}: no usable rows")
    return examples


def _check_example(task: Task, example: Example, where: str, number: int) -> None:
    if task.format is Format.CLASSIFICATION and not 0 <= example["label"] < len(task.labels):
        raise DataError(f"{where}: row {number} has label {example['label']}; {task.name} labels are"
                        f" 0..{len(task.labels) - 1} ({', '.join(task.labels)})")
    if task.format is Format.MULTIPLE_CHOICE and not 0 <= example["label"] < len(example["choices"]):
        raise DataError(f"{where}: row {number} has label {example['label']} but"
                        f" {len(example['choices'])} choices")
