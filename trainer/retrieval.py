"""Sentence retrieval targets (BUCC 2018, Tatoeba): no target training. Every sentence is
embedded by the encoder (the pretrained model, or the intermediate run's checkpoint) as the
mean of its token states at one middle layer, normalised to unit length, and matched by cosine
similarity, as the XTREME scripts do (Hu et al. 2020, §4: layer 14 of XLM-R large).

- Tatoeba: each non-English sentence retrieves its nearest English sentence; accuracy is the
  share that retrieve their own translation.
- BUCC: sentence pairs are mined with the ratio margin of Artetxe & Schwenk (2019) over k=4
  neighbours, forward and backward candidates merged with each sentence used once (LASER's
  "max" retrieval, which XTREME uses); the score threshold is the one that maximises F1 on the
  language's dev pairs, and F1 on the test pairs at that threshold is the metric. The hub's
  bucc18 configs hold the gold pairs only (no distractor sentences), so mining there is
  easier than in the shared task; local files may add unpaired sentences (an empty
  target_sentence or source_sentence).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from xstilts.trainer.config import RunConfig, RunResult
from xstilts.trainer.data import VALIDATION, normalize_rows, open_split, test_splits, tuning_splits
from xstilts.trainer.tasks import TASKS

log = logging.getLogger("xstilts.trainer")

MARGIN_NEIGHBOURS = 4  # k of the ratio margin (XTREME's BUCC script)
# XTREME takes layer 14 of XLM-R large's 24: the same depth share for other encoders.
XTREME_LAYER, XTREME_LAYERS = 14, 24


def default_layer(n_layers: int) -> int:
    return max(1, round(n_layers * XTREME_LAYER / XTREME_LAYERS))


# --- pure matching ------------------------------------------------------------------------------


def nearest_accuracy(sources: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of rows i of `sources` whose most similar row of `targets` is row i (unit vectors:
    the dot product is the cosine)."""
    if len(sources) == 0:
        return 0.0
    nearest = (sources @ targets.T).argmax(dim=1)
    return float((nearest == torch.arange(len(sources))).float().mean())


@dataclass(frozen=True)
class Candidate:
    score: float
    source: int
    target: int


def margin_candidates(sources: torch.Tensor, targets: torch.Tensor, k: int = MARGIN_NEIGHBOURS) -> list[Candidate]:
    """Mined pairs, best first: each sentence's best partner by ratio margin, forward and
    backward, each source and each target used once."""
    if len(sources) == 0 or len(targets) == 0:
        return []
    cos = sources @ targets.T
    k_src, k_tgt = min(k, cos.size(1)), min(k, cos.size(0))
    src_neighbourhood = cos.topk(k_src, dim=1).values.mean(dim=1)  # per source: mean cos to its k nearest
    tgt_neighbourhood = cos.topk(k_tgt, dim=0).values.mean(dim=0)
    margin = cos / ((src_neighbourhood[:, None] + tgt_neighbourhood[None, :]) / 2)
    forward = margin.argmax(dim=1)
    backward = margin.argmax(dim=0)
    pairs = {(i, int(forward[i])) for i in range(margin.size(0))}
    pairs |= {(int(backward[j]), j) for j in range(margin.size(1))}
    ranked = sorted((Candidate(float(margin[i, j]), i, j) for i, j in pairs),
                    key=lambda c: (-c.score, c.source, c.target))
    used_sources: set[int] = set()
    used_targets: set[int] = set()
    out = []
    for c in ranked:
        if c.source in used_sources or c.target in used_targets:
            continue
        used_sources.add(c.source)
        used_targets.add(c.target)
        out.append(c)
    return out


def f1_at(candidates: Sequence[Candidate], gold: set[tuple[int, int]], threshold: float) -> float:
    predicted = {(c.source, c.target) for c in candidates if c.score >= threshold}
    correct = len(predicted & gold)
    if not correct:
        return 0.0
    precision, recall = correct / len(predicted), correct / len(gold)
    return 2 * precision * recall / (precision + recall)


def best_threshold(candidates: Sequence[Candidate], gold: set[tuple[int, int]]) -> float:
    """The candidate score that, used as the threshold, gives the highest F1 (the highest such
    score on ties)."""
    if not candidates:
        return 0.0
    return max((c.score for c in candidates), key=lambda t: (f1_at(candidates, gold, t), t))


# --- embedding ----------------------------------------------------------------------------------


@dataclass
class Embedder:
    encoder: Any
    tokenizer: Any
    layer: int
    device: torch.device
    max_length: int = 128
    batch_size: int = 64

    def __call__(self, sentences: Sequence[str]) -> torch.Tensor:
        """Unit-length mean-pooled states of `layer` (0: the embeddings), one row per sentence."""
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        out = torch.empty(len(sentences), self.encoder.config.hidden_size)
        for at in range(0, len(order), self.batch_size):
            batch = order[at: at + self.batch_size]
            enc = self.tokenizer([sentences[i] for i in batch], truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="pt").to(self.device)
            with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16,
                                                        enabled=self.device.type == "cuda"):
                states = self.encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                      output_hidden_states=True).hidden_states[self.layer]
            mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
            out[batch] = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()
        return out


def side(examples: Sequence[dict[str, str]], key: str) -> tuple[list[str], dict[int, int]]:
    """The distinct non-empty sentences of one side and, per example, the index of its sentence."""
    sentences: dict[str, int] = {}
    index = {}
    for n, e in enumerate(examples):
        if e[key]:
            index[n] = sentences.setdefault(e[key], len(sentences))
    return list(sentences), index


def pairs_and_gold(embed: Embedder, examples: Sequence[dict[str, str]]) -> tuple[list[Candidate], set[tuple[int, int]]]:
    sources, src_index = side(examples, "source")
    targets, tgt_index = side(examples, "target")
    gold = {(src_index[n], tgt_index[n]) for n in range(len(examples)) if n in src_index and n in tgt_index}
    return margin_candidates(embed(sources), embed(targets)), gold


def score_language(task: str, embed: Embedder, test: Sequence[dict[str, str]],
                   dev: Sequence[dict[str, str]] | None) -> dict[str, float]:
    if TASKS[task].metric == "accuracy":  # Tatoeba: every row is a pair
        return {"accuracy": nearest_accuracy(embed([e["source"] for e in test]), embed([e["target"] for e in test]))}
    threshold = 0.0
    if dev:
        threshold = best_threshold(*pairs_and_gold(embed, dev))
    candidates, gold = pairs_and_gold(embed, test)
    return {"f1": f1_at(candidates, gold, threshold), "threshold": threshold}


# --- the run ------------------------------------------------------------------------------------


def run_retrieval(config: RunConfig, tracker: Any, started: float, is_main: bool = True) -> RunResult:
    """Evaluate every language of a retrieval target with the run's encoder; no training,
    no checkpoint."""
    from transformers import AutoTokenizer
    from xstilts.trainer.batch_plan import InvalidRun
    from xstilts.trainer.evaluate import test_metrics
    from xstilts.trainer.model import load_encoder
    from xstilts.trainer.rundir import utc_now, versions, write_result

    task = TASKS[config.tasks[0]]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    encoder = load_encoder(config.init_model_dir or config.model).to(device).eval()
    n_layers = int(encoder.config.num_hidden_layers)
    layer = config.hyperparameters.retrieval_layer
    layer = default_layer(n_layers) if layer is None else layer
    if layer > n_layers:
        raise InvalidRun(f"retrieval_layer {layer} is beyond the encoder's {n_layers} layers; give 0-{n_layers}")
    embed = Embedder(encoder, tokenizer, layer, device, config.hyperparameters.max_seq_length)
    tracker.log_params({"retrieval_layer_resolved": layer})

    def examples(ref: Any) -> list[dict[str, str]]:
        raw = open_split(config, ref)
        return normalize_rows(task, raw.rows(), raw.where)

    dev = {ref.language: examples(ref) for ref in tuning_splits(config) if ref.split == VALIDATION}
    languages: dict[str, dict[str, float]] = {}
    for ref in test_splits(config):
        begun = time.monotonic()
        languages[ref.language] = score_language(task.name, embed, examples(ref), dev.get(ref.language))
        log.info("%s %s: %s (%.1fs)", task.name, ref.language, languages[ref.language], time.monotonic() - begun)
    metrics = test_metrics(task.name, languages)
    result = RunResult(
        run_id=config.run_id, config=config, metrics=metrics, languages=languages, primary_metric=task.metric,
        parameter_count=sum(p.numel() for p in encoder.parameters()), tokens_seen=0, train_steps=0,
        wall_seconds=round(time.monotonic() - started, 2), tokens_per_second=0.0, finished_at=utc_now(),
        mlflow_run_id=tracker.mlflow_run_id, versions=versions(),
    )
    if is_main:
        tracker.log_metrics(metrics, step=0)
        tracker.log_artifact(write_result(result))
    return result
