"""Where the training steps of HF best and xstilts spend their CPU, on the same rows: the
benchmark's tiny model, data and trainers (train_throughput.py), one torch thread.

For each run: real and padded tokens, wall and process CPU seconds of the training steps (from
the start of `train()` to the end of the last optimizer step; the xstilts run evaluates and
saves only after it), the CPU seconds of threads other than the training thread (the xstilts
run's MLflow delivery thread), the process's system CPU seconds and minor page faults (the
kernel's share: mapping fresh pages for freed and reallocated tensors), and CPU microseconds
per real token. With `--profile DIR`, cProfile over the same span, timed by the training
thread's CPU clock (so that the load of other processes on a shared machine does not land on
whatever function was running), is written to DIR/<trainer>-<n>.pstats and its top entries
printed.

`xstilts-untracked` is the xstilts run with MLflow tracking off (as on a machine without
mlflow): the difference to `xstilts` is what tracking costs the training steps.

    python benchmarks/train_profile.py [--steps 200] [--order hf-best,xstilts,xstilts-untracked] [--rounds 3]
        [--profile DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import ARCHITECTURES, build_encoder, write_mnli
from train_throughput import Measurement, run_hf, run_xstilts, train_rows


class Window:
    """The training steps' span, on three clocks, and the profiler running within it."""

    def __init__(self) -> None:
        self.profiler: cProfile.Profile | None = None
        self.began: tuple[float, ...] = (0.0,) * 5
        self.ended: tuple[float, ...] = (0.0,) * 5

    @staticmethod
    def clocks() -> tuple[float, float, float, float, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.monotonic(), time.process_time(), time.thread_time(), usage.ru_stime, float(usage.ru_minflt)

    def begin(self) -> None:
        self.began = self.clocks()
        if self.profiler:
            self.profiler.enable()

    def step_end(self, state: Any) -> None:
        self.ended = self.clocks()
        if self.profiler and state.global_step >= state.max_steps:
            self.profiler.disable()


@contextlib.contextmanager
def hooked(window: Window) -> Iterator[None]:
    """Both trainers' step timers report to `window` (the benchmark's StepTimer for HF, the
    run's RunCallback for xstilts)."""
    import train_throughput
    from xstilts.trainer import loop

    make_timer = train_throughput.step_timer
    begin, step_end = loop.RunCallback.on_train_begin, loop.RunCallback.on_step_end

    def timer() -> Any:
        t = make_timer()
        cls = type(t)
        own_begin, own_end = cls.on_train_begin, cls.on_step_end
        def timer_begin(self: Any, args: Any, state: Any, control: Any, **kw: Any) -> None:
            own_begin(self, args, state, control, **kw)
            window.begin()

        def timer_step_end(self: Any, args: Any, state: Any, control: Any, **kw: Any) -> None:
            own_end(self, args, state, control, **kw)
            window.step_end(state)

        cls.on_train_begin, cls.on_step_end = timer_begin, timer_step_end
        return t

    def run_begin(self: Any, args: Any, state: Any, control: Any, **kw: Any) -> None:
        begin(self, args, state, control, **kw)
        window.begin()

    def run_step_end(self: Any, args: Any, state: Any, control: Any, **kw: Any) -> None:
        step_end(self, args, state, control, **kw)
        window.step_end(state)

    train_throughput.step_timer = timer
    loop.RunCallback.on_train_begin, loop.RunCallback.on_step_end = run_begin, run_step_end  # type: ignore[method-assign]
    try:
        yield
    finally:
        train_throughput.step_timer = make_timer
        loop.RunCallback.on_train_begin, loop.RunCallback.on_step_end = begin, step_end  # type: ignore[method-assign]


@contextlib.contextmanager
def untracked() -> Iterator[None]:
    from xstilts.trainer import train

    tracker = train._tracker
    train._tracker = lambda config, enabled: train._NoTracker()  # type: ignore[assignment]
    try:
        yield
    finally:
        train._tracker = tracker  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--order", default="hf-best,xstilts,xstilts-untracked")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--profile", type=Path, help="write cProfile statistics of each run here")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xstilts-profile-") as tmp:
        root = Path(tmp)
        model = build_encoder(root / "model", ARCHITECTURES["tiny"])
        data = root / "mnli"
        write_mnli(data, train=train_rows(args.steps, args.batch_size), dev=256)
        trainers: dict[str, Callable[[str], Measurement]] = {
            "hf-best": lambda tag: run_hf(model, data, root / tag, args.steps, args.batch_size, True, False),
            "xstilts": lambda tag: run_xstilts(model, data, root / tag, args.steps, args.batch_size),
        }
        n = 0
        for _ in range(args.rounds):
            for name in args.order.split(","):
                n += 1
                window = Window()
                window.profiler = cProfile.Profile(time.thread_time) if args.profile else None
                with hooked(window), untracked() if name == "xstilts-untracked" else contextlib.nullcontext():
                    m = trainers[name.removesuffix("-untracked")](f"{name}-{n}")
                wall, cpu, thread, system, faults = (e - b for e, b in zip(window.ended, window.began, strict=True))
                print(f"{name:18} real {m.real_tokens:,} padded {m.padded_tokens:,} ({m.padding_fraction:.2%});"
                      f" wall {wall:.2f} s, process CPU {cpu:.2f} s, other threads {max(cpu - thread, 0.0):.2f} s,"
                      f" system {system:.2f} s, {faults:,.0f} page faults;"
                      f" {1e6 * cpu / m.real_tokens:.2f} CPU us per real token; load {os.getloadavg()[0]:.2f}",
                      flush=True)
                if window.profiler:
                    path = args.profile / f"{name}-{n}.pstats"
                    window.profiler.dump_stats(path)
                    pstats.Stats(str(path)).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
