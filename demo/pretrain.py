"""Phase 1 of the demo: a tokenizer and tiny XLM-R-architecture encoders of three sizes,
pretrained on the demo world's multilingual text.

The objective is masked language modelling (on short sequences, so 30% of the words are
masked) plus a translation-ranking loss on parallel sentences — each sentence's mean-pooled
word states must pick out its translation among the batch's, as InfoXLM and LaBSE train on
parallel data. Masked-LM alone does not align 17 disjoint vocabularies in a few hundred steps
of a tiny model: it learns to translate through its feed-forward layers and leaves the
languages' representations apart, so an English classifier has nothing to carry over.

Each model directory holds what `from_pretrained` needs (config, weights, tokenizer), so the
trainer loads it exactly like a hub checkpoint. A directory is reused when its cache key — a
hash of the world, the model size and the pretraining settings — matches, so only the first
`make demo` pays for pretraining.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xstilts.demo.generate import CorpusMix, parallel_sentences, pretraining_corpus
from xstilts.demo.world import ANCHORS, LANGUAGES, World

PRETRAIN_VERSION = 1  # bump when the procedure changes: invalidates cached models
CACHE_FILE = "xstilts-demo.json"
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # XLM-R's ids 0-3, mask last
MAX_POSITIONS = 128


@dataclass(frozen=True)
class ModelSize:
    """One tiny XLM-R. Narrow models train best with a larger initialisation and learning
    rate than XLM-R's (0.02, 6e-4); both shrink as the width grows."""

    name: str
    hidden: int
    layers: int
    heads: int
    ffn: int
    learning_rate: float
    initializer_range: float


MODEL_SIZES = (
    ModelSize("small", 32, 2, 2, 64, learning_rate=1e-2, initializer_range=0.1),
    ModelSize("medium", 64, 2, 4, 256, learning_rate=6e-3, initializer_range=0.07),
    ModelSize("large", 128, 2, 4, 512, learning_rate=3e-3, initializer_range=0.05),
)


@dataclass(frozen=True)
class PretrainSettings:
    steps: int = 400
    batch_size: int = 128  # masked-LM sequences per step
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    mask_probability: float = 0.3  # sentences are short: mask more than BERT's 15%
    corpus_size: int = 40_000
    # Translation ranking on parallel sentences, beside the masked LM (0 turns it off).
    alignment_weight: float = 1.0
    alignment_batch_size: int = 128
    alignment_temperature: float = 0.1
    seed: int = 0
    mix: CorpusMix = field(default_factory=CorpusMix)


# --- tokenizer -----------------------------------------------------------------------------


def build_tokenizer(world: World) -> Any:
    """A word-level tokenizer trained with `tokenizers` on every word of every language, with
    XLM-R's special tokens and pair template (`<s> A </s></s> B </s>`). Each pseudo-word is
    one token, so sentence lengths are the same whichever language says them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words = sorted(set().union(*(world.vocabulary(code) for code in LANGUAGES), ANCHORS.values()))
    tok.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", bos), ("</s>", eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
        cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
        model_max_length=MAX_POSITIONS,
    )


def model_config(size: ModelSize, vocab_size: int) -> Any:
    from transformers import XLMRobertaConfig

    return XLMRobertaConfig(
        vocab_size=vocab_size, hidden_size=size.hidden, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, intermediate_size=size.ffn,
        max_position_embeddings=MAX_POSITIONS + 2,  # XLM-R positions start after the pad id
        type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        initializer_range=size.initializer_range,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )


def non_embedding_parameters(size: ModelSize) -> int:
    """Transformer-layer parameters (attention, feed-forward, layer norms), the count scaling
    studies plot against; the embeddings depend on the vocabulary, not the model's capacity."""
    h, f = size.hidden, size.ffn
    attention = 4 * (h * h + h) + 2 * h
    feed_forward = h * f + f + f * h + h + 2 * h
    return size.layers * (attention + feed_forward)


# --- masked-LM pretraining -----------------------------------------------------------------


def _encode_corpus(tokenizer: Any, world: World, settings: PretrainSettings) -> list[list[int]]:
    singles: list[str] = []
    pairs: list[tuple[str, str]] = []
    for a, b in pretraining_corpus(world, settings.corpus_size, settings.seed, settings.mix):
        if b is None:
            singles.append(a)
        else:
            pairs.append((a, b))
    ids: list[list[int]] = tokenizer(singles)["input_ids"] if singles else []
    if pairs:
        ids += tokenizer([a for a, _ in pairs], [b for _, b in pairs])["input_ids"]
    random.Random(settings.seed).shuffle(ids)
    return ids


def mask_batch(sequences: Sequence[list[int]], rng: Any, vocab_size: int, mask_id: int,
               probability: float, special_ids: set[int]) -> dict[str, Any]:
    """BERT masking: of the chosen non-special tokens, 80% <mask>, 10% random, 10% kept."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), SPECIAL_TOKENS.index("<pad>"), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
    attention = (ids != SPECIAL_TOKENS.index("<pad>")).long()
    maskable = attention.bool()
    for special in special_ids:
        maskable &= ids != special
    chosen = (torch.rand(ids.shape, generator=rng) < probability) & maskable
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    u = torch.rand(ids.shape, generator=rng)
    inputs = ids.clone()
    inputs[chosen & (u < 0.8)] = mask_id
    swap = chosen & (u >= 0.8) & (u < 0.9)
    inputs[swap] = torch.randint(len(SPECIAL_TOKENS), vocab_size, ids.shape, generator=rng)[swap]
    return {"input_ids": inputs, "attention_mask": attention, "labels": labels}


def pretrain_model(size: ModelSize, world: World, settings: PretrainSettings, out_dir: Path,
                   threads: int = 1, on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Pretrain one model from scratch and save it with its tokenizer to `out_dir`."""
    import torch
    from transformers import XLMRobertaForMaskedLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no "Writing model shards" bars in the demo's output
    torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)
    started = time.monotonic()
    tokenizer = build_tokenizer(world)
    corpus = _encode_corpus(tokenizer, world, settings)
    parallel = _encode_parallel(tokenizer, world, settings)
    model = XLMRobertaForMaskedLM(model_config(size, len(tokenizer)))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "LayerNorm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "LayerNorm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=size.learning_rate)
    warmup = max(1, int(settings.warmup_ratio * settings.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (settings.steps - step) / (settings.steps - warmup))))
    rng = torch.Generator().manual_seed(settings.seed)
    special = {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    order: list[int] = []
    pair_order: list[int] = []
    losses: list[float] = []
    for _step in range(settings.steps):
        if len(order) < settings.batch_size:
            order += torch.randperm(len(corpus), generator=rng).tolist()
        batch = [corpus[i] for i in order[: settings.batch_size]]
        del order[: settings.batch_size]
        inputs = mask_batch(batch, rng, len(tokenizer), tokenizer.mask_token_id,
                            settings.mask_probability, special)
        labels = inputs.pop("labels")
        hidden = model.roberta(**inputs).last_hidden_state
        chosen = labels != -100  # logits only where a token was masked: most of the cost saved
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[chosen]), labels[chosen])
        if settings.alignment_weight > 0:
            if len(pair_order) < settings.alignment_batch_size:
                pair_order += torch.randperm(len(parallel), generator=rng).tolist()
            pairs = [parallel[i] for i in pair_order[: settings.alignment_batch_size]]
            del pair_order[: settings.alignment_batch_size]
            loss = loss + settings.alignment_weight * translation_ranking_loss(
                model.roberta, pairs, special, settings.alignment_temperature)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(_step, losses[-1])
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    tail = losses[-50:]
    return {"final_loss": sum(tail) / len(tail), "first_loss": losses[0],
            "seconds": round(time.monotonic() - started, 1),
            "non_embedding_parameters": non_embedding_parameters(size),
            "parameters": sum(p.numel() for p in model.parameters())}


def _encode_parallel(tokenizer: Any, world: World, settings: PretrainSettings) -> list[tuple[list[int], list[int]]]:
    pairs = list(parallel_sentences(world, settings.corpus_size, settings.seed))
    firsts = tokenizer([a for a, _ in pairs])["input_ids"]
    seconds = tokenizer([b for _, b in pairs])["input_ids"]
    return list(zip(firsts, seconds, strict=True))


def _pad(sequences: Sequence[list[int]]) -> tuple[Any, Any]:
    import torch

    pad = SPECIAL_TOKENS.index("<pad>")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, (ids != pad).long()


def translation_ranking_loss(encoder: Any, pairs: Sequence[tuple[list[int], list[int]]],
                             special_ids: set[int], temperature: float) -> Any:
    """Each sentence must pick out its translation among the batch's (both directions), by
    the cosine of mean-pooled word states: the cross-lingual contrast of InfoXLM and LaBSE."""
    import torch

    def embed(sequences: Sequence[list[int]]) -> Any:
        ids, attention = _pad(sequences)
        words = attention.bool()
        for special in special_ids:
            words &= ids != special
        hidden = encoder(input_ids=ids, attention_mask=attention).last_hidden_state
        weights = words.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)

    first, second = embed([a for a, _ in pairs]), embed([b for _, b in pairs])
    logits = first @ second.T / temperature
    target = torch.arange(len(pairs))
    return (torch.nn.functional.cross_entropy(logits, target)
            + torch.nn.functional.cross_entropy(logits.T, target)) / 2


def save_random_model(size: ModelSize, world: World, out_dir: Path, seed: int = 0) -> Path:
    """The same architecture and tokenizer with random weights: the control that shows what
    pretraining contributes to cross-lingual transfer."""
    import torch
    from transformers import XLMRobertaForMaskedLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(world)
    XLMRobertaForMaskedLM(model_config(size, len(tokenizer))).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# --- cache ---------------------------------------------------------------------------------


def cache_key(world: World, size: ModelSize, settings: PretrainSettings) -> str:
    doc = {"version": PRETRAIN_VERSION, "world": world.fingerprint(), "size": asdict(size),
           "settings": asdict(settings)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def cached_record(model_dir: Path, key: str) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads((model_dir / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("key") == key else None


def _pretrain_and_record(size: ModelSize, world: World, settings: PretrainSettings,
                         model_dir: Path, key: str) -> dict[str, Any]:
    stats = pretrain_model(size, world, settings, model_dir)
    record = {"key": key, "size": asdict(size), **stats}
    tmp = model_dir / (CACHE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(model_dir / CACHE_FILE)  # written last: a model is cached only when complete
    return record


def prepare_models(world: World, root: Path, sizes: Sequence[ModelSize] = MODEL_SIZES,
                   settings: PretrainSettings = PretrainSettings(), workers: int | None = None,
                   log: Callable[[str], None] = lambda _: None) -> dict[str, dict[str, Any]]:
    """Pretrain every size whose cached directory under `root` is missing or stale, in
    parallel processes (largest first); return name → record (key, stats, `cached`)."""
    records: dict[str, dict[str, Any]] = {}
    todo: list[tuple[ModelSize, str]] = []
    for size in sizes:
        key = cache_key(world, size, settings)
        hit = cached_record(root / size.name, key)
        if hit is not None:
            records[size.name] = {**hit, "cached": True}
            log(f"model {size.name}: reused {root / size.name}")
        else:
            todo.append((size, key))
    todo.sort(key=lambda t: -non_embedding_parameters(t[0]))
    if todo:
        workers = workers or min(len(todo), os.cpu_count() or 1)
        log(f"pretraining {', '.join(s.name for s, _ in todo)} ({settings.steps} steps each,"
            f" {workers} at a time)")
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {size.name: pool.submit(_pretrain_and_record, size, world, settings,
                                              root / size.name, key) for size, key in todo}
            for name, future in futures.items():
                records[name] = {**future.result(), "cached": False}
                log(f"model {name}: pretrained in {records[name]['seconds']:.0f}s,"
                    f" final loss {records[name]['final_loss']:.2f}")
    return {s.name: records[s.name] for s in sizes}
