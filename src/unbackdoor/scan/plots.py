"""The scan folder's figures: one PNG per scanner, from the evidence in its result (matplotlib object API)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..report.plots import save_png
from .spec import ScanResult

FLAG, PLAIN, LINE = "#c0392b", "#2471a3", "#555555"


def plot_ulrl(result: ScanResult, path: Path, class_names: Sequence[str] | None = None) -> Path:
    """Robust z of each head row after unlearning; the threshold; the suspected target in red."""
    z = result.evidence["z"]
    above = [s > result.evidence["median"] for s in result.evidence["scores"]]
    fig = Figure(figsize=(6.4, 3.2))
    ax = fig.add_subplot(111)
    colors = [FLAG if i == result.target else (PLAIN if above[i] else "#aab7b8") for i in range(len(z))]
    ax.bar(range(len(z)), z, color=colors)
    ax.axhline(result.threshold, color=LINE, ls="--", lw=1, label=f"threshold z = {result.threshold:g}")
    ax.set_xticks(range(len(z)))
    ax.set_xticklabels([class_names[i] if class_names and i < len(class_names) else str(i) for i in range(len(z))],
                       rotation=45 if class_names else 0, ha="right" if class_names else "center", fontsize=8)
    ax.set_ylabel("robust z of the row's change")
    verdict = {True: "backdoored", False: "no backdoor found", None: "no verdict"}[result.verdict]
    ax.set_title(f"ULRL scanner: {verdict} (max z {result.score:.1f})", fontsize=10)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_input_scores(result: ScanResult, path: Path, *, clean: Sequence[float], inputs: Sequence[float] | None,
                      xlabel: str) -> Path:
    """Histogram of the clean prompts' scores (and of the screened inputs'), with the runtime-filter threshold."""
    fig = Figure(figsize=(6.4, 3.2))
    ax = fig.add_subplot(111)
    data = [list(clean)] + ([list(inputs)] if inputs else [])
    lo = min(min(d) for d in data)
    hi = max(max(d) for d in data)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 30)
    ax.hist(clean, bins=bins, alpha=0.7, color=PLAIN, label=f"clean prompts (n={len(clean)})")
    if inputs:
        ax.hist(inputs, bins=bins, alpha=0.6, color=FLAG, label=f"screened inputs (n={len(inputs)})")
    if result.input_threshold is not None:
        ax.axvline(result.input_threshold, color=LINE, ls="--", lw=1, label=f"flag above {result.input_threshold:.3g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("prompts")
    ax.set_title(f"{result.scanner}: model-level score {result.score:.3g} ({result.threshold_text()})", fontsize=10)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_result(result: ScanResult, folder: Path, *, inputs: dict[str, Any] | None = None,
                class_names: Sequence[str] | None = None) -> Path | None:
    """The figure of one scanner's result, or None when it has nothing to draw."""
    path = folder / f"scan_{result.scanner}.png"
    if result.scanner == "ulrl" and "z" in result.evidence:
        return plot_ulrl(result, path, class_names)
    screened = (inputs or {}).get("scores")
    if result.scanner == "consistency" and "clean_scores" in result.evidence:
        return plot_input_scores(result, path, clean=result.evidence["clean_scores"], inputs=screened,
                                 xlabel="consecutive-layer inconsistency, mean(1 - cos)")
    if result.scanner == "confguard" and "clean_runs" in result.evidence:
        return plot_input_scores(result, path, clean=result.evidence["clean_runs"], inputs=screened,
                                 xlabel="longest run of tokens with top-1 probability above the threshold")
    return None


__all__ = ["plot_input_scores", "plot_result", "plot_ulrl"]
