"""The detection arithmetic, pure: calibration against a null distribution, AUROC, ROC curves, TPR/FPR.

Scores are "higher = more suspicious" everywhere. Ties count one half in the AUROC (the Mann-Whitney
convention), so a detector that gives every input the same score has AUROC 0.5, never 1.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from ..core.errors import DataError


def _finite(values: Iterable[float], what: str) -> np.ndarray:
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    if arr.size and not np.all(np.isfinite(arr)):
        raise DataError(f"{what} holds non-finite scores", where=what, fix="drop or fix the NaN/inf scores")
    return arr


def empirical_p_value(score: float, null: Sequence[float]) -> float:
    """``(1 + #{null >= score}) / (1 + n)``: how often a clean model scores at least this high.

    The +1 keeps the p-value honest with a small null (never 0: with 20 clean models the smallest
    possible value is 1/21).
    """
    ref = _finite(null, "null distribution")
    if ref.size == 0:
        raise DataError("empty null distribution", where="empirical_p_value", fix="calibrate on some clean models")
    if not math.isfinite(score):
        raise DataError(f"score {score} is not finite", where="empirical_p_value", fix="check the scanner's output")
    return float((1 + np.sum(ref >= score)) / (1 + ref.size))


def null_quantile(null: Sequence[float], q: float) -> float:
    """The ``q`` quantile of the null (linear interpolation): a threshold with false-positive rate ~``1 - q``."""
    ref = _finite(null, "null distribution")
    if ref.size == 0:
        raise DataError("empty null distribution", where="null_quantile", fix="calibrate on some clean models")
    return float(np.quantile(ref, q))


def calibrated_threshold(null: Sequence[float], alpha: float) -> float:
    """The score above which a model is flagged at false-positive rate ~``alpha`` against clean models.

    With enough clean models (``n >= 1/alpha - 1``) the ``1 - alpha`` quantile of the null; with fewer, no
    quantile can reach ``alpha`` (the smallest p-value is ``1/(n+1)``), so the rule is "above every clean
    model": the null's maximum, a false-positive rate of about ``1/(n+1)``.
    """
    ref = _finite(null, "null distribution")
    if ref.size == 0:
        raise DataError("empty null distribution", where="calibrated_threshold", fix="calibrate on some clean models")
    if ref.size + 1 >= 1.0 / alpha:
        return float(np.quantile(ref, 1.0 - alpha))
    return float(ref.max())


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2 (NaN if a side is empty)."""
    pos, neg = _finite(positives, "positive scores"), _finite(negatives, "negative scores")
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(allv.size, dtype=np.float64)
    sorted_v = allv[order]
    i = 0
    while i < allv.size:  # average ranks over ties
        j = i
        while j + 1 < allv.size and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def roc_curve(positives: Sequence[float], negatives: Sequence[float]) -> tuple[list[float], list[float], list[float]]:
    """``(fpr, tpr, thresholds)``: flagging ``score >= threshold`` for every distinct score, from (0, 0) to (1, 1)."""
    pos, neg = _finite(positives, "positive scores"), _finite(negatives, "negative scores")
    thresholds = sorted(set(pos.tolist()) | set(neg.tolist()), reverse=True)
    fpr, tpr, thr = [0.0], [0.0], [math.inf]
    for t in thresholds:
        tpr.append(float(np.mean(pos >= t)) if pos.size else float("nan"))
        fpr.append(float(np.mean(neg >= t)) if neg.size else float("nan"))
        thr.append(float(t))
    return fpr, tpr, thr


def detection_rates(flags: Sequence[bool], labels: Sequence[bool]) -> dict[str, float]:
    """TPR (flagged among positives) and FPR (flagged among negatives), with the counts behind them."""
    if len(flags) != len(labels):
        raise DataError(f"{len(flags)} flags for {len(labels)} labels", where="detection_rates",
                        fix="give one flag per labelled item")
    f, y = np.asarray(flags, dtype=bool), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return {"tpr": float(f[y].mean()) if n_pos else float("nan"), "fpr": float(f[~y].mean()) if n_neg else float("nan"),
            "n_pos": n_pos, "n_neg": n_neg, "tp": int((f & y).sum()), "fp": int((f & ~y).sum())}


def robust_tail_z(values: Sequence[float], q: float = 0.95) -> float:
    """How far the ``q`` quantile of ``values`` lies above their median, in robust sigmas (1.4826 MAD).

    A heavy upper tail (a few inputs far above the rest) gives a large value; 0 when the MAD is 0.
    """
    arr = _finite(values, "values")
    if arr.size == 0:
        return float("nan")
    med = float(np.median(arr))
    mad = float(np.median(np.abs(arr - med)))
    if mad == 0:
        return 0.0
    return float((np.quantile(arr, q) - med) / (1.4826 * mad))


__all__ = ["auroc", "calibrated_threshold", "detection_rates", "empirical_p_value", "null_quantile", "robust_tail_z", "roc_curve"]
