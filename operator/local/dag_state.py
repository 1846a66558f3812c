"""The local executor's bookkeeping, pure: which run may start next, what a failure blocks,
and how long the rest will take. No processes, no files, no clock: `local.py` feeds it events.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from xstilts.operator.experiment.plan import Plan, PlannedRun


class State(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"  # finished in this invocation
    SKIPPED = "skipped"  # its result.json existed before this invocation
    FAILED = "failed"
    BLOCKED = "blocked"  # a run it depends on failed


FINISHED = (State.DONE, State.SKIPPED)


@dataclass
class Schedule:
    """The state of every run of a plan. Runs are offered in plan order (dependencies first),
    those that unblock the most other runs ahead of the rest, so that parallel slots fill."""

    order: tuple[str, ...]
    depends_on: Mapping[str, tuple[str, ...]]
    state: dict[str, State]
    reason: dict[str, str] = field(default_factory=dict)  # why a run failed or is blocked
    dependants: dict[str, list[str]] = field(init=False, repr=False)
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Computed once: the executor asks for ready runs every poll, over grids of thousands.
        self.index = {r: i for i, r in enumerate(self.order)}
        self.dependants = {r: [] for r in self.order}
        for r in self.order:
            for d in self.depends_on[r]:
                self.dependants[d].append(r)

    @classmethod
    def from_plan(cls, p: Plan, finished: Iterable[str] = (),
                  failed_before: Mapping[str, str] | None = None) -> Schedule:
        """`finished`: runs whose result exists; `failed_before`: runs not to retry, with why."""
        done = set(finished)
        schedule = cls(
            order=tuple(r.run_id for r in p.runs),
            depends_on={r.run_id: r.depends_on for r in p.runs},
            state={r.run_id: State.SKIPPED if r.run_id in done else State.PENDING for r in p.runs},
        )
        for run_id, why in (failed_before or {}).items():
            if schedule.state.get(run_id) is State.PENDING:
                schedule.fail(run_id, why)
        return schedule

    def ready(self) -> list[str]:
        """Pending runs whose dependencies have all finished, best first."""
        ready = [r for r in self.order if self.state[r] is State.PENDING
                 and all(self.state[d] in FINISHED for d in self.depends_on[r])]
        return sorted(ready, key=lambda r: (-len(self.dependants[r]), self.index[r]))

    def start(self, run_id: str) -> None:
        self._expect(run_id, State.PENDING)
        self.state[run_id] = State.RUNNING

    def finish(self, run_id: str) -> None:
        self._expect(run_id, State.RUNNING)
        self.state[run_id] = State.DONE

    def requeue(self, run_id: str) -> None:
        """An interrupted run goes back to pending: the next invocation resumes it."""
        self._expect(run_id, State.RUNNING)
        self.state[run_id] = State.PENDING

    def fail(self, run_id: str, reason: str) -> list[str]:
        """Mark a run failed and block everything downstream of it; returns the runs newly
        blocked, in plan order."""
        if self.state[run_id] not in (State.PENDING, State.RUNNING):
            raise ValueError(f"run {run_id} is {self.state[run_id]}, it cannot fail")
        self.state[run_id] = State.FAILED
        self.reason[run_id] = reason
        blocked: list[str] = []
        frontier = [run_id]
        while frontier:
            upstream = frontier.pop()
            for r in self.dependants[upstream]:
                if self.state[r] is State.PENDING:
                    self.state[r] = State.BLOCKED
                    self.reason[r] = f"needs run {upstream}, which " + (
                        "failed" if upstream == run_id else "is blocked")
                    blocked.append(r)
                    frontier.append(r)
        return sorted(blocked, key=self.index.__getitem__)

    def _expect(self, run_id: str, state: State) -> None:
        if self.state[run_id] is not state:
            raise ValueError(f"run {run_id} is {self.state[run_id]}, not {state}")

    def counts(self) -> Counter[State]:
        return Counter(self.state.values())

    def runs_in(self, *states: State) -> list[str]:
        return [r for r in self.order if self.state[r] in states]

    @property
    def finished(self) -> bool:
        """Nothing running and nothing that could still start."""
        return not self.runs_in(State.RUNNING) and not self.ready()


def relative_cost(run: PlannedRun) -> float:
    """What a run costs relative to the others: training tokens × model parameters (6·N FLOPs
    per token). A model of unknown size counts as one parameter per token, so every run of it
    still weighs by its tokens."""
    return float(max(run.train_tokens, 1) * (run.labels.model_parameters or 1))


def estimate_remaining_seconds(
    costs: Mapping[str, float],
    schedule: Schedule,
    observed: Iterable[tuple[float, float]],
    running_elapsed: Mapping[str, float],
    running_eta: Mapping[str, float | None],
    parallel: int,
) -> float | None:
    """Seconds until the runs still to do are done, or None before anything has been timed.

    `observed` pairs (cost, seconds) of finished runs give seconds per unit of cost; the running
    runs contribute what they report left (progress.json's eta_s) or their expected length
    minus what they have run; the work is shared by `parallel` slots (an estimate: the DAG may
    leave slots idle)."""
    pairs = list(observed)
    total_cost = sum(c for c, _ in pairs)
    rate = sum(s for _, s in pairs) / total_cost if total_cost > 0 else None
    work = 0.0
    for run_id in schedule.runs_in(State.RUNNING):
        eta = running_eta.get(run_id)
        if eta is not None:
            work += max(eta, 0.0)
        elif rate is not None:
            work += max(costs[run_id] * rate - running_elapsed.get(run_id, 0.0), 0.0)
        else:
            return None
    pending = schedule.runs_in(State.PENDING)
    if pending:
        if rate is None:
            return None
        work += sum(costs[r] for r in pending) * rate
    slots = max(1, min(parallel, len(pending) + len(schedule.runs_in(State.RUNNING))))
    return work / slots
