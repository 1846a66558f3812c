"""Raw data (local files and the hub loader), normalisation, tokenization per format, and the
tokenized-data cache, on the tiny hub's tokenizer and generated data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from fixtures.tiny_hub import TinyHub, write_jsonl
from xstilts.trainer.config import RunConfig
from xstilts.trainer.data import (
    DataError,
    RawSplit,
    SplitRef,
    check_local_files,
    hub_datasets,
    normalize_rows,
    open_split,
    required_splits,
)
from xstilts.trainer.features import (
    IGNORE,
    NO_TAG,
    cache_key,
    encode,
    load_encoded,
    tokenizer_fingerprint,
)
from xstilts.trainer.tasks import TASKS, HubSource


@pytest.fixture(scope="module")
def tokenizer(tiny_hub: TinyHub):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hub.model)


def target_config(tiny_hub: TinyHub, **overrides: object) -> RunConfig:
    base: dict[str, object] = {"model": str(tiny_hub.model), "stage": "target", "tasks": ("pawsx",),
                               "task_data": tiny_hub.task_data("pawsx")}
    return RunConfig.model_validate(base | overrides)


def test_a_target_run_needs_english_train_and_dev_and_every_test_language(tiny_hub: TinyHub) -> None:
    refs = required_splits(target_config(tiny_hub))
    assert [r.name for r in refs[:2]] == ["pawsx/train/en", "pawsx/validation/en"]
    assert [r.language for r in refs[2:]] == ["en", "de", "es", "fr", "ja", "ko", "zh"]
    check_local_files(target_config(tiny_hub))
    assert len(required_splits(target_config(tiny_hub, eval_languages=("de",)))) == 3


def test_a_missing_local_file_is_named_with_the_layout_expected(tiny_hub: TinyHub, tmp_path: Path) -> None:
    partial = tmp_path / "pawsx"
    for lang in ("en", "de", "es", "fr", "ja", "zh"):  # no Korean
        for split in ("train", "validation", "test"):
            (partial / lang).mkdir(parents=True, exist_ok=True)
            (partial / lang / f"{split}.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match=r"missing data file .*ko/test.jsonl for pawsx/test/ko: task_data\['pawsx'\]"
                                         r" = .* must hold <dir>/<language>/<split>.jsonl"):
        check_local_files(target_config(tiny_hub, task_data={"pawsx": str(partial)}))
    ccg = RunConfig(model="m", stage="intermediate", tasks=("ccg",))
    with pytest.raises(DataError, match="task 'ccg' has no hub dataset: set task_data"):
        check_local_files(ccg)


def test_rows_are_normalised_and_bad_rows_named() -> None:
    snli = [{"premise": "a", "hypothesis": "b", "label": 1}, {"premise": "c", "hypothesis": "d", "label": -1}]
    assert normalize_rows(TASKS["mnli"], snli, "x") == [{"text_a": "a", "text_b": "b", "label": 1}]
    with pytest.raises(DataError, match=r"mnli\.jsonl: row 2 has no column 'hypothesis'"):
        normalize_rows(TASKS["mnli"], [snli[0], {"premise": "p", "label": 0}], "mnli.jsonl")
    with pytest.raises(DataError, match=r"row 1 has label 7; mnli labels are 0\.\.2"):
        normalize_rows(TASKS["mnli"], [{"premise": "a", "hypothesis": "b", "label": 7}], "f")
    with pytest.raises(DataError, match="row 1: tagging row has 2 tokens but 1 tags"):
        normalize_rows(TASKS["ccg"], [{"tokens": ["a", "b"], "tags": ["N"]}], "f")


def test_bad_json_is_a_data_error_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": 0}\n{not json\n')
    raw = RawSplit(SplitRef("mnli", "train"), "here", "f", _path=tmp_path / "train.jsonl")
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid JSON"):
        list(raw.rows())


def test_the_hub_loader_reads_a_dataset_repository_with_per_language_configs(tmp_path: Path) -> None:
    """datasets.load_dataset over a dataset repository laid out like facebook/xnli on the hub
    (parquet per config, configs declared in the README), the same call a cluster makes."""
    import datasets

    repo = tmp_path / "xnli-repo"
    rows = {"de": [{"premise": "ein", "hypothesis": "zwei", "label": 2}],
            "fr": [{"premise": "un", "hypothesis": "deux", "label": 0},
                   {"premise": "x", "hypothesis": "y", "label": 1}]}
    for lang, data in rows.items():
        (repo / lang).mkdir(parents=True)
        datasets.Dataset.from_list(data).to_parquet(str(repo / lang / "test-00000-of-00001.parquet"))
    configs = "".join(f"- config_name: {lang}\n  data_files:\n  - split: test\n    path: {lang}/test-*\n"
                      for lang in rows)
    (repo / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    task = dataclasses.replace(TASKS["xnli"], hub=(HubSource(str(repo), "{lang}"),))
    loaded = hub_datasets(task, SplitRef("xnli", "test", "fr"))
    assert [dict(r) for d in loaded for r in d] == rows["fr"]
    assert normalize_rows(task, [r for d in loaded for r in d], "hub")[1] == {"text_a": "x", "text_b": "y", "label": 1}
    with pytest.raises(DataError, match="has no hub split 'train'"):
        hub_datasets(dataclasses.replace(task, hub=(HubSource(str(repo), "{lang}", {"test": "test"}),)),
                     SplitRef("xnli", "train"))


def test_classification_and_multiple_choice_features(tokenizer) -> None:  # type: ignore[no-untyped-def]
    pair = encode(TASKS["mnli"], [{"text_a": "hello", "text_b": "world", "label": 2}], tokenizer, 64)
    ids = pair["input_ids"][0]
    assert ids[0] == tokenizer.cls_token_id and ids.count(tokenizer.sep_token_id) == 3  # <s> a </s></s> b </s>
    assert pair["label"] == [2] and pair["length"] == [len(ids)]
    mc = encode(TASKS["hellaswag"], [{"context": "c", "choices": ["a", "b b", "c", "d"], "label": 3}], tokenizer, 64)
    assert len(mc["input_ids"][0]) == 4 and mc["length"][0] == max(len(c) for c in mc["input_ids"][0])


def test_span_qa_windows_label_the_answer_tokens(tokenizer, tiny_hub: TinyHub) -> None:  # type: ignore[no-untyped-def]
    rows = [json.loads(line) for line in (tiny_hub.data["squad_v2"] / "validation.jsonl").read_text().splitlines()]
    examples = normalize_rows(TASKS["squad_v2"], rows, "squad")
    features = encode(TASKS["squad_v2"], examples, tokenizer, max_length=32)
    assert len(features["input_ids"]) > len(examples)  # long contexts take several windows
    found = 0
    for i, example_index in enumerate(features["example_index"]):
        example = examples[example_index]
        start, end = features["start_positions"][i], features["end_positions"][i]
        offsets = features["offsets"][i]
        assert len(offsets) == len(features["input_ids"][i]) <= 32
        if start == end == 0:
            continue
        found += 1
        text = example["context"][offsets[start][0]: offsets[end][1]]
        assert text.strip() == example["answers"]["text"][0]  # the first piece holds the space before it
    answerable = sum(bool(e["answers"]["text"]) for e in examples)
    assert found >= answerable  # every answer lies whole in at least one window


def test_tagging_labels_the_first_sub_token_of_each_word(tokenizer) -> None:  # type: ignore[no-untyped-def]
    example = {"tokens": ["unknownwordzz", "ab"], "tags": ["N", "X"]}
    features = encode(TASKS["ccg"], [example], tokenizer, 64, labels=("N", "V"))
    labels = features["labels"][0]
    tagged = [t for t in labels if t != IGNORE]
    assert tagged == [0, NO_TAG]  # N is tag 0; X is not in the label set
    assert labels[0] == IGNORE and labels[1] == 0  # <s>, then the first piece of the first word
    assert len(labels) > 4  # the made-up word takes several pieces, only the first is labelled


def test_tokenized_splits_are_cached_by_tokenizer_task_length_and_data(  # type: ignore[no-untyped-def]
        tokenizer, tiny_hub: TinyHub, tmp_path: Path) -> None:
    config = RunConfig(model=str(tiny_hub.model), stage="intermediate", tasks=("ccg",),
                       task_data=tiny_hub.task_data("ccg"))
    ref = SplitRef("ccg", "train")
    raw = open_split(config, ref)
    tok_id = tokenizer_fingerprint(tokenizer)
    first = load_encoded(raw, tokenizer, tok_id, 64, tmp_path)
    assert first.labels == ("A", "N", "V")  # learned from the training split
    # a second load reads the cache: the rows are never read (their file does not exist)
    cached = load_encoded(dataclasses.replace(raw, _path=tmp_path / "gone.jsonl"), tokenizer, tok_id, 64, tmp_path)
    assert cached.features["input_ids"] == first.features["input_ids"] and cached.labels == first.labels
    keys = {cache_key(tok_id, raw, 64, ()), cache_key(tok_id, raw, 128, ()), cache_key("other", raw, 64, ()),
            cache_key(tok_id, dataclasses.replace(raw, fingerprint="file:changed"), 64, ())}
    assert len(keys) == 4
    dev = load_encoded(open_split(config, SplitRef("ccg", "validation")), tokenizer, tok_id, 64, tmp_path,
                       train_labels=first.labels)
    assert dev.labels == first.labels


def test_a_changed_file_is_tokenized_again(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "mnli"
    write_jsonl(data / "train.jsonl", [{"premise": "a", "hypothesis": "b", "label": 0, "idx": 0}])
    config = RunConfig(model="m", stage="intermediate", tasks=("mnli",), task_data={"mnli": str(data)})
    tok_id = tokenizer_fingerprint(tokenizer)
    before = load_encoded(open_split(config, SplitRef("mnli", "train")), tokenizer, tok_id, 64, tmp_path / "cache")
    write_jsonl(data / "train.jsonl", [{"premise": "a", "hypothesis": "b", "label": 0, "idx": 0}] * 3)
    after = load_encoded(open_split(config, SplitRef("mnli", "train")), tokenizer, tok_id, 64, tmp_path / "cache")
    assert (len(before), len(after)) == (1, 3)


def test_max_train_examples_keeps_a_fixed_subset_of_whole_examples(tiny_hub: TinyHub, tokenizer,  # type: ignore[no-untyped-def]
                                                                   tmp_path: Path) -> None:
    from xstilts.trainer.train import cap_rows

    config = RunConfig(model=str(tiny_hub.model), stage="intermediate", tasks=("squad_v1",),
                       task_data=tiny_hub.task_data("squad_v1"))
    encoded = load_encoded(open_split(config, SplitRef("squad_v1", "train")), tokenizer,
                           tokenizer_fingerprint(tokenizer), 32, tmp_path)
    capped = cap_rows(encoded, 50, "squad_v1/train:50")
    kept = set(capped["example_index"])
    assert len(kept) == 50
    windows = [e for e in encoded.features["example_index"] if e in kept]
    assert len(capped) == len(windows) > 50  # every window of a kept example, none of the others
    assert cap_rows(encoded, 50, "squad_v1/train:50")["example_index"] == capped["example_index"]
    assert cap_rows(encoded, 10_000, "x") is encoded.features
