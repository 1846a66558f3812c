"""Zero-shot evaluation throughput: examples per second of the xstilts evaluation of all 15 XNLI
test languages against a naive fixed-padding loop, on the same model and data, in one run.

  naive     each language's rows in file order, batches of a fixed `--naive-batch` rows (32, the
            training batch; HF's Trainer evaluates 8 by default), every row padded to the maximum
            length (128), one forward pass per batch under `torch.no_grad`;
  xstilts   `xstilts.trainer.evaluate.evaluate_splits` with the predictor a target run uses: the
            rows of all languages sorted by length together and packed into batches by a token
            budget (4 training micro batches of max-length rows, as the trainer sets it, at most
            4,096 tokens on a CPU), mostly rows of one length that need no padding and no
            attention mask, under `torch.inference_mode`.

Both score the same rows with the same model (an XLM-R-architecture encoder with random weights
and an XNLI head); their accuracies must agree, which the benchmark checks. Data: every
language's test split with MNLI's length shape (10-128 tokens, median about 40). Tokenization is
done (and cached) before the clock starts for both. Each loop runs `--repeats` times in turn and
its best repeat is reported, by wall-clock time and by the CPU time of the process: on a
shared machine the CPU seconds are the steadier measure of the work each loop does.

On a GPU the xstilts predictor runs under bf16 autocast, as a target run's evaluation does
(precision "auto"); the naive loop stays in fp32, PyTorch's default. `--model large` (GPU only)
evaluates the XLM-R large architecture.

    python benchmarks/eval_throughput.py [--model tiny|large] [--per-language 1000] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import ARCHITECTURES, MAX_LENGTH, XNLI_LANGUAGES, build_encoder, write_xnli


def encoded_test_splits(model: Path, data: Path, cache: Path) -> list[Any]:
    """Every language's tokenized test split, as a target run loads them."""
    from transformers import AutoTokenizer
    from xstilts.trainer.config import RunConfig
    from xstilts.trainer.data import open_split, test_splits
    from xstilts.trainer.features import load_encoded, tokenizer_fingerprint

    config = RunConfig.model_validate({"model": str(model), "stage": "target", "tasks": ["xnli"],
                                       "task_data": {"xnli": str(data)},
                                       "hyperparameters": {"max_seq_length": MAX_LENGTH}})
    tokenizer = AutoTokenizer.from_pretrained(model)
    fingerprint = tokenizer_fingerprint(tokenizer)
    return [load_encoded(open_split(config, ref), tokenizer, fingerprint, MAX_LENGTH, cache)
            for ref in test_splits(config)]


def xstilts_predictor(model: Any, pad_token_id: int, device: Any, micro_batch: int) -> Any:
    """The predictor a target run evaluates with: its token budget as the trainer sets it from
    the training micro batch, bf16 autocast and padding to multiples of 8 on a GPU."""
    import contextlib

    import torch
    from xstilts.trainer.batching import Collator
    from xstilts.trainer.evaluate import Predictor, eval_token_budget
    from xstilts.trainer.loop import MAX_EVAL_ROWS
    from xstilts.trainer.train import EVAL_BATCH_FACTOR

    cuda = device.type == "cuda"
    eval_tokens = eval_token_budget(EVAL_BATCH_FACTOR * micro_batch * MAX_LENGTH, device)

    def forward(batch: dict[str, Any]) -> Any:
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            return model(**batch)

    return Predictor(forward, Collator(pad_token_id, pad_to_multiple_of=8 if cuda else 1), device,
                     max_tokens=eval_tokens, max_rows=min(MAX_EVAL_ROWS, eval_tokens))


def xstilts_eval(predictor: Any, splits: list[Any]) -> dict[str, float]:
    from xstilts.trainer.evaluate import evaluate_splits

    return {e.ref.language: m["accuracy"] for e, m in zip(splits, evaluate_splits(predictor, splits, 0), strict=True)}


def computed_tokens(predictor: Any, splits: list[Any]) -> int:
    """Tokens the predictor's batches hold, padding included (all languages batched together)."""
    from xstilts.trainer.batching import eval_batches

    lengths = [n for e in splits for n in e.features["length"][:]]
    return sum(max(lengths[i] for i in b) * len(b) for b in eval_batches(lengths, predictor.max_tokens,
                                                                          predictor.max_rows))


def naive_inputs(splits: list[Any], pad_token_id: int, device: Any,
                 batch_size: int) -> list[tuple[str, list[dict[str, Any]], list[int]]]:
    """Per language: fixed batches of rows padded to MAX_LENGTH (already on the device), and
    the labels."""
    import torch

    out = []
    for e in splits:
        ids, labels = e.features["input_ids"], e.features["label"]
        batches = []
        for at in range(0, len(ids), batch_size):
            rows = ids[at: at + batch_size]
            input_ids = torch.full((len(rows), MAX_LENGTH), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), MAX_LENGTH), dtype=torch.long)
            for i, row in enumerate(rows):
                input_ids[i, : len(row)] = torch.tensor(row)
                attention_mask[i, : len(row)] = 1
            batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                     "task_index": torch.zeros(len(rows), dtype=torch.long)}
            batches.append({k: v.to(device) for k, v in batch.items()})
        out.append((e.ref.language, batches, labels))
    return out


def naive_eval(model: Any, inputs: list[tuple[str, list[dict[str, Any]], list[int]]]) -> dict[str, float]:
    import torch

    accuracy = {}
    with torch.no_grad():
        for language, batches, labels in inputs:
            predicted = [p for batch in batches for p in model(**batch)["logits"].argmax(-1).tolist()]
            accuracy[language] = sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(labels)
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default="tiny")
    parser.add_argument("--micro-batch", type=int, default=32,
                        help="the training micro batch the evaluation token budget derives from")
    parser.add_argument("--naive-batch", type=int, default=32, help="rows per batch of the naive loop")
    parser.add_argument("--per-language", type=int, default=1000, help="test examples per language (XNLI has 5,010)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    from xstilts.trainer.model import HeadSpec, build_model
    from xstilts.trainer.tasks import TASKS, Format

    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    if args.model == "large" and not cuda:
        sys.exit("--model large needs a GPU; use --model tiny")
    if not cuda:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    arch = ARCHITECTURES[args.model]
    with tempfile.TemporaryDirectory(prefix="xstilts-eval-") as tmp:
        root = Path(tmp)
        model_dir = build_encoder(root / "model", arch)
        write_xnli(root / "xnli", args.per_language)
        splits = encoded_test_splits(model_dir, root / "xnli", root / "cache")
        heads = [HeadSpec("xnli", Format.CLASSIFICATION, TASKS["xnli"].labels)]
        # the same weights twice: the naive loop with PyTorch's default attention in fp32, xstilts
        # with the kernel a run picks (flash-attention-2 in bf16 where installed)
        naive_model = build_model(model_dir, heads, seed=0).eval().to(device)
        model = build_model(model_dir, heads, seed=0, cuda=cuda, half_precision=cuda).eval().to(device)
        pad = model.config.pad_token_id
        inputs = naive_inputs(splits, pad, device, args.naive_batch)
        examples = sum(len(e) for e in splits)
        real = sum(sum(e.features["length"]) for e in splits)
        predictor = xstilts_predictor(model, pad, device, args.micro_batch)
        computed = computed_tokens(predictor, splits)
        best = {"naive": float("inf"), "xstilts": float("inf")}
        cpu = dict(best)
        accuracies: dict[str, dict[str, float]] = {}
        loops = {"naive": lambda: naive_eval(naive_model, inputs), "xstilts": lambda: xstilts_eval(predictor, splits)}
        for _ in range(args.repeats):
            for name, loop in loops.items():
                started, cpu_started = time.perf_counter(), time.process_time()
                accuracies[name] = loop()
                best[name] = min(best[name], time.perf_counter() - started)
                cpu[name] = min(cpu[name], time.process_time() - cpu_started)

    disagreement = max(abs(accuracies["naive"][lang] - accuracies["xstilts"][lang]) for lang in XNLI_LANGUAGES)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"device: {where}; torch {torch.__version__},"
          f" transformers {transformers.__version__}")
    print(f"model: XLM-R architecture '{arch.name}' (hidden {arch.hidden}, {arch.layers} layers), random weights,"
          f" an XNLI head")
    print(f"data: {len(XNLI_LANGUAGES)} XNLI languages x {args.per_language:,} test examples = {examples:,}"
          f" (10-{MAX_LENGTH} tokens, median ~40); best of {args.repeats} run(s) each")
    print(f"{'':34}{'examples/s':>12}{'padding':>10}{'seconds':>9}{'CPU s':>8}")
    naive_padding = 1 - real / (examples * MAX_LENGTH)
    naive_label = f"naive loop (pad to {MAX_LENGTH}, batch {args.naive_batch})"
    for name, label, padding in (("naive", naive_label, naive_padding),
                                 ("xstilts", "xstilts (sorted, token budget)", 1 - real / computed)):
        print(f"{label:34}{examples / best[name]:>12,.0f}{padding:>10.1%}{best[name]:>9.2f}{cpu[name]:>8.2f}")
    ratio = best["naive"] / best["xstilts"]
    print(f"ratio xstilts / naive examples/s: {ratio:.2f}x  (goal >= 3x: {'met' if ratio >= 3 else 'NOT met'})")
    print(f"ratio by CPU seconds: {cpu['naive'] / cpu['xstilts']:.2f}x")
    print(f"largest per-language accuracy difference between the two: {disagreement:.4f}")
    if args.json:
        args.json.write_text(json.dumps({
            "device": where, "torch": torch.__version__, "transformers": transformers.__version__,
            "model": arch.name, "examples": examples, "per_language": args.per_language, "repeats": args.repeats,
            "naive_batch": args.naive_batch, "micro_batch": args.micro_batch, "load_average": list(os.getloadavg()),
            "naive": {"examples_per_second": examples / best["naive"], "seconds": best["naive"],
                      "cpu_seconds": cpu["naive"], "padding": naive_padding},
            "xstilts": {"examples_per_second": examples / best["xstilts"], "seconds": best["xstilts"],
                        "cpu_seconds": cpu["xstilts"], "padding": 1 - real / computed},
            "ratio": ratio, "ratio_cpu_seconds": cpu["naive"] / cpu["xstilts"], "accuracy_difference": disagreement,
        }, indent=2) + "\n")
    if not cuda and disagreement > 1 / args.per_language:  # a near-tie may flip one row; more means a bug
        sys.exit("the two evaluations disagree: the benchmark is invalid")


if __name__ == "__main__":
    main()
