"""Training throughput: real (non-pad) tokens per second of the xstilts trainer against two
plain Hugging Face `Trainer` baselines, measured in the same run, on the same model, the same
MNLI-like data (pairs of 10-128 tokens, median about 40; benchmarks/synthetic.py), the same
rows and the same number of optimizer steps:

  (a) HF default   rows tokenized with `padding="max_length"` (128, the classic run_glue
                   setting), the default collator, random sampling, every other argument at
                   its default (fp32, the default AdamW, the default attention kernel);
  (b) HF best      the best built-in settings: dynamic padding (`DataCollatorWithPadding`) and
                   `train_sampling_strategy="group_by_length"`, plus bf16 on a GPU;
  xstilts          `xstilts.trainer.train.run` on a RunConfig: length-grouped global batches
                   padded to their own longest row, SDPA (flash-attention-2 when installed on
                   a GPU), bf16 and fused AdamW on a GPU, automatic micro batch.

Every trainer's rate is real tokens over the seconds of its training steps: from the start of
`train()` to the end of the last optimizer step, less the xstilts run's dev evaluation and
checkpoint saves (a baseline does neither). Model loading and tokenization are outside. The
trainers run in turn, `--repeats` times, and each one's best repeat is reported: on a shared
machine the best of several is the least disturbed measurement.

`--model large` builds the XLM-R large architecture with random weights (GPU only) and prints
model FLOPs utilisation: 6 · N · tokens/s against the GPU's dense bf16 peak, N = non-embedding
parameters.

    python benchmarks/train_throughput.py [--model tiny|large] [--steps 60] [--batch-size 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import ARCHITECTURES, MAX_LENGTH, build_encoder, real_and_padded, write_mnli

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by a substring of the device name.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class Measurement:
    name: str
    real_tokens: int
    padded_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def padding_fraction(self) -> float:
        return 1 - self.real_tokens / self.padded_tokens


def peak_flops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return peak
    return None


def nonembedding_parameters(model_dir: Path) -> int:
    """Parameters outside the embedding tables: those that cost 6 FLOPs per token in training."""
    import torch
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(model_dir), add_pooling_layer=False)
    return sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)


# --- xstilts ---------------------------------------------------------------------------------------


def run_xstilts(model: Path, data: Path, out: Path, steps: int, batch_size: int) -> Measurement:
    from xstilts.trainer.config import RunConfig
    from xstilts.trainer.train import run

    config = RunConfig.model_validate({
        "model": str(model), "stage": "intermediate", "tasks": ["mnli"], "task_data": {"mnli": str(data)},
        "storage_root": str(out), "hyperparameters": {"batch_size": batch_size, "max_steps": steps,
                                                      "max_seq_length": MAX_LENGTH, "learning_rate": 1e-4},
        "tracking": {"tracking_uri": f"sqlite:///{out.parent / 'mlflow.db'}"},
    })
    result = run(config, cache_dir=out.parent / "cache")
    real, padded = xstilts_batches(config, out.parent / "cache")
    assert real == result.tokens_seen, (real, result.tokens_seen)  # the batches replayed are the ones trained
    return Measurement("xstilts", result.tokens_seen, padded, result.tokens_seen / result.tokens_per_second)


def xstilts_batches(config: Any, cache: Path) -> tuple[int, int]:
    """Real and padded tokens of the micro-batches the run trained on: its sampler, same seed,
    same data, same micro batch."""
    from transformers import AutoTokenizer
    from xstilts.trainer.batch_plan import plan_steps
    from xstilts.trainer.batching import MultiTaskBatchSampler
    from xstilts.trainer.data import SplitRef, open_split
    from xstilts.trainer.features import load_encoded, tokenizer_fingerprint
    from xstilts.trainer.train import micro_batch_inputs

    tokenizer = AutoTokenizer.from_pretrained(config.model)
    train = load_encoded(open_split(config, SplitRef("mnli", "train")), tokenizer, tokenizer_fingerprint(tokenizer),
                         MAX_LENGTH, cache)
    lengths = train.features["length"]
    schedule = plan_steps(config, 1, [len(lengths)], MAX_LENGTH, **micro_batch_inputs(config))
    sampler = MultiTaskBatchSampler([lengths], config.hyperparameters.batch_size, schedule.micro_batch_size,
                                    schedule.steps_per_epoch, seed=config.seed)
    batches = list(sampler)[: schedule.total_steps * schedule.accumulation]
    return real_and_padded(lengths, batches)


# --- the Hugging Face baselines -------------------------------------------------------------------


class CountingCollator:
    """Wraps a collator and records the tokens of each batch it builds: real and computed.
    (accelerate's data loader builds one batch ahead, so there is one more than was trained.)"""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collate = collate
        self.batches: list[tuple[int, int]] = []

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(rows)
        self.batches.append((int(batch["attention_mask"].sum()), batch["attention_mask"].numel()))
        return batch

    def tokens(self, batches: int) -> tuple[int, int]:
        """Real and padded tokens of the first `batches` batches."""
        return sum(r for r, _ in self.batches[:batches]), sum(p for _, p in self.batches[:batches])


def step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Seconds from the start of training to the end of the last optimizer step."""

        started = ended = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.ended = time.monotonic()

    return StepTimer()


def run_hf(model: Path, data: Path, out: Path, steps: int, batch_size: int, best: bool, cuda: bool) -> Measurement:
    import datasets
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    encoded = tokenizer([r["premise"] for r in rows], [r["hypothesis"] for r in rows], truncation=True,
                        max_length=MAX_LENGTH, padding=False if best else "max_length")
    train = datasets.Dataset.from_dict({**encoded, "labels": [r["label"] for r in rows]})
    classifier = AutoModelForSequenceClassification.from_pretrained(model, num_labels=3)
    collator = CountingCollator(DataCollatorWithPadding(tokenizer) if best else default_data_collator)
    extra: dict[str, Any] = {"train_sampling_strategy": "group_by_length", "bf16": cuda} if best else {}
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch_size, max_steps=steps,
                             learning_rate=1e-4, report_to="none", save_strategy="no", disable_tqdm=True,
                             logging_strategy="no", use_cpu=not cuda, include_num_input_tokens_seen="non_padding",
                             **extra)
    timer = step_timer()
    trainer = Trainer(model=classifier, args=args, train_dataset=train, data_collator=collator, callbacks=[timer])
    trainer.train()
    real, padded = collator.tokens(steps)
    assert real == trainer.state.num_input_tokens_seen, (real, trainer.state.num_input_tokens_seen)
    return Measurement("HF best" if best else "HF default", real, padded, timer.ended - timer.started)


# --- the run ----------------------------------------------------------------------------------------


def train_rows(steps: int, batch_size: int) -> int:
    """Rows in the training file: exactly one epoch, so that every trainer trains on every row
    once and on the same real tokens. (Fewer rows than 200 batches make HF's length grouping
    sort smaller megabatches than the 50 batches it sorts on MNLI's 393k rows.)"""
    return steps * batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default="tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each trainer; the best is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (all trainers)")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    arch = ARCHITECTURES[args.model]
    if args.model == "large" and not cuda:
        sys.exit("--model large needs a GPU (XLM-R large does not train at a useful rate on a CPU); use --model tiny")
    if not cuda:
        torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} thread(s)"

    with tempfile.TemporaryDirectory(prefix="xstilts-throughput-") as tmp:
        root = Path(tmp)
        model = build_encoder(root / "model", arch)
        n_nonembedding = nonembedding_parameters(model)
        data = root / "mnli"
        write_mnli(data, train=train_rows(args.steps, args.batch_size), dev=256)
        trainers: dict[str, Callable[[int], Measurement]] = {
            "HF default": lambda r: run_hf(model, data, root / f"a{r}", args.steps, args.batch_size, False, cuda),
            "HF best": lambda r: run_hf(model, data, root / f"b{r}", args.steps, args.batch_size, True, cuda),
            "xstilts": lambda r: run_xstilts(model, data, root / f"x{r}", args.steps, args.batch_size),
        }
        best: dict[str, Measurement] = {}
        rates: dict[str, list[float]] = {name: [] for name in trainers}
        started = time.perf_counter()
        for r in range(args.repeats):
            for name, train in trainers.items():
                m = train(r)
                rates[name].append(m.tokens_per_second)
                if name not in best or m.tokens_per_second > best[name].tokens_per_second:
                    best[name] = m
        elapsed = time.perf_counter() - started

    peak = peak_flops(device) if cuda else None
    print(f"device: {device}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"model: XLM-R architecture '{arch.name}' (hidden {arch.hidden}, {arch.layers} layers, {arch.heads} heads,"
          f" vocabulary {arch.vocab:,}), {n_nonembedding:,} non-embedding parameters, random weights")
    print(f"data: {train_rows(args.steps, args.batch_size):,} MNLI-like pairs (10-{MAX_LENGTH} tokens, median ~40);"
          f" {args.steps} steps of {args.batch_size} rows; best of {args.repeats} run(s) each")
    header = f"{'':14}{'real tokens/s':>15}{'padding':>10}{'real tokens':>13}{'seconds':>9}  all runs (tokens/s)"
    print(header + ("   MFU" if peak else ""))
    for name, m in best.items():
        runs = ", ".join(f"{v:,.0f}" for v in rates[name])
        mfu = f"   {6 * n_nonembedding * m.tokens_per_second / peak:.1%}" if peak else ""
        print(f"{name:14}{m.tokens_per_second:>15,.0f}{m.padding_fraction:>10.1%}{m.real_tokens:>13,}"
              f"{m.seconds:>9.2f}  {runs}{mfu}")
    ours = best["xstilts"].tokens_per_second
    for name, goal in (("HF default", 3.0), ("HF best", 1.3)):
        ratio = ours / best[name].tokens_per_second
        print(f"ratio xstilts / {name}: {ratio:.2f}x  (goal >= {goal}x: {'met' if ratio >= goal else 'NOT met'})")
    if cuda and peak is None:
        print(f"MFU: no dense bf16 peak known for {device!r}")
    print(f"[{elapsed:.0f} s in all]")


if __name__ == "__main__":
    main()
