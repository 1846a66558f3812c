"""The trend of the gain with model size: slope against log10(parameters) with its
hierarchical-bootstrap interval, on generated results whose true slope is known."""

from __future__ import annotations

import numpy as np
import pytest
from xstilts.operator.experiment.plan import plan
from xstilts.operator.experiment.spec import load_spec_text
from xstilts.operator.report.build import ALL_TARGETS, build_report, grid_of, to_markdown, verdict_lines
from xstilts.operator.report.plots import gain_vs_size
from xstilts.operator.report.stats import Verdict, seed_sample, trend_of
from xstilts.trainer.config import RunResult, Stage

SIZES = {"s": 1_000_000, "m": 10_000_000, "l": 100_000_000, "xl": 1_000_000_000}
SEEDS = (1, 2, 3, 4, 5)
SPEC = f"""
name: trend-test
models:
{chr(10).join(f"  - {{name: {n}, pretrained: local/{n}, parameters: {p}, resources: {{gpus: 0}}}}"
             for n, p in SIZES.items())}
intermediateTasks: [mnli]
targets: [pawsx]
evalLanguages: {{pawsx: [en, de, fr]}}
seeds: {list(SEEDS)}
"""


def generated(slope: float, noise: float, rng_seed: int) -> tuple[list[RunResult], object]:
    """Baseline accuracy 60 points ± seed noise; the intermediate arm adds
    2 + slope · (log10(parameters) − 6) points on the zero-shot languages (English +20)."""
    spec = load_spec_text(SPEC, "trend.yaml")
    p = plan(spec)
    rng = np.random.default_rng(rng_seed)
    results = []
    for run in p.runs:
        if run.config.stage is not Stage.TARGET:
            continue
        model, arm = run.labels.model, run.labels.intermediate
        gain = 0.0 if arm == "baseline" else 2.0 + slope * (np.log10(SIZES[model]) - 6)
        languages = {"en": {"accuracy": (80 + (20 if arm != "baseline" else 0) + rng.normal(0, noise)) / 100}}
        for lang in ("de", "fr"):
            languages[lang] = {"accuracy": (60 + gain + rng.normal(0, noise)) / 100}
        results.append(RunResult(
            run_id=run.run_id, config=run.config, metrics={}, languages=languages,
            parameter_count=SIZES[model], tokens_seen=1, train_steps=1, wall_seconds=1.0,
            tokens_per_second=1.0, finished_at="2025-01-01T00:00:00Z"))
    return results, spec


@pytest.mark.parametrize("slope", [-1.5, 2.0])
def test_a_known_slope_is_covered_and_its_sign_is_the_verdict(slope: float) -> None:
    results, spec = generated(slope, noise=0.8, rng_seed=7)
    report = build_report(results, grid_of(spec))  # type: ignore[arg-type]
    for target in ("pawsx", ALL_TARGETS):
        trend = report.trends[("mnli", target)]
        assert trend.low <= slope <= trend.high
        assert trend.excludes_zero
        assert trend.verdict is (Verdict.GROWS if slope > 0 else Verdict.SHRINKS)
        assert trend.models == 4 and trend.seeds == (5, 5, 5, 5)
    line = verdict_lines(report)[0]
    assert line.startswith(f"mnli: {'gain grows' if slope > 0 else 'gain shrinks'} with model size")
    assert "excludes 0" in line


def test_a_flat_gain_gives_no_detectable_trend() -> None:
    results, spec = generated(0.0, noise=2.0, rng_seed=3)
    report = build_report(results, grid_of(spec))  # type: ignore[arg-type]
    trend = report.trends[("mnli", ALL_TARGETS)]
    assert trend.low < 0.0 < trend.high and not trend.excludes_zero
    assert trend.verdict is Verdict.NONE
    assert "mnli: no detectable trend at this precision" in to_markdown(report)
    assert "includes 0" in verdict_lines(report)[0]


def test_the_interval_is_deterministic_and_the_band_holds_the_line() -> None:
    results, spec = generated(1.0, noise=1.0, rng_seed=11)
    a = build_report(results, grid_of(spec)).trends[("mnli", "pawsx")]  # type: ignore[arg-type]
    b = build_report(list(reversed(results)), grid_of(spec)).trends[("mnli", "pawsx")]  # type: ignore[arg-type]
    assert a == b
    assert a.band[0][0] == pytest.approx(6.0) and a.band[-1][0] == pytest.approx(9.0)
    for x, lo, hi in a.band:
        assert lo <= a.at(x) <= hi


def test_the_interval_covers_the_true_slope_about_95_times_in_100() -> None:
    """Three models, three seeds each, noisy: the small-sample widening keeps coverage near 95%."""
    covered = 0
    trials = 150
    for i in range(trials):
        rng = np.random.default_rng(1000 + i)
        samples = [seed_sample(x, {s: 3.0 * x + rng.normal(0, 2) for s in range(3)},
                               {s: rng.normal(0, 1) for s in range(3)}) for x in (6.0, 7.0, 8.0)]
        trend = trend_of([s for s in samples if s is not None], replicates=1000)
        assert trend is not None
        covered += trend.low <= 3.0 <= trend.high
    assert covered / trials >= 0.88


def test_one_model_size_gives_no_trend() -> None:
    sample = seed_sample(6.0, {1: 1.0, 2: 2.0}, {1: 0.0, 2: 0.0})
    assert sample is not None and trend_of([sample]) is None


def test_the_size_plot_draws_the_trend_band() -> None:
    results, spec = generated(2.0, noise=0.8, rng_seed=7)
    report = build_report(results, grid_of(spec))  # type: ignore[arg-type]
    figure = gain_vs_size(report)
    assert "fitted trend" in figure.caption and figure.png.startswith(b"\x89PNG")
