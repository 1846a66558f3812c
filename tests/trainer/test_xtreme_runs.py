"""Whole runs of XTREME targets on the tiny hub, with local files in the hub datasets' columns:
a tagging target (PAN-X: class-id tags, entity F1 per language), a span-QA target (XQuAD:
SQuAD training, per-language F1 and EM) and the retrieval targets (BUCC, Tatoeba: no training,
exact translations found)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from fixtures.tiny_hub import LEXICONS, TinyHub, squad, tiny_run_config, write_jsonl
from xstilts.trainer.batch_plan import InvalidRun
from xstilts.trainer.rundir import RunDir
from xstilts.trainer.tasks import PANX_TAGS
from xstilts.trainer.train import run


def target_config(hub: TinyHub, storage: Path, task: str, **overrides: Any) -> Any:
    """A target run of `task` on the tiny hub's model; its data in `task_data`."""
    from xstilts.trainer.config import RunConfig

    doc = tiny_run_config(hub, storage, ("mnli",)).model_dump(mode="json")
    hp = doc["hyperparameters"] | overrides.pop("hyperparameters", {})
    return RunConfig.model_validate(doc | {"stage": "target", "tasks": [task], "hyperparameters": hp} | overrides)


def panx_row(rng: random.Random, lang: str) -> dict[str, Any]:
    lex = LEXICONS[lang]
    tokens = lex.sentence(rng, 4, 12)
    # a word's tag is fixed by the word (ids into PAN-X's ClassLabel names)
    return {"tokens": tokens, "ner_tags": [lex.words.index(t) % len(PANX_TAGS) for t in tokens],
            "langs": [lang] * len(tokens)}


def write_panx(root: Path) -> Path:
    for lang, splits in (("en", ("train", "validation", "test")), ("de", ("test",))):
        for split in splits:
            rng = random.Random(f"panx:{lang}:{split}")
            write_jsonl(root / lang / f"{split}.jsonl", [panx_row(rng, lang) for _ in range(160 if split == "train"
                                                                                             else 30)])
    return root


def write_xquad(root: Path) -> Path:
    for split, n in (("train", 120), ("validation", 20)):
        rng = random.Random(f"xquad:{split}")
        write_jsonl(root / "en" / f"{split}.jsonl", [squad(rng, i) for i in range(n)])
    rng = random.Random("xquad:de")
    rows = [squad(rng, i) for i in range(12)]
    write_jsonl(root / "de" / "test.jsonl", [{k: v for k, v in r.items() if k != "title"} for r in rows])  # no title
    return root


def sentences(lang: str, n: int, seed: str) -> list[str]:
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        out[" ".join(LEXICONS[lang].sentence(rng, 5, 10))] = None
    return list(out)


def pair_rows(lang: str, split: str, unpaired: int = 0) -> list[dict[str, str]]:
    """Exact translations (a sentence and its copy), and sentences without a partner."""
    text = sentences(lang, 20 + 2 * unpaired, f"{lang}:{split}")
    rows = [{"source_sentence": s, "target_sentence": s, "source_lang": lang, "target_lang": "en"} for s in text[:20]]
    lone = text[20:]
    rows += [{"source_sentence": s, "target_sentence": "", "source_lang": lang, "target_lang": "en"}
             for s in lone[:unpaired]]
    rows += [{"source_sentence": "", "target_sentence": s, "source_lang": lang, "target_lang": "en"}
             for s in lone[unpaired:]]
    return rows


def test_a_panx_target_trains_on_english_and_scores_entity_f1_per_language(
        tiny_hub: TinyHub, tiny_cache: Path, tmp_path: Path) -> None:
    config = target_config(tiny_hub, tmp_path / "runs", "panx",
                             eval_languages=("en", "de"), task_data={"panx": str(write_panx(tmp_path / "panx"))},
                             hyperparameters={"epochs": 2})
    result = run(config)
    assert result.primary_metric == "f1" and set(result.languages) == {"en", "de"}
    assert result.metrics["dev.f1"] > 0.5  # the generated tags are learnable
    assert result.languages["en"]["f1"] == result.metrics["panx.test.f1.en"]
    assert result.metrics["panx.test.f1.avg"] == pytest.approx(
        (result.languages["en"]["f1"] + result.languages["de"]["f1"]) / 2)


def test_an_xquad_target_trains_on_squad_and_scores_f1_and_em_per_language(
        tiny_hub: TinyHub, tiny_cache: Path, tmp_path: Path) -> None:
    config = target_config(tiny_hub, tmp_path / "runs", "xquad",
                             eval_languages=("de",), task_data={"xquad": str(write_xquad(tmp_path / "xquad"))},
                             hyperparameters={"max_steps": 10})
    result = run(config)
    assert result.primary_metric == "f1"
    assert {"dev.f1", "dev.exact_match", "xquad.test.f1.de", "xquad.test.exact_match.de"} <= set(result.metrics)
    assert 0.0 <= result.languages["de"]["exact_match"] <= result.languages["de"]["f1"] <= 1.0


def test_retrieval_targets_find_exact_translations_without_training(
        tiny_hub: TinyHub, tmp_path: Path) -> None:
    tatoeba, bucc = tmp_path / "tatoeba", tmp_path / "bucc"
    for lang in ("de", "ja"):
        write_jsonl(tatoeba / lang / "test.jsonl", pair_rows(lang, "test"))
    for lang in ("de", "zh"):
        for split in ("validation", "test"):
            write_jsonl(bucc / lang / f"{split}.jsonl", pair_rows(lang, split, unpaired=5))
    runs = tmp_path / "runs"
    t = run(target_config(tiny_hub, runs, "tatoeba", eval_languages=("de", "ja"),
                            task_data={"tatoeba": str(tatoeba)}))
    assert t.languages == {"de": {"accuracy": 1.0}, "ja": {"accuracy": 1.0}}
    assert t.train_steps == 0 and t.primary_metric == "accuracy" and t.metrics["tatoeba.test.accuracy.avg"] == 1.0
    assert not RunDir.of(t.config).model.exists()  # nothing trained, nothing saved
    b = run(target_config(tiny_hub, runs, "bucc2018", eval_languages=("de", "zh"),
                            task_data={"bucc2018": str(bucc)}, hyperparameters={"retrieval_layer": 2}))
    assert {lang: v["f1"] for lang, v in b.languages.items()} == {"de": 1.0, "zh": 1.0}
    assert b.primary_metric == "f1"
    with pytest.raises(InvalidRun, match="retrieval_layer 3 is beyond the encoder's 2 layers"):
        run(target_config(tiny_hub, runs, "tatoeba", eval_languages=("de",),
                            task_data={"tatoeba": str(tatoeba)}, hyperparameters={"retrieval_layer": 3}))
