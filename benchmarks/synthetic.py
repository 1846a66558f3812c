"""What the benchmarks train and evaluate: XLM-R-architecture encoders with random weights, a
word-level tokenizer, and sentence-pair data in the real datasets' columns whose tokenized
lengths follow MNLI's shape.

The tokenizer maps one word to one token, so a pair of p and h words is exactly p + h + 4
tokens (XLM-R's pair template `<s> A </s></s> B </s>`): the length distribution is what the
benchmark says it is, not what a tokenizer happens to make of made-up text.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

MAX_LENGTH = 128
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
WORDS = 995  # plain words w0..w994 after the specials: a vocabulary of 1000
# XNLI's 15 languages; every language gets its own length sample of the same shape
XNLI_LANGUAGES = ("en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh", "hi", "sw", "ur")


@dataclass(frozen=True)
class Architecture:
    """An XLM-R-shaped encoder; head size 64 as in every XLM-R."""

    name: str
    hidden: int
    layers: int
    heads: int
    vocab: int
    max_positions: int = 514

    @property
    def intermediate(self) -> int:
        return 4 * self.hidden


ARCHITECTURES = {
    # small enough for a shared 2-core CPU, shaped like XLM-R (head size 64, FFN 4x)
    "tiny": Architecture("tiny", hidden=128, layers=2, heads=2, vocab=1000, max_positions=MAX_LENGTH + 2),
    # FacebookAI/xlm-roberta-large: 24 layers, hidden 1024, 16 heads, 250,002 tokens (560M parameters)
    "large": Architecture("large", hidden=1024, layers=24, heads=16, vocab=250_002),
}


def pair_lengths(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(premise words, hypothesis words) for n pairs: total tokens (with XLM-R's 4 specials)
    log-normal around a median of 40, clipped to [10, 128]; the hypothesis is about a third."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        total = min(MAX_LENGTH, max(10, round(math.exp(rng.gauss(math.log(40), 0.45)))))
        words = total - 4
        hypothesis = max(1, round(words * rng.uniform(0.2, 0.45)))
        out.append((words - hypothesis, hypothesis))
    return out


def build_tokenizer() -> object:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(WORDS)]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate([*SPECIALS, *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                   model_max_length=MAX_LENGTH)


def build_encoder(out: Path, arch: Architecture, seed: int = 0) -> Path:
    """A random-weight XLM-R encoder of the architecture and the tokenizer, as a hub directory."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(seed)
    config = XLMRobertaConfig(vocab_size=arch.vocab, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
                              num_attention_heads=arch.heads, intermediate_size=arch.intermediate,
                              max_position_embeddings=arch.max_positions, type_vocab_size=1, pad_token_id=1,
                              bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    XLMRobertaModel(config).save_pretrained(out)
    build_tokenizer().save_pretrained(out)  # type: ignore[attr-defined]
    return out


def nli_rows(n: int, seed: int) -> list[dict[str, object]]:
    """Premise/hypothesis/label rows with MNLI's length distribution (labels at random)."""
    rng = random.Random(f"words:{seed}")
    rows = []
    for i, (p, h) in enumerate(pair_lengths(n, seed)):
        premise = " ".join(f"w{rng.randrange(WORDS)}" for _ in range(p))
        hypothesis = " ".join(f"w{rng.randrange(WORDS)}" for _ in range(h))
        rows.append({"premise": premise, "hypothesis": hypothesis, "label": rng.randrange(3), "idx": i})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_mnli(directory: Path, train: int, dev: int) -> None:
    """GLUE MNLI's columns, in the trainer's local layout: <dir>/train.jsonl, validation.jsonl."""
    write_jsonl(directory / "train.jsonl", nli_rows(train, 0))
    write_jsonl(directory / "validation.jsonl", nli_rows(dev, 1))


def write_xnli(directory: Path, per_language: int) -> None:
    """XNLI's test split of every language, in its columns and the local layout
    <dir>/<lang>/test.jsonl; each language gets its own sample of the same length shape."""
    for k, lang in enumerate(XNLI_LANGUAGES):
        rows = [{c: v for c, v in r.items() if c != "idx"} for r in nli_rows(per_language, 100 + k)]
        write_jsonl(directory / lang / "test.jsonl", rows)


def real_and_padded(lengths: list[int], batches: list[list[int]]) -> tuple[int, int]:
    """Real tokens and tokens computed (each batch padded to its longest row)."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return real, padded
