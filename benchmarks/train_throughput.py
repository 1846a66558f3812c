"""Training throughput: real (non-pad) tokens per second and padding fraction of the xstilts
trainer against a plain Hugging Face `Trainer` with default settings padding every row to the
maximum length, on the same tiny XLM-R model and the same MNLI-like data, in one run.

Data: sentence pairs whose tokenized length follows MNLI's shape (10 to 128 tokens, median about
40: a log-normal, clipped), written as a local MNLI file in GLUE's columns. The tokenizer is
word-level (one token per word), so lengths are exact.

- xstilts: `xstilts.trainer.train.run` on a RunConfig (dynamic padding, length-grouped global
  batches); tokens/s is the RunResult's (real tokens over the seconds of `Trainer.train()`, which
  here also includes one dev evaluation and the checkpoint save at the end). Its padding
  fraction is computed from the batches its sampler yields for that run.
- baseline: `AutoModelForSequenceClassification` from the same checkpoint, rows tokenized with
  `padding="max_length"` (the classic run_glue setting), the default collator and random
  sampler; tokens/s is real tokens over `train_runtime`.

    python benchmarks/train_throughput.py [--steps 100] [--batch-size 32] [--hidden 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

MAX_LENGTH = 128
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


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


def build_model(root: Path, hidden: int, layers: int, vocab: int = 1000) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel

    words = [f"w{i}" for i in range(vocab - len(SPECIALS))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate([*SPECIALS, *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                        cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                        model_max_length=MAX_LENGTH)
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=max(1, hidden // 16), intermediate_size=4 * hidden,
                              max_position_embeddings=MAX_LENGTH + 2, type_vocab_size=1, pad_token_id=1,
                              bos_token_id=0, eos_token_id=2)
    out = root / "model"
    XLMRobertaModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_mnli(directory: Path, train: int, dev: int) -> None:
    rng = random.Random(1)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", train, 0), ("validation", dev, 1)):
        rows = []
        for i, (p, h) in enumerate(pair_lengths(n, seed)):
            premise = " ".join(f"w{rng.randrange(995)}" for _ in range(p))
            hypothesis = " ".join(f"w{rng.randrange(995)}" for _ in range(h))
            rows.append(json.dumps({"premise": premise, "hypothesis": hypothesis, "label": rng.randrange(3), "idx": i}))
        (directory / f"{split}.jsonl").write_text("\n".join(rows) + "\n")


def run_xstilts(model: Path, data: Path, out: Path, steps: int, batch_size: int) -> dict[str, float]:
    from xstilts.trainer.config import RunConfig
    from xstilts.trainer.train import run

    config = RunConfig.model_validate({
        "model": str(model), "stage": "intermediate", "tasks": ["mnli"], "task_data": {"mnli": str(data)},
        "storage_root": str(out), "hyperparameters": {"batch_size": batch_size, "max_steps": steps,
                                                      "max_seq_length": MAX_LENGTH, "learning_rate": 1e-4},
        "tracking": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}"},
    })
    result = run(config, cache_dir=out / "cache")
    return {"tokens_per_second": result.tokens_per_second, "padding_fraction": xstilts_padding(config, out),
            "real_tokens": float(result.tokens_seen)}


def xstilts_padding(config: Any, out: Path) -> float:
    """The padding fraction of the batches the run trained on: its sampler, same seed, same data."""
    from transformers import AutoTokenizer

    from xstilts.trainer.batching import MultiTaskBatchSampler
    from xstilts.trainer.data import SplitRef, open_split
    from xstilts.trainer.features import load_encoded, tokenizer_fingerprint
    from xstilts.trainer.schedule import plan_schedule

    tokenizer = AutoTokenizer.from_pretrained(config.model)
    train = load_encoded(open_split(config, SplitRef("mnli", "train")), tokenizer, tokenizer_fingerprint(tokenizer),
                         MAX_LENGTH, out / "cache")
    lengths = train.features["length"]
    schedule = plan_schedule(config, 1, [len(lengths)], MAX_LENGTH)
    sampler = MultiTaskBatchSampler([lengths], config.hyperparameters.batch_size, schedule.micro_batch_size,
                                    schedule.steps_per_epoch, seed=config.seed)
    real = padded = 0
    for step, batch in enumerate(sampler):
        if step >= schedule.total_steps * (config.hyperparameters.batch_size // schedule.micro_batch_size):
            break
        real += sum(lengths[i] for i in batch)
        padded += max(lengths[i] for i in batch) * len(batch)
    return 1 - real / padded


def run_baseline(model: Path, data: Path, out: Path, steps: int, batch_size: int) -> dict[str, float]:
    """The plain Trainer: default arguments but for the batch size, steps and learning rate."""
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    encoded = tokenizer([r["premise"] for r in rows], [r["hypothesis"] for r in rows], truncation=True,
                        max_length=MAX_LENGTH, padding="max_length")
    train = datasets.Dataset.from_dict({**encoded, "labels": [r["label"] for r in rows]})
    classifier = AutoModelForSequenceClassification.from_pretrained(model, num_labels=3)
    args = TrainingArguments(output_dir=str(out / "baseline"), per_device_train_batch_size=batch_size,
                             max_steps=steps, learning_rate=1e-4, report_to="none", save_strategy="no",
                             disable_tqdm=True, logging_strategy="no", use_cpu=True,
                             include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=classifier, args=args, train_dataset=train)
    output = trainer.train()
    real = trainer.state.num_input_tokens_seen
    rows_seen = steps * batch_size
    return {"tokens_per_second": real / output.metrics["train_runtime"],
            "padding_fraction": 1 - real / (rows_seen * MAX_LENGTH), "real_tokens": float(real)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both trainers")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="xstilts-throughput-") as tmp:
        root = Path(tmp)
        model = build_model(root, args.hidden, args.layers)
        data = root / "mnli"
        write_mnli(data, train=args.steps * args.batch_size + 64, dev=256)
        started = time.perf_counter()
        ours = run_xstilts(model, data, root / "xstilts", args.steps, args.batch_size)
        baseline = run_baseline(model, data, root, args.steps, args.batch_size)
        elapsed = time.perf_counter() - started
    print(f"model: XLM-R architecture, hidden {args.hidden}, {args.layers} layers; {args.steps} steps of"
          f" {args.batch_size} rows; {args.threads} thread(s); max length {MAX_LENGTH}")
    print(f"{'':24}{'real tokens/s':>15}{'padding':>10}{'real tokens':>13}")
    for name, m in (("xstilts trainer", ours), ("HF Trainer, pad to max", baseline)):
        print(f"{name:24}{m['tokens_per_second']:>15,.0f}{m['padding_fraction']:>10.1%}{m['real_tokens']:>13,.0f}")
    print(f"ratio (xstilts / baseline) real tokens/s: {ours['tokens_per_second'] / baseline['tokens_per_second']:.2f}x"
          f"   [{elapsed:.0f} s in all]")


if __name__ == "__main__":
    main()
