"""The embedded executor behind `xstilts run`: the plan's DAG on this machine, each run a
subprocess of `python -m xstilts.trainer RUN.json` (under torchrun when it asks for several
processes), at most N at once, dependencies first. Never a shell. On a machine without GPUs a
single-process run is instead forked from a server that has imported the training stack once
(forkserver.py), with the same process contract: for tiny runs the imports cost more than the
training.

Resumable by construction: a run whose result.json exists is skipped without starting a
process, so a rerun after Ctrl-C, a crash or a SIGKILL picks up where the last one stopped.
Each run's process holds a lock file in its run directory for as long as it lives, so a
rerun never starts a second process on a run whose earlier process is still exiting.
What may start, in which order, and what a failure blocks is decided by the controller's
pure reconcile() (operator/cluster/reconcile.py), for which this executor is a backend of
local processes; the time estimate is in eta.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO
from urllib.parse import unquote, urlsplit, urlunsplit

from xstilts.operator.cluster.reconcile import (
    BLOCKED,
    FAILED,
    Decision,
    Observed,
    ObservedJob,
    ResultSummary,
    reconcile,
)
from xstilts.operator.cluster.render import job_name
from xstilts.operator.experiment.plan import Plan, PlannedRun
from xstilts.operator.experiment.spec import BASELINE, ExperimentSpec
from xstilts.operator.local.display import Display, ProgressView, RunningRow, format_seconds
from xstilts.operator.local.eta import estimate_remaining_seconds, relative_cost
from xstilts.operator.local.forkserver import ForkedRun, die_with_parent, fork_run, start_server, wait_for_exit
from xstilts.trainer.config import ExitCode, Resources, RunLabels, TrackingConfig
from xstilts.trainer.launch import trainer_command
from xstilts.trainer.rundir import ResultProblem, RunDir, read_progress, read_result, write_atomic
from xstilts.trainer.tracking.buffer import redact_uri
from xstilts.trainer.tracking.mlflow_client import first_line, open_client
from xstilts.trainer.tracking.tracker import find_or_create_parent_run, local_tracking_uri

EXECUTOR_LOCK = ".xstilts-run.lock"  # one `xstilts run` per storage root
ATTEMPT_MARK = "=== xstilts run: start"  # first line of every attempt in train.log
FORKED = "forked from the preloaded trainer"  # the attempt mark's note on a forked run
LOG_TAIL_LINES = 25
# Exit status of a process killed by a signal, as a shell reports it.
SIGNAL_EXIT_BASE = 128


class LocalRunError(Exception):
    """The experiment cannot run on this machine as specified; the message says what to change."""


# --- where things go (pure) ------------------------------------------------------------------


def tracking_uri_for(spec: ExperimentSpec, flag: str | None, storage_root: str | Path) -> str:
    """--tracking-uri, else the spec's server, else the local store."""
    return flag or spec.mlflow.tracking_uri or local_tracking_uri(storage_root)


def with_tracking(p: Plan, tracking_uri: str, parent_run_id: str | None) -> Plan:
    """The plan with every run's tracking target set. Tracking is not part of a run's
    identity, so run ids (and their directories) stay the same."""
    def tracked(run: PlannedRun) -> PlannedRun:
        tracking = TrackingConfig(tracking_uri=tracking_uri, experiment_name=run.config.tracking.experiment_name,
                                  parent_run_id=parent_run_id)
        config = run.config.model_copy(update={"tracking": tracking})
        return PlannedRun(run.run_id, config, run.depends_on, run.train_tokens, run.gpu_hours)

    runs = tuple(tracked(r) for r in p.runs)
    return Plan(p.experiment, runs, {r.run_id: r for r in runs}, tuple(tracked(r) for r in p.reserve),
                tuple(tracked(r) for r in p.held))


def split_credentials(tracking_uri: str) -> tuple[str, dict[str, str]]:
    """An http(s) tracking URI without its user:password, and the MLflow environment variables
    that carry them instead: RUN.json files and logs never hold a password. Other schemes
    (a database URL) keep theirs: their drivers take credentials only in the URL."""
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https") or (parts.username is None and parts.password is None):
        return tracking_uri, {}
    env = {"MLFLOW_TRACKING_USERNAME": unquote(parts.username or "")}
    if parts.password is not None:
        env["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=netloc)), env


@dataclass(frozen=True)
class Placement:
    """How one run executes here: its processes, and how many GPUs it holds (0: CPU)."""

    processes: int
    gpus: int


def place(resources: Resources, machine_gpus: int) -> Placement:
    """Fit a run's resources to this machine. Without any GPU a run that asks for GPUs runs
    on the CPU in one process (the demo's and the tests' case); with too few it cannot run."""
    if resources.nodes > 1:
        raise LocalRunError(
            f"a run asks for {resources.nodes} nodes; `xstilts run` uses this machine only:"
            " set the model's resources.nodes to 1, or run the spec on a cluster with `xstilts submit`")
    if resources.gpus_per_node == 0:
        return Placement(resources.procs_per_node, 0)
    if machine_gpus == 0:
        return Placement(1, 0)
    if resources.gpus_per_node > machine_gpus:
        raise LocalRunError(
            f"a run asks for {resources.gpus_per_node} GPUs and this machine has {machine_gpus}:"
            f" lower the model's resources.gpus to at most {machine_gpus}, or use `xstilts submit`")
    return Placement(resources.gpus_per_node, resources.gpus_per_node)


def trainer_env(base: Mapping[str, str], placement: Placement, gpu_ids: Sequence[str],
                threads_per_process: int) -> dict[str, str]:
    env = dict(base)
    env["PYTHONUNBUFFERED"] = "1"  # so train.log follows the run as it goes
    if placement.gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise look for CUDA and fail
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
    # Runs side by side would each spawn a thread per core and fight over them.
    env.setdefault("OMP_NUM_THREADS", str(threads_per_process))
    return env


def threads_per_process(cpus: int, parallel: int, processes: int) -> int:
    return max(1, cpus // max(1, parallel * processes))


def run_title(labels: RunLabels | None, seed: int) -> str:
    if labels is None:
        return f"seed {seed}"
    arm = labels.intermediate if labels.target is None else f"{labels.intermediate}→{labels.target}"
    return f"{labels.model} {arm} seed {seed}"


# --- the machine ----------------------------------------------------------------------------


def detect_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists.
    No torch import: the executor stays light, the trainer finds the devices itself."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in (v.strip() for v in visible.split(",")) if g and g != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU "))]


# --- run directory files --------------------------------------------------------------------


def read_failure(run_dir: RunDir) -> str | None:
    try:
        data = json.loads(run_dir.failure.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(data.get("reason", "failed")) if isinstance(data, dict) else "failed"


def log_tail(log_path: Path, offset: int, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last lines of one attempt's log (the part after `offset`)."""
    try:
        with log_path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    known: dict[int, str] = {ExitCode.INVALID: "invalid config or data", ExitCode.INTERRUPTED: "interrupted"}
    name = known.get(returncode)
    return f"exit {returncode}" + (f" ({name})" if name else "")


def try_lock(path: Path) -> int | None:
    """An exclusive, non-blocking flock on `path`; the open fd, or None if someone holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def executor_lock(storage_root: Path) -> Iterator[None]:
    """One `xstilts run` per storage root: two would train the same runs twice."""
    storage_root.mkdir(parents=True, exist_ok=True)
    path = storage_root / EXECUTOR_LOCK
    fd = try_lock(path)
    if fd is None:
        holder = path.read_text(encoding="utf-8").strip() or "?"
        raise LocalRunError(
            f"another `xstilts run` (pid {holder}) is executing runs in {storage_root}; wait for it to"
            " finish or stop it (Ctrl-C) first")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


# --- the executor ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalOptions:
    parallel: int = 1
    retry_failed: bool = False
    poll_seconds: float = 0.5
    # On a machine without GPUs, fork single-process runs from a process that has imported the
    # training stack once (forkserver.py) instead of starting a fresh interpreter for each.
    preload_trainer: bool = True
    # How long stopped runs get to checkpoint and exit before they are killed.
    stop_grace_seconds: float = 300.0


@dataclass
class _Process:
    run: PlannedRun
    popen: subprocess.Popen[bytes] | ForkedRun
    log: IO[bytes]
    log_offset: int
    lock_fd: int
    gpu_ids: list[str]
    started: float  # monotonic
    started_at: float  # epoch seconds, to tell this attempt's progress.json from an older one


@dataclass
class FailedRun:
    run_id: str
    title: str
    reason: str
    log_path: Path
    log_tail: list[str] = field(default_factory=list)
    earlier: bool = False  # failed in an earlier invocation, not retried


@dataclass
class Outcome:
    """What `xstilts run` did: counts by state, failures with their log tails, blocked runs,
    and the signal that stopped it, if any."""

    counts: dict[str, int]  # reconcile's status counts
    earlier: int  # succeeded runs whose result existed before this invocation
    failed: list[FailedRun]
    blocked: list[tuple[str, str, str]]  # run id, title, reason
    elapsed_seconds: float
    stopped_by: int | None = None  # signal number

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked and self.stopped_by is None


def local_observed(experiment: str, running: Iterable[str], held: Iterable[str],
                   results: Mapping[str, ResultSummary], failures: Mapping[str, str]) -> Observed:
    """What the local executor sees, in reconcile()'s terms (docs/decisions/
    one-orchestration-engine.md): a live process is a running Job; a run created by a
    decision but not started yet (its GPUs are taken, or an earlier process of it still holds
    its lock) is a pending Job; a finished run is its result; a failure (a failure file of an
    earlier invocation, or a process that failed in this one) is remembered as the cluster
    remembers it, through the previous status."""
    jobs = [ObservedJob(job_name(experiment, rid), rid, "running") for rid in running]
    jobs += [ObservedJob(job_name(experiment, rid), rid, "pending") for rid in held]
    return Observed(jobs=jobs, results=results,
                    previous_status={"runs": dict.fromkeys(failures, FAILED), "failures": dict(failures)})


def blocked_reasons(p: Plan, states: Mapping[str, str]) -> dict[str, str]:
    """Why each blocked run is blocked: the first run it needs that failed or is blocked."""
    reasons = {}
    for run in p.runs:
        if states.get(run.run_id) == BLOCKED:
            need = next(d for d in run.depends_on if states.get(d) in (FAILED, BLOCKED))
            reasons[run.run_id] = f"needs run {need}, which {'failed' if states[need] == FAILED else 'is blocked'}"
    return reasons


def load_result(run: PlannedRun) -> ResultSummary | None:
    """The run's result as reconcile reads it, or None while result.json does not exist. A
    result.json that cannot be read still marks the run done (it is the trainer's last
    write, as before), with no scores."""
    run_dir = RunDir.of(run.config)
    if not run_dir.has_result():
        return None
    try:
        return ResultSummary.from_result(read_result(run_dir.result, run.run_id))
    except ResultProblem:
        return ResultSummary(run.run_id)


class LocalExecutor:
    """The local backend of reconcile(): each poll it turns processes and run directories into
    an `Observed`, asks reconcile() what to do, and carries out its CreateRun (start a process)
    and DeleteJob (stop one) actions. Dependencies, failures, blocking, the start order and
    --parallel (reconcile's maxParallel) are reconcile's rules, as on a cluster."""

    def __init__(self, spec: ExperimentSpec, p: Plan, options: LocalOptions, display: Display,
                 machine_gpus: Sequence[str] = (), cpus: int | None = None,
                 extra_env: Mapping[str, str] | None = None):
        # --parallel is this backend's maxParallel.
        self.spec = spec.model_copy(update={"cluster": spec.cluster.model_copy(
            update={"max_parallel": options.parallel})})
        self.plan = p
        self.options = options
        self.extra_env = dict(extra_env or {})  # e.g. MLflow credentials, kept out of RUN.json
        self.display = display
        self.free_gpus = list(machine_gpus)
        self.machine_gpus = len(machine_gpus)
        self.placements = {r.run_id: place(r.config.resources, len(machine_gpus)) for r in (*p.runs, *p.later)}
        self.cpus = cpus or os.cpu_count() or 1
        self.costs = {r.run_id: relative_cost(r) for r in (*p.runs, *p.later)}
        self.processes: dict[str, _Process] = {}
        self.held: dict[str, None] = {}  # created by a decision, not started yet (ordered)
        self.results: dict[str, ResultSummary] = {}
        self.failures: dict[str, str] = {}  # run id → reason, as reconcile's previous status keeps them
        self.observed: list[tuple[float, float]] = []  # (cost, seconds) of finished runs
        self.failed: dict[str, FailedRun] = {}
        self.signals: list[int] = []  # received, not yet acted on
        self.stop_signal: int | None = None
        self.stop_deadline: float | None = None
        self.waiting_for_lock: set[str] = set()
        self.fork = options.preload_trainer and not machine_gpus
        self._observe_run_dirs()
        self.earlier = frozenset(self.results)
        self.decision = self._decide()
        self.blocked = set(blocked_reasons(self.plan, self.decision.status["runs"]))

    def _run_dir(self, run_id: str) -> RunDir:
        return RunDir.of(self.plan.by_id[run_id].config)

    def _observe_run_dirs(self) -> None:
        """Results and failure files left by earlier invocations (of the replication reserve
        too: the seeds an earlier invocation added are added again at once)."""
        for run in (*self.plan.runs, *self.plan.later):
            run_dir = RunDir.of(run.config)
            summary = load_result(run)
            if summary is not None:
                self.results[run.run_id] = summary
                if summary.wall_seconds:
                    self.observed.append((self.costs[run.run_id], summary.wall_seconds))
            elif not self.options.retry_failed and (reason := read_failure(run_dir)) is not None:
                self.failures[run.run_id] = reason
                self.failed[run.run_id] = FailedRun(
                    run.run_id, run_title(run.config.labels, run.config.seed), reason, run_dir.train_log,
                    earlier=True)

    def _decide(self) -> Decision:
        observed = local_observed(self.spec.name, self.processes, self.held, self.results, self.failures)
        decision = reconcile(self.spec, self.plan, observed, datetime.now(UTC), render=False)
        if decision.plan is not None and len(decision.plan.runs) > len(self.plan.runs):
            self._adopt(decision.plan)
        return decision

    def _adopt(self, extended: Plan) -> None:
        """Take on the runs reconcile added: seeds replication added for cells whose interval is
        still wide, and the target runs of a phase-2 search's selected candidates."""
        known = self.plan.by_id
        added = [r for r in extended.runs if r.run_id not in known]
        for run in added:
            self.placements[run.run_id] = place(run.config.resources, self.machine_gpus)
            self.costs[run.run_id] = relative_cost(run)
            summary = load_result(run)  # done by an earlier invocation that had added it too
            if summary is not None:
                self.results[run.run_id] = summary
        held = {r.run_id for r in self.plan.held}
        self.plan = extended
        write_run_configs(Plan(extended.experiment, tuple(added), {r.run_id: r for r in added}))
        seeds = sorted({r.config.seed for r in added})
        if all(r.run_id in held for r in added):
            self.display.event(f"learning-rate search: {len(added)} target runs added from the phase-2 runs"
                               " selected on English dev")
        else:
            units = ", ".join(sorted({f"{r.labels.model}/{r.labels.intermediate}" for r in added
                                      if r.labels.intermediate != BASELINE}))
            self.display.event(f"replication: {len(added)} runs added (seeds {', '.join(map(str, seeds))}) for"
                               f" {units}: gain interval still wider than the target")

    # --- the loop ---------------------------------------------------------------------------

    def execute(self) -> Outcome:
        started = time.monotonic()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._announce()
            while True:
                self._reap()
                self._handle_signals()
                self.decision = self._decide()
                if self.stop_signal is not None:
                    if not self.processes:
                        break
                    self._escalate_stop()
                else:
                    if self._apply(self.decision):
                        self.decision = self._decide()
                    if not self.processes and not self.held and not self.decision.creates:
                        break
                self._announce_blocked()
                self.display.update(self._view(started))
                wait_for_exit([p.popen for p in self.processes.values()], self.options.poll_seconds)
            self._announce_blocked()
            self.display.update(self._view(started))
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self._kill_all(signal.SIGKILL)  # only reached with children left on an exception
        return self._outcome(time.monotonic() - started)

    def _announce(self) -> None:
        counts = self.decision.status["counts"]
        self.display.event(
            f"{self.plan.experiment}: {len(self.plan.runs)} runs, {len(self.earlier)} already done,"
            f" {counts['pending']} to run, at most {self.options.parallel} at once")
        for failure in self.failed.values():
            self.display.event(f"not retried: {failure.run_id} {failure.title} failed earlier ({failure.reason})",
                               style="red")

    def _announce_blocked(self) -> None:
        for run_id, reason in blocked_reasons(self.plan, self.decision.status["runs"]).items():
            if run_id not in self.blocked:
                self.blocked.add(run_id)
                config = self.plan.by_id[run_id].config
                self.display.event(f"blocked {run_id} {run_title(config.labels, config.seed)}: {reason}", style="red")

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only note it: the loop acts within a poll interval, outside the handler, so that the
        # display is never re-entered halfway through drawing.
        self.signals.append(signum)

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if self.stop_signal is None:
                self.stop_signal = signum
                self.stop_deadline = time.monotonic() + self.options.stop_grace_seconds
                self.held.clear()  # created, never started: nothing to stop
                self.display.event(
                    f"stopping: asked {len(self.processes)} running run(s) to checkpoint and exit"
                    " (Ctrl-C again to kill them now); rerun the same command to resume", style="yellow")
                self._kill_all(signal.SIGTERM)
            else:
                self.display.event("killing the running runs", style="red")
                self._kill_all(signal.SIGKILL)

    def _escalate_stop(self) -> None:
        if self.stop_deadline is not None and time.monotonic() > self.stop_deadline:
            self.display.event(f"runs did not exit within {self.options.stop_grace_seconds:g} s: killing them",
                               style="red")
            self._kill_all(signal.SIGKILL)
            self.stop_deadline = None

    def _kill_all(self, sig: signal.Signals) -> None:
        for proc in self.processes.values():
            _signal_process(proc, sig)

    def _apply(self, decision: Decision) -> bool:
        """Carry out the decision: DeleteJob stops the run's process (it checkpoints and
        exits), CreateRun holds the run until its GPUs are free, then starts it. True when
        something was started, finished or failed (the next decision differs)."""
        for delete in decision.deletes:
            for run_id, proc in self.processes.items():
                if job_name(self.spec.name, run_id) == delete.name:
                    self.display.event(f"stopping {run_id}: {delete.reason}", style="yellow")
                    _signal_process(proc, signal.SIGTERM)
        for create in decision.creates:
            self.held[create.run_id] = None
        changed = False
        for run_id in list(self.held):
            if len(self.processes) >= self.options.parallel:
                break
            if self.placements[run_id].gpus > len(self.free_gpus):
                continue  # a run needing fewer GPUs may still fit
            changed |= self._start(run_id)
        return changed

    def _start(self, run_id: str) -> bool:
        """Start a held run's process; False while an earlier process of it holds its lock."""
        run = self.plan.by_id[run_id]
        run_dir = self._run_dir(run_id)
        run_dir.path.mkdir(parents=True, exist_ok=True)
        lock_fd = try_lock(run_dir.lock)
        if lock_fd is None:
            # An earlier process of this run (e.g. orphaned by a killed executor) is still
            # checkpointing; start once it has exited, or take its result if it finishes.
            if run_id not in self.waiting_for_lock:
                self.waiting_for_lock.add(run_id)
                self.display.event(f"waiting: an earlier process of {run_id} is still exiting", style="yellow")
            return self._take_result(run_id)
        self.waiting_for_lock.discard(run_id)
        if self._take_result(run_id):  # finished by that earlier process
            os.close(lock_fd)
            return True
        del self.held[run_id]
        placement = self.placements[run_id]
        gpu_ids, self.free_gpus = self.free_gpus[:placement.gpus], self.free_gpus[placement.gpus:]
        config_path = run_dir.run_config
        write_atomic(config_path, run.config.to_json())
        with contextlib.suppress(FileNotFoundError):
            run_dir.failure.unlink()  # a retried failure starts clean
        argv = trainer_command(str(config_path), placement.processes, python=sys.executable)
        env = trainer_env(os.environ | self.extra_env, placement, gpu_ids,
                          threads_per_process(self.cpus, self.options.parallel, placement.processes))
        log = run_dir.train_log.open("ab")
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        how = f" ({FORKED})" if self._forks(run_id) else ""
        log.write(f"{ATTEMPT_MARK} {run_id} at {stamp}: {' '.join(argv)}{how}\n".encode())
        log.flush()
        offset = log.tell()  # this attempt's output starts here
        try:
            popen = self._launch(run_id, argv, config_path, log, lock_fd, env)
        except (OSError, subprocess.SubprocessError) as e:
            log.close()
            os.close(lock_fd)
            self.free_gpus.extend(gpu_ids)
            self._fail(run_id, f"could not start the trainer: {e}", [], run_dir.train_log)
            return True
        self.processes[run_id] = _Process(run, popen, log, offset, lock_fd, gpu_ids, time.monotonic(), time.time())
        self.display.event(f"start  {run_id} {run_title(run.config.labels, run.config.seed)}")
        return True

    def _take_result(self, run_id: str) -> bool:
        """A held run whose result.json appeared (an earlier process finished it) is done."""
        summary = load_result(self.plan.by_id[run_id])
        if summary is None:
            return False
        self.results[run_id] = summary
        self.held.pop(run_id, None)
        self.waiting_for_lock.discard(run_id)
        return True

    def _launch(self, run_id: str, argv: list[str], config_path: Path, log: IO[bytes], lock_fd: int,
                env: dict[str, str]) -> subprocess.Popen[bytes] | ForkedRun:
        """Fork the run from the preloaded trainer when it may be, else start `argv`."""
        if self._forks(run_id):
            try:
                start_server(env)
                threads = int(env["OMP_NUM_THREADS"].split(",")[0])
                return fork_run(config_path, log.fileno(), lock_fd, env, threads, run_id)
            except Exception as e:  # the server could not start or fork: interpreters it is
                self.fork = False
                why = f"cannot fork runs from a preloaded trainer ({type(e).__name__}: {e})"
                log.write(f"{why}; starting a new interpreter\n".encode())
                log.flush()
                self.display.event(f"{why}; starting each run in a new interpreter", style="yellow")
        parent = os.getpid()
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, pass_fds=(lock_fd,), preexec_fn=lambda: die_with_parent(parent),
        )

    def _forks(self, run_id: str) -> bool:
        placement = self.placements[run_id]
        return self.fork and placement.processes == 1 and placement.gpus == 0

    def _reap(self) -> None:
        for run_id, proc in list(self.processes.items()):
            code = proc.popen.poll()
            if code is None:
                continue
            del self.processes[run_id]
            proc.log.close()
            os.close(proc.lock_fd)
            self.free_gpus.extend(proc.gpu_ids)
            seconds = time.monotonic() - proc.started
            title = run_title(proc.run.config.labels, proc.run.config.seed)
            log_path = self._run_dir(run_id).train_log
            summary = load_result(proc.run)
            if code == ExitCode.OK and summary is not None:
                self.results[run_id] = summary
                self.observed.append((self.costs[run_id], seconds))
                self.display.event(f"done   {run_id} {title} in {format_seconds(seconds)}", style="green")
            elif self.stop_signal is not None and (code == ExitCode.INTERRUPTED or code < 0):
                # No process, no result: reconcile starts it again in the next invocation.
                self.display.event(f"paused {run_id} {title} ({exit_reason(code)}); a rerun resumes it",
                                   style="yellow")
            else:
                reason = exit_reason(code) if code != ExitCode.OK else "exited 0 without writing result.json"
                self._fail(run_id, reason, log_tail(log_path, proc.log_offset), log_path)

    def _fail(self, run_id: str, reason: str, tail: list[str], log_path: Path) -> None:
        run = self.plan.by_id[run_id]
        title = run_title(run.config.labels, run.config.seed)
        self.failures[run_id] = reason
        self.failed[run_id] = FailedRun(run_id, title, reason, log_path, tail)
        # An interruption the executor did not ask for (an OOM kill, a reboot) is retried by
        # the next invocation; anything else is final until --retry-failed.
        interrupted = reason.startswith("killed by") or reason.startswith(f"exit {int(ExitCode.INTERRUPTED)}")
        if not interrupted:
            write_atomic(self._run_dir(run_id).failure, json.dumps(
                {"run_id": run_id, "reason": reason, "at": datetime.now(UTC).isoformat(timespec="seconds")}))
        self.display.failure(run_id, title, reason, tail, log_path)

    # --- what the display shows -------------------------------------------------------------

    def _view(self, started: float) -> ProgressView:
        now = time.monotonic()
        rows, elapsed, etas = [], {}, {}
        for run_id, proc in self.processes.items():
            progress = read_progress(self._run_dir(run_id).progress, since=proc.started_at - 1.0)
            elapsed[run_id] = now - proc.started
            eta = progress.get("eta_s") if progress else None
            etas[run_id] = float(eta) if isinstance(eta, int | float) else None
            rows.append(RunningRow(run_id, run_title(proc.run.config.labels, proc.run.config.seed),
                                   progress, elapsed[run_id]))
        status = self.decision.status
        remaining = estimate_remaining_seconds(self.costs, status["runs"], self.observed, elapsed, etas,
                                               self.options.parallel)
        note = None
        if self.stop_signal is not None:
            note = f"stopping: waiting for {len(self.processes)} run(s) to checkpoint and exit"
        return ProgressView(self.plan.experiment, dict(status["counts"]), len(self.earlier), rows, now - started,
                            remaining, note)

    def _outcome(self, elapsed: float) -> Outcome:
        reasons = blocked_reasons(self.plan, self.decision.status["runs"])
        blocked = [(r, run_title(self.plan.by_id[r].config.labels, self.plan.by_id[r].config.seed), why)
                   for r, why in reasons.items()]
        return Outcome(dict(self.decision.status["counts"]), len(self.earlier), list(self.failed.values()),
                       blocked, elapsed, self.stop_signal)


def _signal_process(proc: _Process, sig: signal.Signals) -> None:
    # The trainer leads its own process group, which holds torchrun's workers too. A run
    # forked a moment ago may not lead its group yet: then the signal goes to it alone.
    try:
        os.killpg(proc.popen.pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.popen.pid, sig)
    except PermissionError:
        pass


def write_run_configs(p: Plan) -> None:
    """Every run's RUN.json, written up front so that a run can be inspected (or started by
    hand with `python -m xstilts.trainer`) before the executor reaches it."""
    for run in p.runs:
        write_atomic(RunDir.of(run.config).run_config, run.config.to_json())


def parent_run(tracking_uri: str, experiment_name: str, experiment: str, storage_root: Path,
               warn: Callable[[str], None]) -> str | None:
    """The experiment's MLflow parent run (found, or created once). If MLflow cannot be
    reached the runs still train: the trainer buffers its records for `xstilts sync`, and finds
    or creates the parent itself once MLflow is back."""
    try:
        return find_or_create_parent_run(tracking_uri, experiment_name, experiment, storage_root=storage_root)
    except Exception as e:  # any MLflow or network failure: training goes on
        warn(f"MLflow at {redact_uri(tracking_uri)} is not usable ({type(e).__name__}:"
             f" {first_line(e, tracking_uri)}); going on without the experiment's parent run")
        return None


def run_experiment(spec: ExperimentSpec, p: Plan, storage_root: Path, tracking_uri: str,
                   options: LocalOptions, display: Display) -> Outcome:
    """`xstilts run`: hold the storage root, link MLflow, write every RUN.json, execute."""
    machine_gpus = detect_gpus()
    for run in (*p.runs, *p.later):  # refuse what cannot run here before touching anything
        place(run.config.resources, len(machine_gpus))
    with executor_lock(storage_root), display:
        if not machine_gpus and any(r.config.resources.gpus_per_node for r in p.runs):
            display.event("this machine has no GPU: runs that ask for GPUs run on the CPU, one process each",
                          style="yellow")
        public_uri, credentials = split_credentials(tracking_uri)
        if options.preload_trainer and not machine_gpus:
            preload_trainer(p, options, credentials)
        experiment_name = p.runs[0].config.tracking.experiment_name if p.runs else spec.name
        parent = parent_run(tracking_uri, experiment_name, spec.name, storage_root,
                            lambda text: display.event(text, style="yellow"))
        p = with_tracking(p, public_uri, parent)
        write_run_configs(p)
        executor = LocalExecutor(spec, p, options, display, machine_gpus, extra_env=credentials)
        if parent is not None:
            set_parent_status(tracking_uri, parent, "RUNNING")
        outcome = executor.execute()
        if parent is not None:
            status = "KILLED" if outcome.stopped_by is not None else "FINISHED" if outcome.ok else "FAILED"
            set_parent_status(tracking_uri, parent, status)
        return outcome


def preload_trainer(p: Plan, options: LocalOptions, extra_env: Mapping[str, str]) -> None:
    """Start the fork server (on a machine without GPUs) if some single-process run is still to
    train, so that it loads the training stack while MLflow sets up its store. If it cannot
    start, the executor finds out at the first run and starts interpreters instead."""
    todo = [r for r in p.runs if not RunDir.of(r.config).has_result()]
    if not any(place(r.config.resources, 0).processes == 1 for r in todo):
        return
    cpus = os.cpu_count() or 1
    env = trainer_env(os.environ | dict(extra_env), Placement(1, 0), [], threads_per_process(cpus, options.parallel, 1))
    with contextlib.suppress(Exception):
        start_server(env)


def set_parent_status(tracking_uri: str, parent_run_id: str, status: str) -> None:
    """The parent run shows the experiment's state in the MLflow UI: RUNNING while `xstilts run`
    works, then FINISHED, FAILED (some run failed) or KILLED (stopped). Cosmetic: MLflow
    being unreachable here changes nothing else."""
    with contextlib.suppress(Exception):
        client = open_client(tracking_uri)
        if status == "RUNNING":
            client.update_run(parent_run_id, status=status)
        else:
            client.set_terminated(parent_run_id, status=status)
