"""CROW's diagnostic, summarised: consecutive-layer cosine per layer, clean vs triggered, and their gap.

``layer_cosine.json`` holds the mean per layer pair (``{"before": {"clean": [...], "triggered":
[...]}, "after": {...}}``) and, in newer runs, the per-prompt values under ``"per_prompt"`` (same
structure, a list of per-prompt lists). With per-prompt values the figure gets bands (the
interquartile range over prompts) and the gap a 95% Welch interval; with means only it gets
neither, and says so. :func:`describe` writes the caption from these numbers, so the caption
can never claim what the data do not show.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from ..core.stats import welch_interval

SIDES = ("before", "after")
PROMPTS = ("clean", "triggered")


@dataclasses.dataclass
class Curve:
    """One line of the figure: mean per layer pair, and an optional band (low, high) per pair."""

    mean: np.ndarray
    low: np.ndarray | None = None
    high: np.ndarray | None = None


@dataclasses.dataclass
class CosineSummary:
    """Per side ('before'/'after') and prompt set: cosine curves; per side: the gap clean - triggered."""

    curves: dict[tuple[str, str], Curve]
    gaps: dict[str, Curve]
    per_prompt: bool  # bands come from per-prompt values (else means only: no band)
    n_prompts: dict[tuple[str, str], int]
    n_seeds: int


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _rows(obj: Any) -> list[list[float]]:
    """Per-prompt lists of numbers (anything else dropped)."""
    if not isinstance(obj, list):
        return []
    return [[_num(x) for x in r] for r in obj if isinstance(r, list) and r]


def _matrix(rows: Sequence[Sequence[float]]) -> np.ndarray:
    n = max((len(r) for r in rows), default=0)
    arr = np.full((len(rows), n), np.nan)
    for i, r in enumerate(rows):
        arr[i, :len(r)] = r
    return arr


def _nanfn(fn: Any, arr: np.ndarray, **kw: Any) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(arr, axis=0, **kw)


def summarise_profiles(profiles: Sequence[dict[str, Any]]) -> CosineSummary:
    """Pool the runs' profiles (seeds of one defense): per-prompt values when every run has them."""
    per_prompt = bool(profiles) and all(isinstance(p.get("per_prompt"), dict) for p in profiles)
    curves: dict[tuple[str, str], Curve] = {}
    pooled: dict[tuple[str, str], np.ndarray] = {}
    n_prompts: dict[tuple[str, str], int] = {}
    for side in SIDES:
        for prompts in PROMPTS:
            if per_prompt:
                rows = [r for p in profiles for r in _rows((p["per_prompt"].get(side) or {}).get(prompts))]
                if not rows:
                    continue
                arr = _matrix(rows)
                pooled[(side, prompts)] = arr
                n_prompts[(side, prompts)] = len(rows)
                curves[(side, prompts)] = Curve(_nanfn(np.nanmean, arr), _nanfn(np.nanpercentile, arr, q=25),
                                                _nanfn(np.nanpercentile, arr, q=75))
            else:
                means = [[_num(x) for x in m] for p in profiles
                         if isinstance(p.get(side), dict) and isinstance(m := p[side].get(prompts), list) and m]
                if means:
                    curves[(side, prompts)] = Curve(_nanfn(np.nanmean, _matrix(means)))
    gaps: dict[str, Curve] = {}
    for side in SIDES:
        c, t = curves.get((side, "clean")), curves.get((side, "triggered"))
        if c is None or t is None or len(c.mean) != len(t.mean):
            continue
        gap = c.mean - t.mean
        if per_prompt:
            a, b = pooled[(side, "clean")], pooled[(side, "triggered")]
            bounds = [welch_interval(a[:, j], b[:, j]) for j in range(len(gap))]
            gaps[side] = Curve(gap, np.array([lo for lo, _ in bounds]), np.array([hi for _, hi in bounds]))
        else:
            gaps[side] = Curve(gap)
    return CosineSummary(curves, gaps, per_prompt, n_prompts, len(profiles))


def _ci(c: Curve, j: int) -> str:
    if c.low is None or c.high is None or math.isnan(c.low[j]) or math.isnan(c.high[j]):
        return ""
    return f", 95% CI {c.low[j]:.3f} to {c.high[j]:.3f}"


def describe(summary: CosineSummary, defense: str) -> str:
    """The caption: what this run's figure shows, computed from its numbers."""
    what = ("Consecutive-layer cosine similarity per decoder layer (the cosine of its input and output hidden "
            "states, mean over prompts; last pair: the final norm), clean vs triggered prompts, before and after "
            "the defense; right: the gap clean − triggered, the consistency the trigger takes away. ")
    if summary.per_prompt:
        n = ", ".join(f"{k[1]} {v}" for k, v in summary.n_prompts.items() if k[0] == "before")
        what += f"Bands: interquartile range over prompts ({n} prompts); gap band: 95% Welch interval. "
    else:
        what += "Means only (the run recorded no per-prompt values): no band. "
    before, after = summary.gaps.get("before"), summary.gaps.get("after")
    if before is None or not np.isfinite(before.mean).any():
        return what + "The run has no clean and triggered profiles of equal length before the defense: no gap to read."
    j = int(np.nanargmax(before.mean))
    g = float(before.mean[j])
    lower = before.low[j] if before.low is not None else math.nan
    if g <= 0 or (math.isfinite(lower) and lower <= 0):
        text = (f"Before the defense no layer shows a gap clearly above zero (the largest is {g:.3f}{_ci(before, j)}, "
                f"at layer {j + 1}): this run does not show the signature CROW targets.")
    else:
        text = f"Before the defense the gap is largest at layer {j + 1} ({g:.3f}{_ci(before, j)})"
        if after is not None and j < len(after.mean) and math.isfinite(after.mean[j]):
            g2 = float(after.mean[j])
            if before.low is not None and after.low is not None and after.high is not None \
                    and math.isfinite(after.high[j]) and math.isfinite(before.low[j]):
                if after.high[j] < before.low[j]:
                    verdict = "reduces it"
                elif after.low[j] > before.high[j]:
                    verdict = "widens it"
                else:
                    verdict = "leaves it within the 95% intervals"
            else:
                verdict = "reduces it" if g2 < g else ("widens it" if g2 > g else "leaves it unchanged")
            text += f"; {defense} {verdict}: {g2:.3f}{_ci(after, j)} after"
            text += "." if summary.per_prompt else " (means only: no interval says whether this is more than noise)."
        else:
            text += "; there is no profile after the defense."
    if after is not None and len(after.mean) == len(before.mean):
        text += (f" Mean gap over layers: {float(np.nanmean(before.mean)):.3f} before, "
                 f"{float(np.nanmean(after.mean)):.3f} after.")
    if summary.n_seeds > 1:
        text += f" Pooled over {summary.n_seeds} seeds."
    return what + text
