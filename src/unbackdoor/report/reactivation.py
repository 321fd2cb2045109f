"""The re-activation test in the report: the post-retuning ASR column and the ASR-vs-retuning-steps plot.

Read from each run's ``reactivation.json`` (``core.reactivation``); runs without one show "n/a", and
the column appears only when some run of the scenario has one. The backdoored row shows the ceiling
(the backdoored model retuned the same way); the caption gives the floor (the clean model retuned).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..core.reactivation import FILE
from ..core.stats import fmt_mean_std
from .collect import GroupSummary
from .plots import save_png

HEADER = "ASR after retuning ↓"


def _summary(run: Any) -> dict[str, Any] | None:
    rec = run.artifact(FILE)
    return rec.get("summary") if isinstance(rec, dict) and isinstance(rec.get("summary"), dict) else None


def _after(run: Any, model: str) -> float | None:
    s = _summary(run)
    v = (s or {}).get(model, {}).get("asr_after") if s else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _text(values: Sequence[float], digits: int) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return fmt_mean_std(float(np.mean(values)), float(np.std(values, ddof=1)), digits)


def column(groups: Sequence[GroupSummary], digits: int = 3) -> tuple[str, str, list[str], str] | None:
    """``(header, backdoored-row cell, one cell per group, caption)``, or None when no run was retuned."""
    if not any(_summary(r) for g in groups for r in g.runs):
        return None
    ceiling: dict[int, float] = {}
    floor: dict[int, float] = {}
    for g in groups:
        for r in g.runs:
            for store, model in ((ceiling, "ceiling"), (floor, "floor")):
                v = _after(r, model)
                if v is not None:
                    store.setdefault(r.seed, v)
    cells = [_text([v for r in g.runs if (v := _after(r, "defended")) is not None], digits) for g in groups]
    steps = sorted({int(s["defended"]["steps"]) for g in groups for r in g.runs
                    if (s := _summary(r)) and isinstance(s.get("defended"), dict)})
    caption = (f"{HEADER}: the retuning attack (Min et al., NeurIPS 2024; the evaluator's attack, with a few poisoned "
               f"samples, never given to the defense) after {', '.join(map(str, steps)) or '?'} steps; the backdoored "
               f"row is the ceiling (the backdoored model retuned the same way); the floor (a clean model retuned "
               f"the same way) is {_text(list(floor.values()), digits) if floor else 'not measured'}.")
    return HEADER, _text(list(ceiling.values()), digits), cells, caption


def _mean_curve(curves: Sequence[Sequence[dict[str, Any]]]) -> tuple[list[int], list[float]]:
    """Mean ASR per step over the curves that reach that step."""
    by_step: dict[int, list[float]] = {}
    for c in curves:
        for p in c:
            v = p.get("asr")
            if isinstance(v, (int, float)) and math.isfinite(v):
                by_step.setdefault(int(p["step"]), []).append(float(v))
    steps = sorted(by_step)
    return steps, [float(np.mean(by_step[s])) for s in steps]


def plot(groups: Sequence[GroupSummary], title: str, path: Path) -> Path | None:
    """ASR against retuning steps: one line per defense (mean over seeds), the floor and ceiling dashed."""
    per_group = []
    extra: dict[str, list[Any]] = {"ceiling": [], "floor": []}
    seen: set[tuple[int, str]] = set()
    for g in groups:
        curves = []
        for r in g.runs:
            rec = r.artifact(FILE)
            if not isinstance(rec, dict) or not isinstance(rec.get("curves"), dict):
                continue
            if rec["curves"].get("defended"):
                curves.append(rec["curves"]["defended"])
            for model in ("ceiling", "floor"):
                if rec["curves"].get(model) and (r.seed, model) not in seen:
                    seen.add((r.seed, model))
                    extra[model].append(rec["curves"][model])
        if curves:
            per_group.append((g.label, curves))
    if not per_group:
        return None
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot(111)
    for label, curves in per_group:
        steps, asr = _mean_curve(curves)
        ax.plot(steps, asr, marker="o", ms=3, label=f"{label} (n={len(curves)})")
    for model, style in (("ceiling", ("#000000", "--")), ("floor", ("#7f8c8d", ":"))):
        if extra[model]:
            steps, asr = _mean_curve(extra[model])
            ax.plot(steps, asr, color=style[0], ls=style[1], lw=2,
                    label=f"{'backdoored' if model == 'ceiling' else 'clean'} model ({model}, n={len(extra[model])})")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("retuning steps (optimizer steps on the poisoned retuning set)")
    ax.set_ylabel("ASR")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_png(fig, path)


__all__ = ["HEADER", "column", "plot"]
