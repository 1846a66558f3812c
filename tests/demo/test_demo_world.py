"""The demo world: languages, labels, the guard against surface cues, task files the trainer
reads, the pretraining cache, and examples/demo.yaml agreeing with all of it."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from xstilts.demo.generate import (
    DataSizes,
    completion_item,
    nli_item,
    paws_item,
    pretraining_corpus,
    task_rows,
    write_task_data,
)
from xstilts.demo.prepare import DEFAULT_ROOT, TASKS, prepare_data
from xstilts.demo.pretrain import (
    CACHE_FILE,
    MODEL_SIZES,
    PretrainSettings,
    build_tokenizer,
    model_config,
    non_embedding_parameters,
    prepare_models,
)
from xstilts.demo.world import (
    ANCHORS,
    CONCEPTS,
    KINDS,
    LANGUAGES,
    NLI_LABELS,
    PAWS_LABELS,
    Clause,
    World,
    random_clause,
    relation,
)
from xstilts.operator.experiment.spec import load_spec_text
from xstilts.trainer import tasks as trainer_tasks
from xstilts.trainer.config import RunConfig, Stage
from xstilts.trainer.data import check_local_files, normalize_rows, open_split, required_splits

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world() -> World:
    return World.build(0)


# --- languages ----------------------------------------------------------------------------


def test_the_languages_are_the_targets_languages() -> None:
    assert set(trainer_tasks.XNLI_LANGUAGES) | set(trainer_tasks.PAWSX_LANGUAGES) == set(LANGUAGES)


def test_no_two_languages_share_a_character(world: World) -> None:
    chars = {code: set("".join(world.vocabulary(code))) for code in LANGUAGES}
    for a, b in itertools.combinations(LANGUAGES, 2):
        assert not chars[a] & chars[b], f"{a} and {b} share {sorted(chars[a] & chars[b])}"
    assert not set("".join(ANCHORS.values())) & set().union(*chars.values())


def test_every_language_says_every_concept_with_two_distinct_words(world: World) -> None:
    for code in LANGUAGES:
        lexicon = world.lexicons[code]
        words = [lexicon[f"{c}/{s}"] for c in CONCEPTS for s in (0, 1)]
        assert len(set(words)) == len(words), code


def test_languages_differ_in_word_order(world: World) -> None:
    clause = Clause("huge", "dog", "runs")
    positions = {code: [world.realize_keys(clause, code).index(k) for k in ("huge/0", "dog/0", "runs/0")]
                 for code in LANGUAGES}
    assert len({tuple(p) for p in positions.values()}) >= 4
    assert world.sentence(clause, "en") == "the huge dog runs"


def test_the_world_is_deterministic(world: World) -> None:
    assert World.build(0).fingerprint() == world.fingerprint()
    assert World.build(1).fingerprint() != world.fingerprint()


def test_the_tokenizer_gives_one_token_per_word(world: World) -> None:
    tokenizer = build_tokenizer(world)
    rng = random.Random(0)
    for code in LANGUAGES:
        sentence = world.sentence(random_clause(rng), code)
        ids = tokenizer(sentence)["input_ids"]
        assert len(ids) == len(sentence.split()) + 2  # <s> ... </s>
        assert tokenizer.unk_token_id not in ids


# --- labels --------------------------------------------------------------------------------


def test_relation_follows_the_taxonomy() -> None:
    assert relation("dog", "animal") == "entailment"
    assert relation("animal", "dog") == "neutral"
    assert relation("dog", "cat") == "contradiction"
    assert relation("dog", "car") == "contradiction"
    assert relation("huge", "big") == "entailment"
    assert relation("huge", "tiny") == "contradiction"
    assert relation("huge", "cold") == "neutral"
    assert relation("runs", "moves") == "entailment"
    assert relation("runs", "sleeps") == "contradiction"
    with pytest.raises(ValueError, match="no relation"):
        relation("dog", "runs")


def _changed(first: Clause, second: Clause) -> list[str]:
    return [k for k in KINDS if (first.concept(k), first.synonym(k)) != (second.concept(k), second.synonym(k))]


def test_nli_pairs_differ_in_one_word_and_are_labelled_by_the_rule() -> None:
    rng = random.Random(1)
    for _ in range(500):
        item = nli_item(rng)
        (kind,) = _changed(item.first, item.second)
        assert relation(item.first.concept(kind), item.second.concept(kind)) == NLI_LABELS[item.label]


def test_paws_pairs_are_synonyms_or_generalisations() -> None:
    rng = random.Random(2)
    for _ in range(500):
        item = paws_item(rng)
        (kind,) = _changed(item.first, item.second)
        before, after = item.first.concept(kind), item.second.concept(kind)
        if PAWS_LABELS[item.label] == "paraphrase":
            assert before == after
        else:
            assert relation(before, after) == "entailment" and CONCEPTS[after].general


def test_the_right_ending_follows_and_the_others_do_not() -> None:
    rng = random.Random(3)
    for _ in range(300):
        item = completion_item(rng)
        labels = []
        for ending in item.endings:
            (kind,) = _changed(item.context, ending)
            labels.append(relation(item.context.concept(kind), ending.concept(kind)))
        assert labels[item.label] == "entailment"
        assert sorted(labels) == ["contradiction", "contradiction", "entailment", "neutral"]


def test_surface_cues_say_nothing_about_the_label(world: World) -> None:
    """The guard, on the data side: in every language, where the one changed word sits and
    how long the sentences are is distributed alike for every label. Only the words tell."""
    rng = random.Random(4)
    items = [nli_item(rng) for _ in range(6000)]
    for code in ("en", "ar", "ja"):
        by_label: dict[int, Counter[tuple[int, int]]] = {i: Counter() for i in range(len(NLI_LABELS))}
        for item in items:
            first, second = world.sentence(item.first, code).split(), world.sentence(item.second, code).split()
            assert len(first) == len(second)
            (position,) = [i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b]
            by_label[item.label][(position, len(first))] += 1
        cues = set().union(*by_label.values())
        for cue in cues:
            shares = [by_label[label][cue] / sum(by_label[label].values()) for label in by_label]
            assert max(shares) - min(shares) < 0.04, (code, cue, shares)


# --- task files ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task_dirs(tmp_path_factory: pytest.TempPathFactory, world: World) -> dict[str, Path]:
    sizes = DataSizes(xnli_train=30, pawsx_train=30, target_eval=20, target_test=20, mnli_train=40,
                      hellaswag_train=20, intermediate_eval=10)
    return {k: Path(v) for k, v in write_task_data(world, tmp_path_factory.mktemp("data"), sizes).items()}


def _config(task: str, stage: Stage, task_dirs: dict[str, Path]) -> RunConfig:
    return RunConfig(model="unused", stage=stage, tasks=(task,), task_data={task: str(task_dirs[task])})


@pytest.mark.parametrize(("task", "stage"), [("mnli", Stage.INTERMEDIATE), ("hellaswag", Stage.INTERMEDIATE),
                                             ("xnli", Stage.TARGET), ("pawsx", Stage.TARGET)])
def test_the_trainer_reads_every_task_file(task: str, stage: Stage, task_dirs: dict[str, Path]) -> None:
    config = _config(task, stage, task_dirs)
    check_local_files(config)
    for ref in required_splits(config):
        raw = open_split(config, ref)
        examples = normalize_rows(trainer_tasks.TASKS[task], raw.rows(), raw.where)
        assert examples


def test_each_language_has_evaluation_items_of_its_own(task_dirs: dict[str, Path], world: World) -> None:
    """Not translations of one set, as XNLI's and PAWS-X's are: the zero-shot average then
    rests on every language's items, not on one language's worth (see write_task_data)."""
    for task, languages in (("xnli", trainer_tasks.XNLI_LANGUAGES), ("pawsx", trainer_tasks.PAWSX_LANGUAGES)):
        for split in ("validation", "test"):
            rows = {lang: [json.loads(line) for line in (task_dirs[task] / lang / f"{split}.jsonl").open()]
                    for lang in languages}
            assert len({len(v) for v in rows.values()}) == 1, (task, split)
            labels = {tuple(r["label"] for r in v) for v in rows.values()}
            assert len(labels) == len(languages), (task, split)  # each language its own draw
            # the same draw as task_rows gives for that language: reproducible from the world
            assert rows["de"] == task_rows(world, task, split, len(rows["de"]), "de", per_language=True)


def test_task_files_never_mix_languages(task_dirs: dict[str, Path], world: World) -> None:
    owner = {word: code for code in LANGUAGES for word in world.vocabulary(code)}
    for path in task_dirs["xnli"].glob("*/test.jsonl"):
        for line in path.open(encoding="utf-8"):
            row = json.loads(line)
            words = f"{row['premise']} {row['hypothesis']}".split()
            assert {owner[w] for w in words} == {path.parent.name}


def test_task_data_is_reused_when_unchanged(tmp_path: Path, world: World) -> None:
    sizes = DataSizes(xnli_train=5, pawsx_train=5, target_eval=5, target_test=5, mnli_train=5, hellaswag_train=5,
                      intermediate_eval=5)
    dirs, cached = prepare_data(world, tmp_path, sizes)
    assert not cached and set(dirs) == set(TASKS)
    before = (tmp_path / "mnli" / "train.jsonl").stat().st_mtime_ns
    assert prepare_data(world, tmp_path, sizes)[1]
    assert (tmp_path / "mnli" / "train.jsonl").stat().st_mtime_ns == before
    assert not prepare_data(world, tmp_path, DataSizes(
        xnli_train=6, pawsx_train=5, target_eval=5, target_test=5, mnli_train=5, hellaswag_train=5,
        intermediate_eval=5))[1]


# --- pretraining ---------------------------------------------------------------------------


def test_pretraining_text_mixes_languages_and_keeps_anchors_out_of_task_data(world: World) -> None:
    corpus = list(pretraining_corpus(world, 400, seed=0))
    owner = {word: code for code in LANGUAGES for word in world.vocabulary(code)}
    languages = {owner[w] for a, b in corpus for w in f"{a} {b or ''}".split() if w in owner}
    assert languages == set(LANGUAGES)
    assert any(sym in a for a, _ in corpus for sym in ANCHORS.values())
    assert sum(b is not None for _, b in corpus) > 100  # translation and restatement pairs


def test_a_pretrained_model_is_saved_loadable_and_cached(tmp_path: Path, world: World) -> None:
    from transformers import AutoModel, AutoTokenizer

    small = MODEL_SIZES[0]
    settings = PretrainSettings(steps=3, batch_size=8, corpus_size=200, alignment_batch_size=4)
    first = prepare_models(world, tmp_path, [small], settings, workers=1)
    assert not first["small"]["cached"]
    model = AutoModel.from_pretrained(tmp_path / "small")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "small")
    assert model.config.hidden_size == small.hidden
    assert tokenizer("the huge dog runs")["input_ids"][0] == tokenizer.cls_token_id
    weights = tmp_path / "small" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert prepare_models(world, tmp_path, [small], settings, workers=1)["small"]["cached"]
    assert weights.stat().st_mtime_ns == before
    record = json.loads((tmp_path / "small" / CACHE_FILE).read_text())
    assert record["non_embedding_parameters"] == non_embedding_parameters(small)
    changed = PretrainSettings(steps=4, batch_size=8, corpus_size=200, alignment_batch_size=4)
    assert not prepare_models(world, tmp_path, [small], changed, workers=1)["small"]["cached"]


def test_non_embedding_parameters_match_the_model(world: World) -> None:
    from transformers import XLMRobertaModel

    for size in MODEL_SIZES:
        model = XLMRobertaModel(model_config(size, 100), add_pooling_layer=False)
        layers = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embeddings."))
        assert layers == non_embedding_parameters(size)


# --- the spec ------------------------------------------------------------------------------


def test_the_demo_spec_points_at_the_prepared_world(world: World) -> None:
    from transformers import XLMRobertaModel

    spec = load_spec_text((REPO / "examples" / "demo.yaml").read_text(), "examples/demo.yaml")
    assert spec.data == {task: str(DEFAULT_ROOT / "data" / task) for task in TASKS}
    assert [m.pretrained for m in spec.models] == [str(DEFAULT_ROOT / "models" / s.name) for s in MODEL_SIZES]
    assert len(spec.intermediate_tasks) >= 2
    # seeds sized to a precision that makes the per-model zero-shot gains conclusive (±2 points)
    assert spec.replication is not None and spec.replication.target_half_width <= 2.0
    assert spec.replication.unit == "modelAverage"
    assert spec.initial_seeds == [1, 2, 3]
    # per seed: 6 phase-2 runs, 6 baseline and 12 arm target runs; the most it can cost
    assert spec.run_count == (6 + 18) * spec.replication.max_seeds
    vocabulary = len(build_tokenizer(world))
    for model, size in zip(spec.models, MODEL_SIZES, strict=True):
        encoder = XLMRobertaModel(model_config(size, vocabulary), add_pooling_layer=False)
        actual = sum(p.numel() for p in encoder.parameters())
        assert model.parameters is not None and abs(model.parameters - actual) / actual < 0.05, (model.name, actual)
