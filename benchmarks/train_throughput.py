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
same span is also measured in process CPU seconds (every thread of the process, the xstilts
run's MLflow delivery thread included): on a CPU shared with other work, real tokens per CPU
second compare the trainers' own work, where the wall rates follow the neighbours' load.

The trainers run interleaved, `--repeats` rounds of one run each, and each round starts with a
different trainer (round r rotates the order by r), so that a slow spell of a shared machine
does not fall on one trainer. Reported: each trainer's median rate and its spread (lowest and
highest run), and each ratio as the ratio of medians with a 95 % bootstrap interval that
resamples whole rounds (a round's runs share the machine's load at the time). On a GPU
`--warmup-rounds` (default 1) runs every trainer first for a few untimed steps: CUDA context,
cuBLAS handles and kernel caches then cost no trainer its first measured steps.

`--model large` builds the XLM-R large architecture with random weights (GPU only) and prints
model FLOPs utilisation: 6 · N · real tokens/s against the GPU's dense bf16 peak (no sparsity;
named in the output), N = non-embedding parameters. `--json PATH` writes every figure.

    python benchmarks/train_throughput.py [--model tiny|large] [--steps 200] [--batch-size 32] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
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
    cpu_seconds: float  # process CPU seconds of the same span

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def tokens_per_cpu_second(self) -> float:
        return self.real_tokens / self.cpu_seconds

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
    return Measurement("xstilts", result.tokens_seen, padded, result.tokens_seen / result.tokens_per_second,
                       result.train_cpu_seconds)


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
    lengths = train.features["length"][:]  # a list: indexing a datasets Column reads Arrow per row
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
        """Seconds, wall and process CPU, from the start of training to the end of the last
        optimizer step."""

        started = ended = cpu_started = cpu_ended = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started, self.cpu_started = time.monotonic(), time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.ended, self.cpu_ended = time.monotonic(), time.process_time()

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
    return Measurement("HF best" if best else "HF default", real, padded, timer.ended - timer.started,
                       timer.cpu_ended - timer.cpu_started)


# --- the run ----------------------------------------------------------------------------------------


def train_rows(steps: int, batch_size: int) -> int:
    """Rows in the training file: exactly one epoch, so that every trainer trains on every row
    once and on the same real tokens. (Fewer rows than 200 batches make HF's length grouping
    sort smaller megabatches than the 50 batches it sorts on MNLI's 393k rows.)"""
    return steps * batch_size


def round_order(names: list[str], round_index: int) -> list[str]:
    """The trainers of round `round_index`, rotated so that each round starts with another."""
    k = round_index % len(names)
    return names[k:] + names[:k]


def ratio_interval(ours: list[float], theirs: list[float], resamples: int = 4000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of median(ours) / median(theirs), resampling whole rounds (the i-th
    run of each was measured in the same round)."""
    rng = random.Random(seed)
    n = len(ours)
    ratios = []
    for _ in range(resamples):
        rounds = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(ours[i] for i in rounds) / statistics.median(theirs[i] for i in rounds))
    ratios.sort()
    tail = (1 - level) / 2
    return ratios[int(tail * resamples)], ratios[min(resamples - 1, int((1 - tail) * resamples))]


def summarize(rates: dict[str, list[float]], measurements: dict[str, list[Measurement]]) -> dict[str, Any]:
    """Per trainer: median, lowest and highest real tokens/s, the same per CPU second, padding
    and tokens; per ratio against a baseline: ratio of medians and its bootstrap interval, by
    wall and by CPU seconds."""
    cpu_rates = {name: [x.tokens_per_cpu_second for x in ms] for name, ms in measurements.items()}
    trainers = {}
    for name, values in rates.items():
        m = measurements[name][0]
        median, cpu = statistics.median(values), cpu_rates[name]
        trainers[name] = {"median_tokens_per_second": median, "min": min(values), "max": max(values),
                          "spread": (max(values) - min(values)) / median, "runs": values,
                          "median_tokens_per_cpu_second": statistics.median(cpu), "cpu_min": min(cpu),
                          "cpu_max": max(cpu), "cpu_spread": (max(cpu) - min(cpu)) / statistics.median(cpu),
                          "cpu_runs": cpu,
                          "padding": m.padding_fraction, "real_tokens": m.real_tokens,
                          "median_seconds": statistics.median(x.seconds for x in measurements[name]),
                          "median_cpu_seconds": statistics.median(x.cpu_seconds for x in measurements[name])}
    ratios = {}
    for name, goal in (("HF default", 3.0), ("HF best", 1.3)):
        low, high = ratio_interval(rates["xstilts"], rates[name])
        ratio = trainers["xstilts"]["median_tokens_per_second"] / trainers[name]["median_tokens_per_second"]
        cpu_low, cpu_high = ratio_interval(cpu_rates["xstilts"], cpu_rates[name])
        cpu_ratio = (trainers["xstilts"]["median_tokens_per_cpu_second"]
                     / trainers[name]["median_tokens_per_cpu_second"])
        ratios[name] = {"ratio": ratio, "interval_95": [low, high], "goal": goal, "met": ratio >= goal,
                        "runs": [x / y for x, y in zip(rates["xstilts"], rates[name], strict=True)],
                        "cpu_ratio": cpu_ratio, "cpu_interval_95": [cpu_low, cpu_high]}
    return {"trainers": trainers, "ratios": ratios}


def benchmark(model_kind: str, steps: int, batch_size: int, repeats: int, warmup_rounds: int,
              threads: int) -> dict[str, Any]:
    """Every figure of one benchmark run, as a JSON-able dict."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    arch = ARCHITECTURES[model_kind]
    if not cuda:
        torch.set_num_threads(threads)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} thread(s)"
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="xstilts-throughput-") as tmp:
        root = Path(tmp)
        model = build_encoder(root / "model", arch)
        n_nonembedding = nonembedding_parameters(model)
        data = root / "mnli"
        write_mnli(data, train=train_rows(steps, batch_size), dev=256)
        trainers: dict[str, Callable[[str, int], Measurement]] = {
            "HF default": lambda tag, n: run_hf(model, data, root / tag, n, batch_size, False, cuda),
            "HF best": lambda tag, n: run_hf(model, data, root / tag, n, batch_size, True, cuda),
            "xstilts": lambda tag, n: run_xstilts(model, data, root / tag, n, batch_size),
        }
        names = list(trainers)
        started = time.perf_counter()
        for w in range(warmup_rounds):
            for name in names:
                trainers[name](f"w{w}-{names.index(name)}", min(steps, 10))
        rates: dict[str, list[float]] = {name: [] for name in names}
        measurements: dict[str, list[Measurement]] = {name: [] for name in names}
        for r in range(repeats):
            for name in round_order(names, r):
                m = trainers[name](f"r{r}-{names.index(name)}", steps)
                rates[name].append(m.tokens_per_second)
                measurements[name].append(m)
        elapsed = time.perf_counter() - started
    peak = peak_flops(device) if cuda else None
    out = {
        "device": device, "cuda": cuda, "torch": torch.__version__, "transformers": transformers.__version__,
        "model": {"architecture": arch.name, "hidden": arch.hidden, "layers": arch.layers, "heads": arch.heads,
                  "vocab": arch.vocab, "nonembedding_parameters": n_nonembedding},
        "data": {"rows": train_rows(steps, batch_size), "steps": steps, "batch_size": batch_size,
                 "max_length": MAX_LENGTH},
        "repeats": repeats, "warmup_rounds": warmup_rounds, "threads": None if cuda else threads,
        "load_average_at_start": list(load), "load_average_at_end": list(os.getloadavg()),
        "seconds": elapsed,
        "peak_bf16_flops": peak, "peak_name": peak_name(device) if peak else None,
    } | summarize(rates, measurements)
    if peak:
        for figures in out["trainers"].values():
            figures["mfu"] = 6 * n_nonembedding * figures["median_tokens_per_second"] / peak
    return out


def peak_name(device_name: str) -> str | None:
    for key in PEAK_BF16_FLOPS:
        if key in device_name:
            return key
    return None


def report(out: dict[str, Any]) -> str:
    m, d = out["model"], out["data"]
    peak = out["peak_bf16_flops"]
    lines = [
        f"device: {out['device']}; torch {out['torch']}, transformers {out['transformers']}",
        f"model: XLM-R architecture '{m['architecture']}' (hidden {m['hidden']}, {m['layers']} layers,"
        f" {m['heads']} heads, vocabulary {m['vocab']:,}), {m['nonembedding_parameters']:,} non-embedding"
        " parameters, random weights",
        f"data: {d['rows']:,} MNLI-like pairs (10-{d['max_length']} tokens, median ~40); {d['steps']} steps of"
        f" {d['batch_size']} rows; {out['repeats']} interleaved round(s), {out['warmup_rounds']} untimed warm-up"
        " round(s)",
        "load average (1, 5, 15 min): at start " + ", ".join(f"{x:.2f}" for x in out["load_average_at_start"])
        + "; at end " + ", ".join(f"{x:.2f}" for x in out["load_average_at_end"]),
    ]
    header = (f"{'':12}{'median tok/s':>13}{'lowest':>9}{'highest':>9}{'spread':>8}"
              f"{'tok/CPU-s':>11}{'lowest':>9}{'highest':>9}{'spread':>8}{'padding':>9}{'real tokens':>13}")
    lines.append(header + ("     MFU" if peak else ""))
    for name, t in out["trainers"].items():
        mfu = f"{t['mfu']:>8.1%}" if peak else ""
        lines.append(f"{name:12}{t['median_tokens_per_second']:>13,.0f}{t['min']:>9,.0f}{t['max']:>9,.0f}"
                     f"{t['spread']:>8.1%}{t['median_tokens_per_cpu_second']:>11,.0f}{t['cpu_min']:>9,.0f}"
                     f"{t['cpu_max']:>9,.0f}{t['cpu_spread']:>8.1%}{t['padding']:>9.1%}{t['real_tokens']:>13,}{mfu}")
    for name, r in out["ratios"].items():
        low, high = r["interval_95"]
        cpu_low, cpu_high = r["cpu_interval_95"]
        lines.append(f"ratio xstilts / {name}: {r['ratio']:.2f}x  (95% interval {low:.2f}-{high:.2f}; goal >="
                     f" {r['goal']}x: {'met' if r['met'] else 'NOT met'}); by CPU seconds {r['cpu_ratio']:.2f}x"
                     f" ({cpu_low:.2f}-{cpu_high:.2f})")
    if peak:
        lines.append(f"MFU = 6 x {m['nonembedding_parameters']:,} x real tokens/s / {peak / 1e12:,.0f} TFLOP/s"
                     f" (dense bf16 peak of the {out['peak_name']})")
    elif out["cuda"]:
        lines.append(f"MFU: no dense bf16 peak known for {out['device']!r}")
    lines.append(f"[{out['seconds']:.0f} s in all]")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default="tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (one run of each trainer)")
    parser.add_argument("--warmup-rounds", type=int, default=None,
                        help="untimed rounds of 10 steps first (default: 1 on a GPU, 0 on a CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (all trainers)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    import torch

    if args.model == "large" and not torch.cuda.is_available():
        sys.exit("--model large needs a GPU (XLM-R large does not train at a useful rate on a CPU); use --model tiny")
    warmup = args.warmup_rounds if args.warmup_rounds is not None else int(torch.cuda.is_available())
    out = benchmark(args.model, args.steps, args.batch_size, args.repeats, warmup, args.threads)
    print(report(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
