"""Aggregating metrics over seeds: mean, standard deviation, and the values themselves."""
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
