"""How long the rest of a local experiment will take (pure). Which run may start, what a
failure blocks and what is done are reconcile()'s to say (operator/cluster/reconcile.py):
the estimate reads the run states of its decision."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from xstilts.operator.cluster.reconcile import COUNTED_AS
from xstilts.operator.experiment.plan import PlannedRun


def relative_cost(run: PlannedRun) -> float:
    """What a run costs relative to the others: training tokens × model parameters (6·N FLOPs
    per token). A model of unknown size counts as one parameter per token, so every run of it
    still weighs by its tokens."""
    return float(max(run.train_tokens, 1) * (run.labels.model_parameters or 1))


def estimate_remaining_seconds(
    costs: Mapping[str, float],
    states: Mapping[str, str],
    observed: Iterable[tuple[float, float]],
    running_elapsed: Mapping[str, float],
    running_eta: Mapping[str, float | None],
    parallel: int,
) -> float | None:
    """Seconds until the runs still to do are done, or None before anything has been timed.

    `states`: reconcile's run states (decision.status["runs"]); the runs it counts as running
    are under way, those it counts as pending are still to start (failed and blocked ones
    never will). `observed` pairs (cost, seconds) of finished runs give seconds per unit of
    cost; a running run contributes what it reports left (progress.json's eta_s) or its
    expected length minus what it has run; the work is shared by `parallel` slots (an
    estimate: the DAG may leave slots idle)."""
    pairs = list(observed)
    total_cost = sum(c for c, _ in pairs)
    rate = sum(s for _, s in pairs) / total_cost if total_cost > 0 else None
    running = [r for r, s in states.items() if COUNTED_AS[s] == "running"]
    pending = [r for r, s in states.items() if COUNTED_AS[s] == "pending"]
    work = 0.0
    for run_id in running:
        eta = running_eta.get(run_id)
        if eta is not None:
            work += max(eta, 0.0)
        elif rate is not None:
            work += max(costs[run_id] * rate - running_elapsed.get(run_id, 0.0), 0.0)
        else:
            return None
    if pending:
        if rate is None:
            return None
        work += sum(costs[r] for r in pending) * rate
    slots = max(1, min(parallel, len(pending) + len(running)))
    return work / slots
