"""The learning-rate search's selection rule, one home for reconcile (which starts the target
runs of the selected phase-2 candidate) and the report (which uses the selected target runs).

A stage's `hyperparameters.<stage>.search` makes one run per value; the value selected is the
one whose runs score best on the English dev set, as a mean over the seeds, per model and arm
(and target). It is decided only once every candidate has a result for every seed, so that
results arriving later can never change it (reconcile acts on it; level-triggered, it must be
stable). On a tie the value listed first wins. A candidate whose run failed is passed over: the
selection is then made among the others, once each of them has every seed (a failed run would
otherwise hold its arm back for good); reconcile keeps a selection once runs start from it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from statistics import fmean

from xstilts.trainer.config import RunResult
from xstilts.trainer.tasks import TASKS, selection_metric


def english_dev(result: RunResult) -> float | None:
    """The run's English dev score, the number that selected its checkpoint (its task's
    primary metric; for a multi-task run the mean of its tasks')."""
    return result.metrics.get(f"dev.{selection_metric([TASKS[t] for t in result.config.tasks])}")


def select(dev: Mapping[float, Mapping[int, float]], candidates: Sequence[float],
           seeds: Iterable[int], failed: Collection[float] = ()) -> float | None:
    """The selected value among `candidates` given each one's English dev score per seed, or
    None while some candidate not in `failed` lacks a seed, or when every candidate failed."""
    seeds = list(seeds)
    remaining = [(i, c) for i, c in enumerate(candidates) if c not in failed]
    if not seeds or not remaining or any(seed not in dev.get(c, {}) for _, c in remaining for seed in seeds):
        return None
    means = [(fmean(dev[c][s] for s in seeds), -i, c) for i, c in remaining]
    return max(means)[2]


def dev_means(dev: Mapping[float, Mapping[int, float]], candidates: Sequence[float]) -> dict[float, float]:
    """Each candidate's mean English dev score over the seeds it has, for the report."""
    return {c: fmean(dev[c].values()) for c in candidates if dev.get(c)}
