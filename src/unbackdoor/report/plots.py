"""The report's figures, drawn with matplotlib's object API (no pyplot, so no global state).

Each function takes plain data, saves one PNG and returns its path. Missing values (NaN,
None) are drawn as gaps, never as zeros.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..core.runs import atomic_write_bytes
from .collect import GroupSummary, backdoored_baseline

if TYPE_CHECKING:
    from .layer_cosine import CosineSummary

ASR_COLOR, UTIL_COLOR = "#c0392b", "#2471a3"
UTILITY_METRIC = {"lm": "clean_utility", "classify": "acc"}
UTILITY_LABEL = {"lm": "clean utility (exact match)", "classify": "clean accuracy"}
# the utility on triggered inputs: a backdoor is gone only when this recovers, not just when ASR falls
TRIGGERED_METRIC = {"lm": "triggered_utility", "classify": "ra"}
TRIGGERED_LABEL = {"lm": "triggered utility", "classify": "robust accuracy (RA)"}
TRIG_COLOR = "#27ae60"


def save_png(fig: Figure, path: Path) -> Path:
    """Render ``fig`` to PNG and write it atomically (whole or not at all)."""
    import io

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def _nan(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def _ms(stats: dict[str, Any], key: str) -> tuple[float, float, float]:
    """Mean and the two ends of its confidence interval (NaN where unknown)."""
    s = stats.get(key) or {}
    ci = s.get("ci") or {}
    return _nan(s.get("mean")), _nan(ci.get("low")), _nan(ci.get("high"))


def plot_asr_utility(scenarios: dict[tuple[str, str, str], list[GroupSummary]], kind: str, path: Path) -> Path:
    """Grouped bars per scenario: ASR, clean utility and triggered utility, backdoored model and each defense."""
    keys = [k for k in scenarios if k[0] == kind]
    n = len(keys)
    fig = Figure(figsize=(max(5.0, 1.0 + 1.3 * max(len(scenarios[k]) + 1 for k in keys)) if keys else 5.0,
                          3.2 * max(n, 1)))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(n, 1, i + 1)
        groups = scenarios[key]
        base, seeds, _ = backdoored_baseline(groups)
        labels = ["backdoored"] + [g.label.replace(" (", "\n(") for g in groups]
        asr = [_ms(base, "asr")] + [_ms(g.after, "asr") for g in groups]
        util = [_ms(base, UTILITY_METRIC[kind])] + [_ms(g.after, UTILITY_METRIC[kind]) for g in groups]
        trig = [_ms(base, TRIGGERED_METRIC[kind])] + [_ms(g.after, TRIGGERED_METRIC[kind]) for g in groups]
        x = np.arange(len(labels))
        w = 0.27
        for off, vals, color, label in ((-w, asr, ASR_COLOR, "ASR ↓"),
                                        (0.0, util, UTIL_COLOR, UTILITY_LABEL[kind] + " ↑"),
                                        (w, trig, TRIG_COLOR, TRIGGERED_LABEL[kind] + " ↑")):
            means = np.array([m for m, _, _ in vals])
            err = np.array([[0.0 if math.isnan(lo) else max(0.0, m - lo) for m, lo, _ in vals],
                            [0.0 if math.isnan(hi) else max(0.0, hi - m) for m, _, hi in vals]])
            bars = ax.bar(x + off, np.nan_to_num(means, nan=0.0), w, yerr=np.nan_to_num(err), capsize=3, color=color,
                          label=label, error_kw={"elinewidth": 1})
            for b, m in zip(bars, means):
                ax.annotate("n/a" if math.isnan(m) else f"{m:.2f}", (b.get_x() + b.get_width() / 2, 0 if math.isnan(m) else m),
                            xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
        ax.set_xticks(x, labels)
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("rate")
        title = " / ".join(p for p in key[1:] if p)
        has_ci = any(not math.isnan(lo) for vals in (asr, util, trig) for _, lo, _ in vals)
        over = (f"seed {seeds[0]}" if len(seeds) == 1 else f"mean over seeds {', '.join(map(str, seeds))}")
        over += (", 95% Wilson intervals" if len(seeds) == 1 else ", 95% t-intervals") if has_ci else ", no intervals"
        ax.set_title(f"{kind}: {title}  ({over})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 1.32 if n == 1 else 1.28),
                      frameon=False)
    fig.tight_layout()
    return save_png(fig, path)


def plot_layer_cosine(summary: "CosineSummary", title: str, path: Path) -> Path:
    """CROW's diagnostic (see :mod:`.layer_cosine`): one panel before, one after the defense, one for the gap.

    The cosines of clean and triggered prompts sit close together next to their spread across
    layers, so each side gets its own panel, and the gap (clean minus triggered: where a
    backdoor shows, and what a working defense closes) gets a third, on its own scale.
    """
    fig = Figure(figsize=(12.0, 3.6))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    colors = {"clean": "#7f8c8d", "triggered": ASR_COLOR}
    for ax, side in zip(axes, ("before", "after")):
        for prompts in ("clean", "triggered"):
            c = summary.curves.get((side, prompts))
            if c is None:
                continue
            x = np.arange(1, len(c.mean) + 1)
            ax.plot(x, c.mean, "-", color=colors[prompts], marker="o", ms=3, label=f"{prompts} prompts")
            if c.low is not None and c.high is not None:
                ax.fill_between(x, c.low, c.high, color=colors[prompts], alpha=0.15, lw=0)
        ax.set_title(f"{side} the defense", fontsize=9)
        ax.set_ylabel("cosine(input, output) of the layer")
    shared = [a for a in axes[:2] if a.lines]
    if len(shared) == 2:  # one scale for both sides, so before and after compare by eye
        lo = min(a.get_ylim()[0] for a in shared)
        hi = max(a.get_ylim()[1] for a in shared)
        for a in shared:
            a.set_ylim(lo, hi)
    gap_ax = axes[2]
    for side, color, ls in (("before", ASR_COLOR, "-"), ("after", UTIL_COLOR, "--")):
        g = summary.gaps.get(side)
        if g is None:
            continue
        x = np.arange(1, len(g.mean) + 1)
        gap_ax.plot(x, g.mean, ls, color=color, marker="o", ms=3, label=f"{side} the defense")
        if g.low is not None and g.high is not None:
            gap_ax.fill_between(x, g.low, g.high, color=color, alpha=0.15, lw=0)
    gap_ax.axhline(0.0, color="#34495e", lw=0.8)
    gap_ax.set_ylabel("gap: clean − triggered")
    gap_ax.set_title("consistency the trigger takes away (0 = none)", fontsize=9)
    for a in axes:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_xlabel("decoder layer")
        a.grid(alpha=0.3)
        if a.lines:
            a.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


def ulrl_cutoff(selection: dict[str, Any]) -> float | None:
    """The weight-change score above which a neuron counts as suspicious: median + z * sigma.

    sigma is the selection's own ``scale`` when recorded (ULRL falls back from the MAD to the mean
    absolute deviation when MAD = 0), else 1.4826 * MAD. None when there is no finite cut-off.
    """
    m, z = _nan(selection.get("median")), _nan(selection.get("threshold"))
    scale = _nan(selection.get("scale"))
    if math.isnan(scale):
        scale = 1.4826 * _nan(selection.get("mad"))
    if any(math.isnan(v) for v in (m, z, scale)) or scale <= 0:
        return None
    return m + z * scale


def plot_ulrl_selection(selections: list[tuple[int, dict[str, Any]]], title: str, path: Path,
                        class_names: Sequence[str] | None = None) -> Path:
    """ULRL's neuron choice per seed: weight change of each output neuron, the MAD cut-off, the picks.

    Neurons are the classes of the head; ``class_names`` label them (indices otherwise).
    """
    n = len(selections)
    fig = Figure(figsize=(6.4, 2.4 * n))
    for i, (seed, sel) in enumerate(selections):
        ax = fig.add_subplot(n, 1, i + 1)
        scores = np.array([_nan(v) for v in sel.get("scores", [])])
        chosen = {int(j) for j in sel.get("selected", []) if isinstance(j, int)}
        colors = [ASR_COLOR if j in chosen else "#95a5a6" for j in range(len(scores))]
        ax.bar(np.arange(len(scores)), np.nan_to_num(scores), color=colors)
        med = _nan(sel.get("median"))
        if not math.isnan(med):
            ax.axhline(med, color="#34495e", lw=1, ls=":", label="median")
        cut = ulrl_cutoff(sel)
        if cut is not None:
            kind = "mean-abs-dev" if sel.get("scale_kind") == "mean_abs_dev" else "MAD"
            ax.axhline(cut, color=ASR_COLOR, lw=1, ls="--", label=f"{kind} cut-off (z > {_nan(sel.get('threshold')):g})")
        status = sel.get("status", "?")
        note = {"mad_zero": " — MAD = 0: no robust spread", "no_suspect": " — no neuron above the cut-off"}.get(status, "")
        names = list(class_names) if class_names is not None and len(class_names) == len(scores) else None
        picked = ", ".join(names[j] if names and j < len(names) else str(j) for j in sorted(chosen)) or "none"
        ax.set_title(f"seed {seed}: selected neuron(s) {picked}{note}", fontsize=8)
        ax.set_ylabel("Σ|ΔW| of row", fontsize=8)
        ax.set_xticks(np.arange(len(scores)), names if names else [str(j) for j in range(len(scores))],
                      rotation=45 if names and max(len(n) for n in names) > 3 else 0, ha="right" if names else "center")
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=9)
    fig.supxlabel("output neuron (class)", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def plot_unlearn_trace(traces: list[tuple[int, dict[str, Any]]], title: str, path: Path,
                       stop_acc: float | None = None) -> Path:
    """ULRL's unlearning phase: clean-subset accuracy while maximising the loss, one line per seed."""
    fig = Figure(figsize=(6.4, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    for seed, tr in traces:
        steps, acc = tr.get("step") or [], tr.get("acc") or []
        k = min(len(steps), len(acc))
        ax.plot([_nan(s) for s in steps[:k]], [_nan(a) for a in acc[:k]], marker=".", ms=3, label=f"seed {seed}")
    if stop_acc is not None:
        ax.axhline(stop_acc, color="#34495e", lw=1, ls=":", label=f"stop at accuracy ≤ {stop_acc:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("unlearning step")
    ax.set_ylabel("accuracy on the clean subset")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)
