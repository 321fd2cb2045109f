"""Confidence intervals: Wilson for a rate, Student-t over seeds, Welch for a difference, bootstrap.

Reference values are textbook ones (t quantiles from any t table; the Wilson interval from
Wilson 1927 / Newcombe 1998) and, when scipy is installed, scipy's own.
"""
from __future__ import annotations

import math
import statistics

import pytest

from unbackdoor.core.errors import ConfigError
from unbackdoor.core.stats import (bootstrap_interval, t_cdf, t_interval, t_quantile, welch_interval,
                                   wilson_interval)


@pytest.mark.parametrize("df, q", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042), (1000, 1.962)])
def test_t_quantile_matches_the_t_table(df, q):
    assert t_quantile(0.975, df) == pytest.approx(q, abs=5e-4)
    assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-9)
    assert t_quantile(0.025, df) == pytest.approx(-q, abs=5e-4)


@pytest.mark.parametrize("k, n, lo, hi", [(8, 10, 0.4902, 0.9433), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0),
                                          (1, 29, 0.0061, 0.1718)])
def test_wilson_interval_matches_textbook_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=5e-4)


def test_wilson_interval_is_inside_zero_one_and_nan_without_inputs():
    assert wilson_interval(0, 200)[0] == 0.0 and wilson_interval(200, 200)[1] == 1.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ConfigError):
        wilson_interval(1, 2, confidence=95)


def test_t_interval_is_mean_plus_minus_t_times_standard_error():
    xs = [0.10, 0.20, 0.15]
    m, s = statistics.mean(xs), statistics.stdev(xs)
    half = 4.302652729749464 * s / math.sqrt(3)
    assert t_interval(xs) == pytest.approx((m - half, m + half), rel=1e-9)
    assert all(math.isnan(v) for v in t_interval([0.5]))  # one seed: no interval over seeds
    assert t_interval([0.1, float("nan"), 0.2, 0.15]) == pytest.approx(t_interval(xs))


def test_welch_interval_of_a_difference():
    a, b = [1, 2, 3, 4], [2, 4, 6, 9, 1]
    assert welch_interval(a, b) == pytest.approx((-5.8406214919794, 2.0406214919794), abs=1e-6)  # scipy's value


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    xs = [1, 2, 3, 4, 5, 6, 7, 8]
    lo, hi = bootstrap_interval(xs, seed=3)
    assert lo < 4.5 < hi and bootstrap_interval(xs, seed=3) == (lo, hi)
    # the normal-theory interval of the mean is close for a symmetric sample
    t_lo, t_hi = t_interval(xs)
    assert lo == pytest.approx(t_lo, abs=0.8) and hi == pytest.approx(t_hi, abs=0.8)


def test_intervals_agree_with_scipy_when_it_is_installed():
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((0, 7), (3, 7), (438, 450), (97, 100), (1, 2)):
        ref = stats.binomtest(k, n).proportion_ci(0.95, "wilson")
        assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)
    for df in (1, 2, 3, 7, 25, 3.7):
        for p in (0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(float(stats.t.ppf(p, df)), rel=1e-8)
    xs = [0.91, 0.88, 0.95, 0.90]
    ref = stats.t.interval(0.95, len(xs) - 1, loc=statistics.mean(xs), scale=stats.sem(xs))
    assert t_interval(xs) == pytest.approx(ref, rel=1e-9)
