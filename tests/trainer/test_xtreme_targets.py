"""The XTREME targets: the registry's hub sources read through the real loader from local
copies in the hub's schema, the per-language splits, the metrics against hand-computed values,
and the retrieval matching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures.xtreme_hub import build_xtreme_hub, local_task
from xstilts.trainer.config import RunConfig
from xstilts.trainer.data import SplitRef, hub_datasets, normalize_rows, required_splits
from xstilts.trainer.retrieval import (
    Candidate,
    best_threshold,
    default_layer,
    f1_at,
    margin_candidates,
    nearest_accuracy,
)
from xstilts.trainer.scoring import bio_entities, tag_f1, word_tags
from xstilts.trainer.tasks import TARGET_TASKS, TASKS, Format


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_xtreme_hub(tmp_path_factory.mktemp("xtreme-hub"))


def examples(repos: dict[str, Path], task: str, split: str, lang: str = "en") -> list[dict]:  # type: ignore[type-arg]
    t = local_task(task, repos)
    rows = [row for d in hub_datasets(t, SplitRef(task, split, lang)) for row in d]
    return normalize_rows(t, rows, f"{task}/{split}/{lang}")


def test_every_xtreme_task_is_a_target_with_its_metric_and_languages() -> None:
    xtreme = {n for n, t in TASKS.items() if t.xtreme}
    assert xtreme == {"xnli", "pawsx", "udpos", "panx", "xquad", "mlqa", "tydiqa", "bucc2018", "tatoeba"}
    assert xtreme <= set(TARGET_TASKS)
    metrics = {n: TASKS[n].metric for n in xtreme}
    assert metrics == {"xnli": "accuracy", "pawsx": "accuracy", "udpos": "f1", "panx": "f1", "xquad": "f1",
                       "mlqa": "f1", "tydiqa": "f1", "bucc2018": "f1", "tatoeba": "accuracy"}
    sizes = {n: len(TASKS[n].languages) for n in xtreme}
    assert sizes == {"xnli": 15, "pawsx": 7, "udpos": 33, "panx": 40, "xquad": 11, "mlqa": 7, "tydiqa": 9,
                     "bucc2018": 4, "tatoeba": 35}
    for n in xtreme - {"bucc2018", "tatoeba"}:
        assert TASKS[n].languages[0] == "en"  # trained on English


def test_xquad_and_mlqa_train_on_squad_and_test_each_language_from_xtreme(repos: dict[str, Path]) -> None:
    train = examples(repos, "xquad", "train")
    assert [e["id"] for e in train] == ["s0", "s1", "s2", "s3"]  # SQuAD v1.1 train
    assert examples(repos, "mlqa", "validation")[0]["id"] == "v0"  # English dev: SQuAD v1.1 dev
    de = examples(repos, "xquad", "test", "de")  # XQuAD's only split, "validation", is the test set
    assert [e["answers"]["text"] for e in de] == [["de0"], ["de1"], ["de2"]]
    assert de[1]["context"][de[1]["answers"]["answer_start"][0]:].startswith("de1")
    mlqa = examples(repos, "mlqa", "test", "de")  # MLQA.de.de: context and question in one language
    assert [e["id"] for e in mlqa] == ["m0", "m1"]


def test_tydiqa_keeps_the_rows_of_each_language_from_its_one_config(repos: dict[str, Path]) -> None:
    assert [e["id"] for e in examples(repos, "tydiqa", "train")] == ["english-train-0", "english-train-1"]
    assert [e["id"] for e in examples(repos, "tydiqa", "test", "fi")] == ["finnish-validation-0",
                                                                         "finnish-validation-1"]
    assert {e["id"].split("-")[0] for e in examples(repos, "tydiqa", "test", "ar")} == {"arabic"}


def test_panx_and_udpos_tags_are_read_from_class_label_ids(repos: dict[str, Path]) -> None:
    assert examples(repos, "panx", "train") == [{"tokens": ["enAna", "enBerlin", "x"], "tags": ["B-PER", "B-LOC", "O"]}]
    assert examples(repos, "panx", "test", "de")[0]["tags"] == ["B-PER", "B-LOC", "O"]
    assert examples(repos, "udpos", "train") == [{"tokens": ["the", "dog", "runs"], "tags": ["DET", "NOUN", "VERB"]}]
    assert examples(repos, "udpos", "test", "de") == [{"tokens": ["der", "Hund"], "tags": ["DET", "NOUN"]}]


def test_bucc_and_tatoeba_read_sentence_pairs(repos: dict[str, Path]) -> None:
    assert examples(repos, "bucc2018", "validation", "de")[1] == {"source": "de sentence 1",
                                                                  "target": "english sentence 1"}
    assert len(examples(repos, "bucc2018", "test", "de")) == 3
    tatoeba = examples(repos, "tatoeba", "test", "de")  # config tatoeba.deu, its one split
    assert [e["source"] for e in tatoeba] == ["deu sentence 0", "deu sentence 1", "deu sentence 2"]


def test_retrieval_targets_need_no_training_data(tmp_path: Path) -> None:
    bucc = RunConfig(model="m", stage="target", tasks=("bucc2018",), eval_languages=("de", "fr"))
    assert [r.name for r in required_splits(bucc)] == ["bucc2018/validation/de", "bucc2018/validation/fr",
                                                      "bucc2018/test/de", "bucc2018/test/fr"]
    tatoeba = RunConfig(model="m", stage="target", tasks=("tatoeba",), eval_languages=("ja",))
    assert [r.name for r in required_splits(tatoeba)] == ["tatoeba/test/ja"]
    assert TASKS["tatoeba"].format is Format.RETRIEVAL


# --- metrics, by hand ---------------------------------------------------------------------------


def test_bio_entities_follow_conlleval() -> None:
    assert bio_entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3)}
    # an I- tag without its B- starts an entity; a type change ends one
    assert bio_entities(["I-ORG", "I-ORG", "I-PER", "O"]) == {("ORG", 0, 1), ("PER", 2, 2)}
    assert bio_entities(["B-PER", "B-PER"]) == {("PER", 0, 0), ("PER", 1, 1)}


def test_ner_f1_is_entity_level_and_pos_f1_is_word_level() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-LOC"]]
    # gold entities 3; predicted 4 (PER 0-0, LOC, ORG, LOC); correct 2 (LOC, ORG)
    p, r = 2 / 4, 2 / 3
    assert tag_f1(pred, gold, entities=True) == pytest.approx(2 * p * r / (p + r))
    # POS: 5 of the 6 words right
    assert tag_f1([["DET", "NOUN", "VERB"], ["DET", "ADJ", "NOUN"]],
                  [["DET", "NOUN", "VERB"], ["DET", "NOUN", "NOUN"]], entities=False) == pytest.approx(5 / 6)


def test_word_tags_read_the_first_sub_token_of_each_word() -> None:
    names = ("O", "B-PER")
    preds, golds = word_tags([[0, 1, 1, 0, 0]], [[-100, 1, -100, 0, -1]], names)
    assert preds == [["B-PER", "O", "O"]] and golds == [["B-PER", "O", "<unknown>"]]


def test_tatoeba_accuracy_counts_own_translations_retrieved() -> None:
    src = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]]), dim=1)
    tgt = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.1, 1.0], [0.0, 1.0]]), dim=1)
    # row 0 -> 0 (right), row 1 -> 2 (wrong: it is closer than 1), row 2 -> 0 (wrong)
    assert nearest_accuracy(src, tgt) == pytest.approx(1 / 3)


def test_bucc_margin_mining_threshold_and_f1_by_hand() -> None:
    eye = torch.eye(3)
    candidates = margin_candidates(eye, eye, k=1)  # each sentence's own copy, margin cos/cos = 1
    assert {(c.source, c.target) for c in candidates} == {(0, 0), (1, 1), (2, 2)}
    assert all(c.score == pytest.approx(1.0) for c in candidates)
    mined = [Candidate(0.9, 0, 0), Candidate(0.8, 1, 2), Candidate(0.7, 2, 1), Candidate(0.6, 3, 3)]
    gold = {(0, 0), (1, 2), (3, 3)}
    # threshold 0.8: 2 predicted, 2 right: p 1, r 2/3 -> 0.8; at 0.6: 3 of 4 right: p 3/4, r 1 -> 6/7
    assert f1_at(mined, gold, 0.8) == pytest.approx(0.8)
    assert f1_at(mined, gold, 0.6) == pytest.approx(6 / 7)
    assert best_threshold(mined, gold) == pytest.approx(0.6)


def test_the_default_retrieval_layer_is_xtremes_depth_share() -> None:
    assert default_layer(24) == 14 and default_layer(12) == 7 and default_layer(2) == 1
