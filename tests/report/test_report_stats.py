"""The report's statistics: Student t quantiles and the intervals over seeds, against values
worked out by hand and printed t tables."""

import math

import pytest
from xstilts.operator.report.stats import Method, gain_interval, mean_interval, t_cdf, t_quantile, welch_interval


@pytest.mark.parametrize(("df", "expected"), [
    # two-sided 95% critical values from a printed t table
    (1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (9, 2.262), (29, 2.045), (120, 1.980),
])
def test_t_quantile_matches_the_table(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_is_symmetric_and_inverts_the_cdf() -> None:
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4))
    for df in (1.0, 2.5, 7.0, 40.0):
        for p in (0.6, 0.9, 0.99):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-9)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.960, abs=1e-3)  # tends to the normal


def test_t_quantile_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="0 < p < 1"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df > 0"):
        t_quantile(0.9, 0)


def test_paired_interval_by_hand() -> None:
    # gains 3, 4, 1: mean 8/3; sample variance ((1/3)² + (4/3)² + (5/3)²) / 2 = 7/3;
    # half-width t(0.975, 2) · sqrt(7/3) / sqrt(3) = 4.302653 · 0.881917 = 3.794583
    g = gain_interval({1: 63.0, 2: 66.0, 3: 65.0}, {1: 60.0, 2: 62.0, 3: 64.0})
    assert g is not None
    assert g.method is Method.PAIRED and g.n == 3
    assert g.mean == pytest.approx(8 / 3)
    assert g.half_width == pytest.approx(3.794583, abs=1e-6)
    assert g.low == pytest.approx(8 / 3 - 3.794583, abs=1e-6)
    assert g.high == pytest.approx(8 / 3 + 3.794583, abs=1e-6)


def test_pairing_uses_only_seeds_that_have_both_runs() -> None:
    # seed 4 has no baseline: it is left out of the paired differences (2, 2)
    g = gain_interval({1: 12.0, 2: 22.0, 4: 99.0}, {1: 10.0, 2: 20.0})
    assert g is not None and g.method is Method.PAIRED and g.n == 2
    assert g.mean == pytest.approx(2.0)
    assert g.half_width == pytest.approx(0.0)


def test_welch_when_fewer_than_two_seeds_pair_up() -> None:
    # treated 80, 78 (seeds 2, 3), baseline 70, 72 (seeds 1, 2): one pair only.
    # means 79 − 71 = 8; each variance 2, se = sqrt(2/2 + 2/2) = sqrt(2);
    # Welch df = (1 + 1)² / (1²/1 + 1²/1) = 2; half-width 4.302653 · 1.414214 = 6.084870
    g = gain_interval({2: 80.0, 3: 78.0}, {1: 70.0, 2: 72.0})
    assert g is not None
    assert g.method is Method.WELCH
    assert g.mean == pytest.approx(8.0)
    assert g.half_width == pytest.approx(6.084870, abs=1e-6)


def test_single_values_give_a_mean_without_an_interval() -> None:
    one_pair = gain_interval({1: 61.0}, {1: 60.0, 2: 64.0})
    assert one_pair is not None and one_pair.method is Method.SINGLE
    assert one_pair.mean == pytest.approx(1.0) and one_pair.half_width is None and one_pair.low is None
    unpaired = gain_interval({3: 70.0}, {1: 60.0})
    assert unpaired is not None and unpaired.mean == pytest.approx(10.0) and unpaired.half_width is None
    assert gain_interval({}, {1: 60.0}) is None
    assert gain_interval({1: 60.0}, {}) is None


def test_mean_interval_and_welch_edge_cases() -> None:
    assert mean_interval([5.0]).half_width is None
    flat = welch_interval([1.0, 1.0], [0.0, 0.0])
    assert flat.mean == 1.0 and flat.half_width == 0.0
    with pytest.raises(ValueError, match="at least one value"):
        mean_interval([])
    with pytest.raises(ValueError, match="two values on each side"):
        welch_interval([1.0], [0.0, 1.0])
    # 0, 10, 20, 10: mean 10, variance 200/3, sem sqrt(200/3)/2 = 4.082483;
    # t(0.975, 3) = 3.182446 → half-width 12.992283
    four = mean_interval([0.0, 10.0, 20.0, 10.0])
    assert four.mean == pytest.approx(10.0)
    assert four.half_width == pytest.approx(3.182446 * math.sqrt(200 / 3) / 2, abs=1e-5)
    assert four.half_width == pytest.approx(12.992283, abs=1e-5)
