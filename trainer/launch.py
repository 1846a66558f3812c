"""`python -m xstilts.trainer.launch [torchrun options] -m xstilts.trainer RUN.json`: torchrun,
with the trainer's exit codes passed on.

torchrun exits 1 whatever its workers exited with, and 1 again when a signal stopped it. The
Job's podFailurePolicy and the local executor act on the trainer's codes (ExitCode.INVALID:
never retried; ExitCode.INTERRUPTED: a retry resumes from the checkpoint), so this launcher
runs torchrun in-process and maps its outcome back onto them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

from xstilts.trainer.config import ExitCode

PROG = "python -m xstilts.trainer.launch"


def trainer_command(run_config: str, procs_per_node: int = 1, nodes: int = 1, *, python: str = "python",
                    rendezvous: Sequence[str] = (), shutdown_timeout: int | None = None) -> list[str]:
    """The argv that trains the run of `run_config` (a RUN.json path), for the local executor
    and for a pod alike: one process, `python -m xstilts.trainer RUN.json`; several, torchrun
    through this launcher (which passes the trainer's exit codes on), `--standalone` on one
    node (its own free rendezvous port, so local runs can overlap), else the `rendezvous`
    options. torchrun never restarts workers itself: a restart would hide a failure from
    whoever retries the run. `shutdown_timeout`: seconds torchrun gives its workers after
    SIGTERM before killing them (its default, 30 s, is too short for a large checkpoint)."""
    trainer = ["-m", "xstilts.trainer", run_config]
    if nodes == 1 and procs_per_node == 1:
        return [python, *trainer]
    command = [python, "-m", "xstilts.trainer.launch", f"--nproc_per_node={procs_per_node}", f"--nnodes={nodes}"]
    command += ["--standalone"] if nodes == 1 else list(rendezvous)
    command.append("--max_restarts=0")
    if shutdown_timeout is not None:
        command.append(f"--shutdown_timeout={shutdown_timeout}")
    return command + trainer


def exit_code_of(worker_codes: Iterable[int]) -> int:
    """The launcher's code for failed workers: INVALID if any rank found the run invalid (a
    retry cannot help), else INTERRUPTED if any rank was interrupted, else 1."""
    codes = set(worker_codes)
    if ExitCode.INVALID in codes:
        return int(ExitCode.INVALID)
    if ExitCode.INTERRUPTED in codes:
        return int(ExitCode.INTERRUPTED)
    return int(ExitCode.FAILED)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as e:
        # torchrun has passed the signal to its workers and waited --shutdown_timeout for them
        # to checkpoint: a retry resumes.
        print(f"{PROG}: stopped by {e.sigval.name}; a retry resumes from the last checkpoint", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except ChildFailedError as e:  # torchrun has already printed which rank failed and how
        return exit_code_of(failure.exitcode for failure in e.failures.values())
    return int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
