"""Aggregating metrics over seeds (mean, std, values) and the confidence intervals the report shows."""
from __future__ import annotations

import math
from typing import Any, Iterable


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaNs are skipped."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return m, 0.0
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var)


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``[{metric: value}, ...]`` (one per seed) -> ``{metric: {mean, std, n, values}}`` for numeric metrics."""
    keys: list[str] = []
    for r in records:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys:
                keys.append(k)
    out = {}
    for k in keys:
        vals = [r.get(k) for r in records]
        m, s = mean_std(v for v in vals if isinstance(v, (int, float)))
        n = sum(isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) for v in vals)
        out[k] = {"mean": m, "std": s, "n": n, "values": vals}
    return out


def fmt_mean_std(m: float, s: float, digits: int = 3) -> str:
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


# ---- confidence intervals (pure; tested against scipy and textbook values) ------------------------
#
# A rate measured on n test inputs gets a Wilson interval (it stays inside [0, 1] and is honest at
# rates near 0 or 1, where the normal approximation claims a zero-width interval); a mean over a
# few seeds gets a Student-t interval (with 3 seeds it is wide, and should be). No scipy needed.

def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]


def _normal_quantile(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        from .errors import ConfigError

        raise ConfigError(f"confidence = {confidence!r} is not in (0, 1)", where="confidence",
                          fix="pass e.g. 0.95 for a 95% interval")


def wilson_interval(successes: int | float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a rate ``successes / n`` (NaNs when n = 0).

    ``successes`` may be a rate's numerator reconstructed as ``rate * n`` (it is rounded).
    """
    _check_confidence(confidence)
    if n <= 0:
        return float("nan"), float("nan")
    k = min(max(round(float(successes)), 0), n)
    z = _normal_quantile(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact bounds at k = 0 and k = n (the formula gives them up to rounding)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)), -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student-t cumulative distribution function."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


def t_interval(values: Iterable[Any], confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of ``values`` (NaNs skipped; NaNs when fewer than 2 remain)."""
    _check_confidence(confidence)
    xs = _finite(values)
    if len(xs) < 2:
        return float("nan"), float("nan")
    m, s = mean_std(xs)
    half = t_quantile(0.5 + confidence / 2, len(xs) - 1) * s / math.sqrt(len(xs))
    return m - half, m + half


def welch_interval(a: Iterable[Any], b: Iterable[Any], confidence: float = 0.95) -> tuple[float, float]:
    """Welch's t interval of ``mean(a) - mean(b)`` for two independent samples (NaNs if either has < 2)."""
    _check_confidence(confidence)
    xa, xb = _finite(a), _finite(b)
    if len(xa) < 2 or len(xb) < 2:
        return float("nan"), float("nan")
    (ma, sa), (mb, sb) = mean_std(xa), mean_std(xb)
    va, vb = sa * sa / len(xa), sb * sb / len(xb)
    diff = ma - mb
    if va + vb == 0.0:
        return diff, diff
    df = (va + vb) ** 2 / (va * va / (len(xa) - 1) + vb * vb / (len(xb) - 1))
    half = t_quantile(0.5 + confidence / 2, df) * math.sqrt(va + vb)
    return diff - half, diff + half


def bootstrap_interval(values: Iterable[Any], confidence: float = 0.95, *, resamples: int = 2000,
                       seed: int = 0, statistic: Any = None) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` (default: the mean), seeded so reports are reproducible."""
    import random

    _check_confidence(confidence)
    xs = _finite(values)
    if len(xs) < 2:
        return float("nan"), float("nan")
    stat = statistic or (lambda v: sum(v) / len(v))
    rng = random.Random(seed)
    n = len(xs)
    stats = sorted(stat([xs[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    alpha = (1.0 - confidence) / 2.0

    def pick(q: float) -> float:  # linear interpolation between order statistics (numpy's default)
        pos = q * (len(stats) - 1)
        i = int(math.floor(pos))
        j = min(i + 1, len(stats) - 1)
        return stats[i] + (stats[j] - stats[i]) * (pos - i)

    return pick(alpha), pick(1.0 - alpha)
