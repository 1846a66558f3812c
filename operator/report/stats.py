"""Means and 95% confidence intervals over seeds, from the Student t distribution (scipy.stats):
the few seeds of a scaling study make the t interval, not the normal one, the honest choice."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from scipy.stats import norm
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

    @property
    def excludes_zero(self) -> bool:
        """Whether the 95% interval lies on one side of zero (never, without an interval)."""
        return self.half_width is not None and abs(self.mean) > self.half_width


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


# --- the trend of the gain with model size ------------------------------------------------------

BOOTSTRAP_REPLICATES = 4000
BOOTSTRAP_SEED = 20240611  # fixed: the same results give the same interval, run after run
BAND_POINTS = 25


class Verdict(StrEnum):
    GROWS = "gain grows with model size"
    SHRINKS = "gain shrinks with model size"
    NONE = "no detectable trend at this precision"


@dataclass(frozen=True)
class SeedSample:
    """One model's gain over seeds: seed-paired differences, or (when fewer than two seeds
    have both runs) the two sides as independent samples."""

    log10_parameters: float
    treated: tuple[float, ...]
    baseline: tuple[float, ...]
    paired: bool

    @property
    def gain(self) -> float:
        if self.paired:
            return statistics.fmean(self.treated)  # treated holds the differences
        return statistics.fmean(self.treated) - statistics.fmean(self.baseline)

    @property
    def seeds(self) -> int:
        return len(self.treated) if self.paired else min(len(self.treated), len(self.baseline))


def seed_sample(log10_parameters: float, treated: Mapping[int, float],
                baseline: Mapping[int, float]) -> SeedSample | None:
    """The gain's seed sample of one model, paired as gain_interval pairs it; None if a side is empty."""
    if not treated or not baseline:
        return None
    paired = sorted(set(treated) & set(baseline))
    if len(paired) >= 2 or (len(paired) == 1 and (len(treated) < 2 or len(baseline) < 2)):
        return SeedSample(log10_parameters, tuple(treated[s] - baseline[s] for s in paired), (), True)
    return SeedSample(log10_parameters, tuple(treated.values()), tuple(baseline.values()), False)


@dataclass(frozen=True)
class Trend:
    """Least-squares slope of the gain (points) against log10(parameters) over models, with a
    95% interval from the hierarchical bootstrap (trend_of)."""

    slope: float  # points per tenfold increase in parameters
    low: float
    high: float
    intercept: float  # gain at 1 parameter (log10 = 0); with slope, the fitted line
    models: int
    seeds: tuple[int, ...]  # seeds behind each model's gain, in order of size
    band: tuple[tuple[float, float, float], ...]  # (log10 parameters, low, high) of the fitted line

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0

    @property
    def verdict(self) -> Verdict:
        if self.low > 0.0:
            return Verdict.GROWS
        if self.high < 0.0:
            return Verdict.SHRINKS
        return Verdict.NONE

    def at(self, log10_parameters: float) -> float:
        return self.intercept + self.slope * log10_parameters


def _resampled_means(values: Sequence[float], replicates: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means of `values`, the deviations widened by sqrt(n/(n-1)) so that their
    variance is the unbiased s²/n rather than the plug-in (n-1)/n · s²/n, which is small at
    the handful of seeds a study has. One value gives no spread."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 1:
        return np.full(replicates, x[0])
    centred = x.mean() + (x - x.mean()) * math.sqrt(n / (n - 1))
    means: np.ndarray = centred[rng.integers(0, n, size=(replicates, n))].mean(axis=1)
    return means


def _slopes(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OLS slope and intercept of each row of ys (replicates × models) against xs."""
    dx = xs - xs.mean()
    slope = (ys - ys.mean(axis=-1, keepdims=True)) @ dx / (dx @ dx)
    return slope, ys.mean(axis=-1) - slope * xs.mean()


def trend_of(samples: Sequence[SeedSample], replicates: int = BOOTSTRAP_REPLICATES,
             seed: int = BOOTSTRAP_SEED) -> Trend | None:
    """The slope of the gain against log10(parameters) and its 95% interval; None with fewer
    than two model sizes.

    Hierarchical bootstrap: the models are the fixed design points (their sizes are chosen, not
    sampled); within each model the seeds are resampled (the paired differences, or each side
    of an unpaired gain), the model's mean gain recomputed, and the line refitted over models.
    The interval is the point estimate plus the 2.5% and 97.5% quantiles of the replicates'
    deviations from it, widened by t(0.975, df)/z(0.975) with df = seeds − models pooled over
    models: a percentile bootstrap over a handful of seeds is too narrow, and this makes it
    match the t interval the seeds alone would give. Seeded: the same results, the same numbers.
    """
    if len({s.log10_parameters for s in samples}) < 2:
        return None
    ordered = sorted(samples, key=lambda s: s.log10_parameters)
    xs = np.array([s.log10_parameters for s in ordered])
    ys = np.array([s.gain for s in ordered])
    slope, intercept = (float(v[0]) for v in _slopes(xs, ys[None, :]))
    rng = np.random.Generator(np.random.PCG64(seed))
    columns = []
    for s in ordered:
        if s.paired:
            columns.append(_resampled_means(s.treated, replicates, rng))
        else:
            columns.append(_resampled_means(s.treated, replicates, rng) - _resampled_means(s.baseline, replicates, rng))
    boot = np.stack(columns, axis=1)
    b_slope, b_intercept = _slopes(xs, boot)
    df = sum(max(s.seeds - 1, 0) for s in ordered)
    widen = t_quantile(0.5 + CONFIDENCE / 2, df) / float(norm.ppf(0.5 + CONFIDENCE / 2)) if df > 0 else 1.0
    tail = (1 - CONFIDENCE) / 2

    def interval(point: float, replicated: np.ndarray) -> tuple[float, float]:
        lo, hi = np.quantile(replicated - point, [tail, 1 - tail])
        return point + widen * float(lo), point + widen * float(hi)

    low, high = interval(slope, b_slope)
    band = []
    for x in np.linspace(xs[0], xs[-1], BAND_POINTS):
        lo, hi = interval(intercept + slope * float(x), b_intercept + b_slope * float(x))
        band.append((float(x), lo, hi))
    return Trend(slope, low, high, intercept, len(ordered), tuple(s.seeds for s in ordered), tuple(band))


def example_bootstrap(treated: np.ndarray, treated_weight: np.ndarray, baseline: np.ndarray,
                      baseline_weight: np.ndarray, replicates: int = BOOTSTRAP_REPLICATES,
                      seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """Example-level paired bootstrap of a gain in points: arrays are seeds × examples (the
    same examples in the same order, each seed's treated run paired with its baseline run);
    the metric of a run is sum(score) / sum(weight) over its examples. The test examples are
    resampled, the same draw for every run, so the interval carries the test set's sampling
    noise with the seeds held fixed. Returns (gain, low, high)."""

    def gains(counts: np.ndarray) -> np.ndarray:
        """Gains of each row of `counts` (how often each example was drawn)."""
        t = (counts @ treated.T) / np.maximum(counts @ treated_weight.T, 1e-12)
        b = (counts @ baseline.T) / np.maximum(counts @ baseline_weight.T, 1e-12)
        result: np.ndarray = (t - b).mean(axis=-1) * 100.0
        return result

    n = treated.shape[1]
    point = float(gains(np.ones((1, n)))[0])
    rng = np.random.Generator(np.random.PCG64(seed))
    draws = rng.integers(0, n, size=(replicates, n)) + n * np.arange(replicates)[:, None]
    counts = np.bincount(draws.ravel(), minlength=replicates * n).reshape(replicates, n).astype(float)
    replicated = gains(counts)
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(replicated, [tail, 1 - tail])
    return point, float(low), float(high)
