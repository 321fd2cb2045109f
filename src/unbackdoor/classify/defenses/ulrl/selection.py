"""ULRL's neuron selection: the median / MAD outlier rule on how far each head row moved (pure)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import nn

from ....core.errors import ConfigError, DataError, NumericalError

MAD_TO_SIGMA = 1.4826  # 1 / Phi^-1(3/4): MAD of a normal sample -> its standard deviation
MEANAD_TO_SIGMA = 1.2533  # sqrt(pi / 2): mean absolute deviation of a normal sample -> sigma


@dataclass
class Selection:
    """The outcome of the MAD rule: every number needed to audit it."""

    scores: list[float]
    z: list[float]
    median: float
    mad: float
    scale: float  # the sigma estimate z-scores are divided by
    scale_kind: Literal["mad", "mean_abs_dev", "none"]
    threshold: float
    suspicious: list[int]  # every row passing the rule, largest z first
    selected: list[int]  # the first max_neurons of them
    status: Literal["ok", "mad_zero", "no_suspect"]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _order(z: np.ndarray, d: np.ndarray, idx: Sequence[int]) -> list[int]:
    """Largest z first; ties broken by larger raw score, then by lower index (deterministic)."""
    return sorted(idx, key=lambda i: (-z[i], -d[i], i))


def select_suspicious(scores: Sequence[float] | torch.Tensor | np.ndarray, z_threshold: float = 3.5,
                      max_neurons: int = 2) -> Selection:
    """The MAD outlier rule on per-neuron scores (SPEC section 3, step 2).

    ``z = |d - m| / (1.4826 MAD)`` with ``m`` the median (mean of the two middle values for an even
    count); a row is suspicious when ``z > z_threshold`` and ``d > m`` (rows that moved LESS than
    usual are never suspects). At most ``max_neurons`` are kept, by largest z (ties: larger score,
    then lower index).

    MAD = 0 (more than half the scores equal the median): the MAD cannot scale anything, so we fall
    back to the mean absolute deviation, scaled to a normal sigma (``1.2533 x mean|d - m|``, the usual
    modified-z-score fallback), and report ``status='mad_zero'``. If every score is equal there is
    no outlier at all: nothing is selected and the status is still ``mad_zero``.
    ``status='no_suspect'`` means the MAD was fine but no row passed the rule.
    """
    d = np.asarray(scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise DataError(f"neuron scores must be a non-empty 1-D vector, got shape {d.shape}", where="select_suspicious",
                        fix="pass one score per output neuron of the head")
    if not np.all(np.isfinite(d)):
        bad = np.flatnonzero(~np.isfinite(d)).tolist()
        raise NumericalError(f"neuron scores are not finite at rows {bad}", where="select_suspicious",
                             fix="unlearning diverged; lower unlearn_lr or unlearn_clip")
    if max_neurons < 1:
        raise ConfigError(f"max_neurons = {max_neurons}", where="select_suspicious", fix="use max_neurons >= 1")
    m = float(np.median(d))
    dev = np.abs(d - m)
    mad = float(np.median(dev))
    if mad > 0:
        scale, kind = MAD_TO_SIGMA * mad, "mad"
    else:
        mean_ad = float(dev.mean())
        scale, kind = (MEANAD_TO_SIGMA * mean_ad, "mean_abs_dev") if mean_ad > 0 else (0.0, "none")
    z = dev / scale if scale > 0 else np.zeros_like(d)
    passing = [i for i in range(d.size) if z[i] > z_threshold and d[i] > m]
    ordered = _order(z, d, passing)
    status: Literal["ok", "mad_zero", "no_suspect"]
    if mad == 0:
        status = "mad_zero"
    elif not ordered:
        status = "no_suspect"
    else:
        status = "ok"
    return Selection(scores=d.tolist(), z=z.tolist(), median=m, mad=mad, scale=scale, scale_kind=kind,
                     threshold=float(z_threshold), suspicious=ordered, selected=ordered[:max_neurons], status=status)


def neuron_scores(head_before: nn.Linear | torch.Tensor, head_after: nn.Linear | torch.Tensor) -> torch.Tensor:
    """``d_i = sum_j |W_after[i, j] - W_before[i, j]|``: how far each output row moved."""
    wb = head_before.weight if isinstance(head_before, nn.Linear) else head_before
    wa = head_after.weight if isinstance(head_after, nn.Linear) else head_after
    if wb.shape != wa.shape:
        raise DataError(f"head weights differ in shape: {tuple(wb.shape)} vs {tuple(wa.shape)}",
                        where="neuron_scores", fix="compare the same head before and after unlearning")
    return (wa.detach().float() - wb.detach().float()).abs().sum(dim=1).cpu()
