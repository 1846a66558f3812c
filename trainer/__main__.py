"""`python -m xstilts.trainer RUN.json` (or under `torchrun ... -m xstilts.trainer RUN.json`):
run one RunConfig.

Exit codes (config.ExitCode): OK; INVALID for a config or data that can never work (a
one-line reason on stderr, nothing written that looks like a result; never retried);
INTERRUPTED after SIGTERM/SIGINT (retried; the retry resumes from the checkpoint). Any other
failure is a crash with a traceback (exit 1), retried within the Job's backoff limit.

`--check` only validates: the config, the batch layout for the process count, the local data
files and the phase-2 checkpoint, without loading the training stack.

A run whose result.json already exists is not trained again.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError
from xstilts.trainer.batch_plan import InvalidRun
from xstilts.trainer.config import ExitCode, RunConfig, first_error
from xstilts.trainer.data import DataError
from xstilts.trainer.interrupt import Interruption, RunInterrupted

PROG = "xstilts.trainer"
# Read by datasets and tokenizers when they are imported: their progress bars would flood
# train.log, and tokenizers' threads fight the run's own.
QUIET_ENV = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


def load_config(path: Path) -> RunConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidRun(f"cannot read run config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InvalidRun(f"run config {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
                         ) from None
    try:
        return RunConfig.model_validate_json(text)
    except ValidationError as e:
        raise InvalidRun(f"{path}: {first_error(e)}") from None


def _configure_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description="Run one xstilts training run.")
    parser.add_argument("run_config", type=Path, help="RUN.json: a RunConfig")
    parser.add_argument("--check", action="store_true", help="validate only; exit 0 or the invalid code")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    _configure_logging(rank)
    interruption = Interruption()
    interruption.install()
    config = None
    try:
        config = load_config(args.run_config)
        from xstilts.trainer.train import precheck

        if args.check:
            precheck(config, int(os.environ.get("WORLD_SIZE", 1)))
            return ExitCode.OK
        from xstilts.trainer.rundir import ResultProblem, RunDir, read_result

        result_path = RunDir.of(config).result
        with contextlib.suppress(ResultProblem):  # none, or torn: train (and write it anew)
            read_result(result_path)
            if rank == 0:
                print(f"{PROG}: run {config.run_id} already has {result_path}; nothing to do", file=sys.stderr)
            return ExitCode.OK
        from xstilts.trainer.train import run

        run(config, interruption)
        return ExitCode.OK
    except (InvalidRun, DataError) as e:
        # Every rank says why, not only rank 0: the first rank to exit has torchrun stop the
        # others, maybe before rank 0 has printed a word.
        print(f"{PROG}: invalid run: {e}", file=sys.stderr)
        return ExitCode.INVALID
    except RunInterrupted as e:
        if rank == 0:
            which = f"run {config.run_id}" if config else "run"
            print(f"{PROG}: {which} {e}; a retry resumes from its last checkpoint", file=sys.stderr)
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
