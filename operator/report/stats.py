"""Means and 95% confidence intervals over seeds, from the Student t distribution (scipy.stats):
the few seeds of a scaling study make the t interval, not the normal one, the honest choice."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from scipy.stats import t as student_t

CONFIDENCE = 0.95


class Method(StrEnum):
    PAIRED = "paired t"  # differences of seed-paired runs (same seed with and without)
    WELCH = "Welch t"  # two independent samples: no seed has both runs
    SINGLE = "single"  # one value: a mean without an interval


@dataclass(frozen=True)
class Interval:
    """A mean and its 95% confidence interval (None when one value cannot give one)."""

    mean: float
    half_width: float | None
    n: int  # paired differences, or the smaller sample for Welch
    method: Method

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width


def t_cdf(t: float, df: float) -> float:
    return float(student_t.cdf(t, df))


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0 (got p={p}, df={df})")
    return float(student_t.ppf(p, df))


def mean_interval(values: Sequence[float], method: Method = Method.PAIRED) -> Interval:
    """Mean and t interval of one sample (n-1 degrees of freedom); no interval for n = 1."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, None, 1, Method.SINGLE)
    sem = statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, t_quantile(0.5 + CONFIDENCE / 2, n - 1) * sem, n, method)


def welch_interval(treated: Sequence[float], baseline: Sequence[float]) -> Interval:
    """Difference of two independent means with the Welch–Satterthwaite degrees of freedom."""
    na, nb = len(treated), len(baseline)
    if na < 2 or nb < 2:
        raise ValueError("welch_interval needs at least two values on each side")
    va, vb = statistics.variance(treated) / na, statistics.variance(baseline) / nb
    mean = statistics.fmean(treated) - statistics.fmean(baseline)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Interval(mean, 0.0, min(na, nb), Method.WELCH)
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    return Interval(mean, t_quantile(0.5 + CONFIDENCE / 2, df) * se, min(na, nb), Method.WELCH)


def gain_interval(treated: Mapping[int, float], baseline: Mapping[int, float]) -> Interval | None:
    """treated − baseline over seeds. Seeds that have both give paired differences (the seed
    fixes data order and head initialisation, so pairing removes that variance); with fewer
    than two pairs, two independent samples of at least two give a Welch interval; otherwise
    the single difference of means, without an interval. None if either side is empty."""
    if not treated or not baseline:
        return None
    paired = sorted(set(treated) & set(baseline))
    if len(paired) >= 2:
        return mean_interval([treated[s] - baseline[s] for s in paired], Method.PAIRED)
    if len(treated) >= 2 and len(baseline) >= 2:
        return welch_interval(list(treated.values()), list(baseline.values()))
    if len(paired) == 1:
        s = paired[0]
        return Interval(treated[s] - baseline[s], None, 1, Method.SINGLE)
    mean = statistics.fmean(treated.values()) - statistics.fmean(baseline.values())
    return Interval(mean, None, 1, Method.SINGLE)
