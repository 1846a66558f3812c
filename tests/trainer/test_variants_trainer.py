"""The trainer's parts of the two variants: translate-train reads each translation from
`<task_data>/<language>/train.jsonl`; continued MLM reads its corpus, draws its share of the
steps, masks its batches, and trains an MLM head that starts from the checkpoint's own and is
left out of the saved model. (Whole runs: tests/local/test_variants_local.py.)"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from xstilts.trainer.batch_plan import plan_steps
from xstilts.trainer.batching import Collator, MultiTaskBatchSampler
from xstilts.trainer.config import RunConfig
from xstilts.trainer.data import DataError, SplitRef, check_local_files, local_path, training_splits
from xstilts.trainer.mlm import corpus_files, encode_corpus, masker, texts
from xstilts.trainer.model import HEADS_FILE, HeadSpec, build_model, save_model
from xstilts.trainer.scoring import IGNORE
from xstilts.trainer.tasks import Format


def config(tmp_path: Path, **extra: object) -> RunConfig:
    return RunConfig.model_validate({"model": "m", "stage": "intermediate", "tasks": ["mnli"],
                                     "task_data": {"mnli": str(tmp_path / "mnli")}, **extra})


def test_translate_train_reads_each_translation_beside_the_english_data(tmp_path: Path) -> None:
    c = config(tmp_path, train_languages=["de", "pt-BR"])
    assert training_splits(c) == [SplitRef("mnli", "train"), SplitRef("mnli", "train", "de"),
                                   SplitRef("mnli", "train", "pt-BR")]
    assert local_path(tmp_path / "mnli", SplitRef("mnli", "train", "de")) == tmp_path / "mnli" / "de" / "train.jsonl"
    assert local_path(tmp_path / "mnli", SplitRef("mnli", "train")) == tmp_path / "mnli" / "train.jsonl"
    assert SplitRef("mnli", "train", "de").name == "mnli/train/de" and SplitRef("mnli", "train").name == "mnli/train"
    for name in ("train.jsonl", "validation.jsonl", "de/train.jsonl"):
        (tmp_path / "mnli" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "mnli" / name).write_text("{}\n")
    with pytest.raises(DataError) as e:
        check_local_files(c)
    assert "pt-BR/train.jsonl" in str(e.value) and "translate-train" in str(e.value)


def test_the_mlm_corpus_is_checked_before_training(tmp_path: Path) -> None:
    for name in ("train.jsonl", "validation.jsonl"):
        (tmp_path / "mnli").mkdir(exist_ok=True)
        (tmp_path / "mnli" / name).write_text("{}\n")
    (tmp_path / "empty").mkdir()
    for corpus, words in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "empty", "no .txt or .jsonl"),
                          (tmp_path / "mnli" / "train.jsonl.gz", "does not exist")):
        with pytest.raises(DataError, match=words):
            check_local_files(config(tmp_path, mlm={"ratio": 0.2, "corpus": str(corpus)}))
    (tmp_path / "c.csv").write_text("a\n")
    with pytest.raises(DataError, match=r"a \.csv file"):
        corpus_files(str(tmp_path / "c.csv"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("eins zwei\n\n  un deux  \n", encoding="utf-8")
    (corpus / "b.jsonl").write_text('{"text": "one two"}\n{"text": ""}\n', encoding="utf-8")
    (corpus / "notes.md").write_text("ignored")
    assert list(texts(corpus_files(str(corpus)))) == ["eins zwei", "un deux", "one two"]
    check_local_files(config(tmp_path, mlm={"ratio": 0.2, "corpus": str(corpus)}))
    (corpus / "c.jsonl").write_text('["not an object"]\n')
    with pytest.raises(DataError, match=r"c.jsonl:1: a corpus row must be an object"):
        list(texts(corpus_files(str(corpus))))


class _Tokenizer:
    """Whitespace words to ids, with <s>=0 … </s>=2 around them: enough for the corpus encoder."""

    def __call__(self, batch: list[str], truncation: bool, max_length: int) -> dict[str, list[list[int]]]:
        return {"input_ids": [[*[0, *(5 + len(w) for w in text.split())][:max_length - 1], 2] for text in batch]}


def test_the_corpus_gives_the_rows_asked_for_going_round_when_short(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("a bb\nccc\n", encoding="utf-8")
    rows = encode_corpus(str(tmp_path / "c.txt"), _Tokenizer(), "t", 8, 5, tmp_path / "cache")
    assert list(rows["input_ids"]) == [[0, 6, 7, 2], [0, 8, 2], [0, 6, 7, 2], [0, 8, 2], [0, 6, 7, 2]]
    assert list(rows["length"]) == [4, 3, 4, 3, 4]
    cached = list((tmp_path / "cache").glob("mlm-*.arrow"))
    assert len(cached) == 1  # a second run reads it back; a changed corpus is another entry
    assert list(encode_corpus(str(tmp_path / "c.txt"), _Tokenizer(), "t", 8, 5, tmp_path / "cache")["length"]) == [
        4, 3, 4, 3, 4]
    (tmp_path / "c.txt").write_text("a bb\nccc\ndddd e\n", encoding="utf-8")
    assert list(encode_corpus(str(tmp_path / "c.txt"), _Tokenizer(), "t", 8, 3, tmp_path / "cache")["length"]) == [
        4, 3, 4]
    assert len(list((tmp_path / "cache").glob("mlm-*.arrow"))) == 2
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no text"):
        encode_corpus(str(tmp_path / "empty.txt"), _Tokenizer(), "t", 8, 3, tmp_path / "cache")


def test_mlm_takes_its_ratio_of_the_steps_and_the_tasks_keep_their_epochs(tmp_path: Path) -> None:
    sampler = MultiTaskBatchSampler([[5] * 100, [5] * 300, [5] * 50], 10, 10, 4000, temperature=1.0,
                                    last_share=0.25)
    assert sampler.probabilities == pytest.approx([0.1875, 0.5625, 0.25])
    steps = Counter(0 if b[0] < 100 else 1 if b[0] < 400 else 2 for b in sampler)
    assert abs(steps[2] / 4000 - 0.25) < 0.03
    plain, mlm = config(tmp_path), config(tmp_path, mlm={"ratio": 0.25, "corpus": "c.txt"})
    assert plan_steps(plain, 1, [640], 64).steps_per_epoch == 20
    assert plan_steps(mlm, 1, [640], 64).steps_per_epoch == 27  # 20 task steps / 0.75


def test_mlm_batches_are_masked_except_at_special_tokens_and_padding() -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4, **{f"w{i}": 5 + i for i in range(40)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                        bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                        mask_token="<mask>")
    torch.manual_seed(0)
    collator = Collator(1, mlm_task_index=1, masker=masker(tokenizer, 0.5), special_ids=frozenset({0, 1, 2, 3, 4}))
    rows = [{"input_ids": [0, *range(5, 5 + n), 2], "task_index": 1} for n in (30, 10)]
    batch = collator(rows)
    labels, original = batch["labels"], torch.tensor([r["input_ids"] + [1] * (32 - len(r["input_ids"]))
                                                     for r in rows])
    assert batch["task_index"].tolist() == [1, 1]
    chosen = labels != IGNORE
    assert 10 < int(chosen.sum()) < 30  # about half of the 40 words
    assert torch.equal(labels[chosen], original[chosen])
    assert not chosen[original <= 4].any()  # never <s>, </s> or padding
    assert (batch["input_ids"][chosen] == 4).sum() > 0 and torch.equal(batch["input_ids"][~chosen], original[~chosen])
    task_batch = collator([{"input_ids": [0, 5, 2], "label": 1, "task_index": 0}])
    assert task_batch["labels"].tolist() == [1] and task_batch["input_ids"].tolist() == [[0, 5, 2]]


def test_the_mlm_head_starts_from_the_checkpoints_trains_the_embeddings_and_is_not_saved(tmp_path: Path) -> None:
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    torch.manual_seed(1)
    pretrained = XLMRobertaForMaskedLM(XLMRobertaConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1,
                                                        num_attention_heads=2, intermediate_size=32,
                                                        max_position_embeddings=40))
    pretrained.save_pretrained(tmp_path / "pretrained")
    specs = [HeadSpec("mnli", Format.CLASSIFICATION, ("entailment", "neutral", "contradiction"))]
    model = build_model(tmp_path / "pretrained", specs, seed=0, mlm=True)
    assert model.mlm_head is not None
    assert torch.equal(model.mlm_head.dense.weight, pretrained.lm_head.dense.weight)
    assert torch.equal(model.mlm_head.bias, pretrained.lm_head.bias)
    input_ids = torch.tensor([[0, 10, 11, 12, 2], [0, 13, 14, 2, 1]])
    mask = (input_ids != 1).long()
    labels = torch.full_like(input_ids, IGNORE)
    labels[0, 2], labels[1, 1] = 11, 13
    model.eval()
    pretrained.eval()  # no dropout: the two must agree exactly
    out = model(input_ids=input_ids, attention_mask=mask, task_index=torch.tensor([1, 1]), labels=labels)
    assert out["logits"].shape == (2, 60)  # logits at the two masked positions only
    expected = pretrained(input_ids=input_ids, attention_mask=mask).logits
    assert torch.allclose(out["logits"], expected[labels != IGNORE], atol=1e-5)  # the pretrained MLM, exactly
    out["loss"].backward()
    assert model.encoder.get_input_embeddings().weight.grad is not None  # the tied output side trains them
    classified = model(input_ids=input_ids, attention_mask=mask, task_index=torch.tensor([0, 0]))
    assert classified["logits"].shape == (2, 3)
    saved = save_model(model, tmp_path / "model")
    heads = json.loads((saved / "heads.json").read_text())["heads"]
    assert [h["task"] for h in heads] == ["mnli"]
    from safetensors.torch import load_file

    assert all(k.startswith("mnli.") for k in load_file(str(saved / HEADS_FILE)))
    plain = build_model(tmp_path / "model", specs, seed=0)
    assert plain.mlm_head is None


def test_an_encoder_without_an_mlm_head_gets_a_fresh_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from transformers import XLMRobertaConfig, XLMRobertaModel

    XLMRobertaModel(XLMRobertaConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=40),
                    add_pooling_layer=False).save_pretrained(tmp_path / "encoder")
    model = build_model(tmp_path / "encoder", [HeadSpec("mnli", Format.CLASSIFICATION, ("a", "b", "c"))], 0,
                        mlm=True)
    assert model.mlm_head is not None and "starts untrained" in caplog.text
