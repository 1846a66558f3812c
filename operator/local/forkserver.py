"""CPU runs forked from a process that has already imported the training stack.

A tiny run spends most of its CPU seconds importing torch, transformers' Trainer, datasets and
MLflow's SQLite store, not training (the demo's runs: about two thirds). On a machine without
GPUs the executor therefore starts single-process runs from a multiprocessing fork server that
imports that stack once (preload.py); each run is a fork of it, ready in milliseconds.

A forked run keeps the contract of `python -m xstilts.trainer RUN.json` as a subprocess: its
own process and session (the executor signals its group), stdout and stderr to train.log, the
run lock held for as long as it lives, SIGTERM when its parent dies (the server exits when the
executor does, even by SIGKILL), and the trainer's exit code.

Not used with GPUs: CUDA must not be initialised before a fork, and for runs of hours the
import seconds do not matter. Runs under torchrun are spawned as before.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from multiprocessing import reduction
from pathlib import Path
from typing import Any

from xstilts.trainer.__main__ import QUIET_ENV
from xstilts.trainer.config import ExitCode

# The training stack, loaded once; and the executor's main module, which multiprocessing
# would otherwise import again in every fork.
PRELOAD = ("__main__", "xstilts.operator.local.preload")

_CONTEXT = multiprocessing.get_context("forkserver")


def die_with_parent(parent_pid: int) -> None:
    """In a run's process, first thing: get SIGTERM if its parent dies (even by SIGKILL), so
    the trainer checkpoints and exits instead of training on as an orphan."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(ExitCode.INTERRUPTED)


class _PassedFd:
    """A file descriptor of the executor's, duplicated into the forked run (sent to the server
    with SCM_RIGHTS while the process object is pickled)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return _received_fd, (reduction.DupFd(self.fd),)


def _received_fd(dup: Any) -> _PassedFd:
    return _PassedFd(dup.detach())


def _run_trainer(config_path: str, log: _PassedFd, lock: _PassedFd, env: dict[str, str], threads: int,
                 executor_pid: int) -> None:
    """The forked run: what Popen's start_new_session, stdout/stderr, pass_fds and env do for a
    spawned one, then the trainer's main."""
    parent = os.getppid()
    os.setsid()
    die_with_parent(parent)
    try:
        os.kill(executor_pid, 0)
    except ProcessLookupError:  # the executor died while the server forked
        os._exit(ExitCode.INTERRUPTED)
    _ = lock  # the run lock: this process's copy of the descriptor holds it until the process exits
    for target in (1, 2):
        os.dup2(log.fd, target)
    os.close(log.fd)
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    os.environ.clear()
    os.environ.update(env)
    import torch

    torch.set_num_threads(threads)  # OMP_NUM_THREADS was read when the server loaded torch
    from xstilts.trainer.__main__ import main

    sys.exit(main([config_path]))


class ForkedRun:
    """A forked run's process: the part of subprocess.Popen the executor uses."""

    def __init__(self, process: Any) -> None:
        self.process = process
        self.pid: int = process.pid

    def poll(self) -> int | None:
        """None while it runs, else its exit code (-N: killed by signal N), as Popen.poll."""
        code = self.process.exitcode
        return None if code is None else int(code)

    @property
    def sentinel(self) -> int:
        return int(self.process.sentinel)


def start_server(env: Mapping[str, str]) -> None:
    """Start the fork server (once per executor process) with `env` as its environment: the
    variables libraries read at import must be the runs' (QUIET_ENV: the trainer sets them
    only once they are imported). Returns at once; the first fork waits until the server has
    loaded PRELOAD."""
    _CONTEXT.set_forkserver_preload(list(PRELOAD))
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update({**QUIET_ENV, **env})
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def fork_run(config_path: Path, log_fd: int, lock_fd: int, env: Mapping[str, str], threads: int,
             name: str) -> ForkedRun:
    """Fork one run from the server (started with start_server)."""
    process = _CONTEXT.Process(target=_run_trainer, name=name, args=(
        str(config_path), _PassedFd(log_fd), _PassedFd(lock_fd), dict(env), threads, os.getpid()))
    process.start()
    return ForkedRun(process)


def wait_for_exit(runs: Sequence[Any], timeout: float) -> None:
    """Sleep up to `timeout` seconds, waking as soon as a forked run exits."""
    sentinels = [r.sentinel for r in runs if isinstance(r, ForkedRun)]
    if sentinels:
        multiprocessing.connection.wait(sentinels, timeout)
    else:
        time.sleep(timeout)
