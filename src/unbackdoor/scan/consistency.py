"""Layer consistency as a detector: triggered inputs make a backdoored LM's hidden states jump between layers.

CROW's premise (SPEC section 2; measured on the tiny world, SPEC section 4: the consistency loss is
41-67% higher on triggered than on clean prompts of backdoored models). Each prompt is scored by its
consecutive-layer inconsistency, ``mean over pairs of (1 - cos(h_l, h_l+1))`` over CROW's layer range
(``lm.consistency``; each prompt's value is the mean over its real tokens). Two uses:

* a runtime filter: flag an input whose score exceeds the ``1 - input_fpr`` quantile of the clean
  prompts' scores (so about ``input_fpr`` of clean inputs are flagged);
* a model-level score over the clean set alone: how far the upper tail of the clean scores lies above
  their median, in robust sigmas (``stats.robust_tail_z``). A clean set carries no trigger, so this
  can only see a backdoor that leaks into clean prompts; the zoo measures whether it does. Clean
  models' scores are not small (the tiny world's task families give a bimodal clean distribution,
  tail z ~27 on the clean pretrained model), so the verdict needs a null: flagged above the ``1 - alpha``
  quantile of clean models of the same family (``stats.calibrated_threshold``), no verdict without one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.config import check, check_positive, option
from ..core.defense import Needs
from ..core.errors import DataError
from .spec import ScannerSpec, ScanResult
from .stats import calibrated_threshold, empirical_p_value, robust_tail_z


@dataclass
class ConsistencyScanConfig:
    """Which layers, and the two decision rules."""

    layer_start: int = option(1, "first hidden state of the range (CROW's official: hs[1:-1], no embedding pair)")
    layer_end: int = option(-1, "end of the range (negative: from the end; -1 leaves out the final-norm output)")
    input_fpr: float = option(0.05, "runtime filter: flag inputs above the (1 - this) quantile of the clean scores")
    tail_quantile: float = option(0.95, "model level: the quantile of the clean scores whose distance from the "
                                        "median is the score")
    alpha: float = option(0.05, "model level: flagged above the (1 - alpha) quantile of clean models' scores (above "
                                "all of them when fewer than 1/alpha - 1 are known; no verdict without a null)")
    max_prompts: int = option(200, "clean prompts scanned (the first N)")
    batch_size: int = option(16, "prompts per forward pass")
    template: str = option("alpaca", "prompt template, the one the model was trained with")

    def __post_init__(self) -> None:
        name = type(self).__name__
        check(0 < self.input_fpr < 1, "input_fpr", self.input_fpr, "in (0, 1)", name)
        check(0.5 < self.tail_quantile < 1, "tail_quantile", self.tail_quantile, "in (0.5, 1)", name)
        check(0 < self.alpha < 1, "alpha", self.alpha, "in (0, 1)", name)
        check_positive(self, "max_prompts", "batch_size")


def inconsistency(cosine_rows: Sequence[Sequence[float]], layer_start: int = 1, layer_end: int = -1) -> list[float]:
    """Per-prompt ``mean(1 - cos)`` over the pairs of hidden states ``hs[layer_start:layer_end]`` (pure).

    ``cosine_rows`` are ``layer_cosine_profile(per_prompt=True)`` rows: one cosine per consecutive
    pair of ALL hidden states (row[j] compares hs[j] and hs[j+1]).
    """
    from ..lm.consistency import resolve_layer_range

    out = []
    for row in cosine_rows:
        start, end = resolve_layer_range(len(row) + 1, layer_start, layer_end)
        pairs = row[start:end - 1]
        out.append(float(np.mean([1.0 - c for c in pairs])))
    return out


def score_prompts(model: Any, records: Sequence[Mapping[str, Any]], cfg: ConsistencyScanConfig | None = None, *,
                  tokenizer: Any) -> list[float]:
    """Per-input score: the prompt's consecutive-layer inconsistency (higher = more suspicious)."""
    from ..lm.evaluate import layer_cosine_profile

    cfg = cfg or ConsistencyScanConfig()
    if not records:
        raise DataError("no prompts to score", where="consistency scanner", fix="pass at least one record")
    _, rows = layer_cosine_profile(model, tokenizer, list(records), template=cfg.template, batch_size=cfg.batch_size,
                                   per_prompt=True)
    return inconsistency(rows, cfg.layer_start, cfg.layer_end)


def scan_consistency(model: Any, clean: Sequence[Mapping[str, Any]], cfg: ConsistencyScanConfig | None = None, *,
                     tokenizer: Any, seed: int = 0, null: Sequence[float] | None = None) -> ScanResult:
    """Model level: the clean scores' robust tail z, judged against a null of clean models; input level: the
    clean scores' ``1 - input_fpr`` quantile."""
    cfg = cfg or ConsistencyScanConfig()
    records = list(clean[: cfg.max_prompts])
    scores = score_prompts(model, records, cfg, tokenizer=tokenizer)
    tail = robust_tail_z(scores, cfg.tail_quantile)
    p = empirical_p_value(tail, null) if null else None
    cut = calibrated_threshold(null, cfg.alpha) if null else float("nan")
    status = "ok" if null else "uncalibrated: no null distribution of clean models like this one (pass --null)"
    if null and len(null) + 1 < 1 / cfg.alpha:
        status = f"calibrated on {len(null)} clean models: flagged only above all of them (FPR ~1/{len(null) + 1})"
    return ScanResult(
        "consistency", "lm", verdict=None if p is None else tail > cut, score=tail, threshold=cut, status=status,
        p_value=p, null={"n": len(null)} if null else None,
        input_threshold=float(np.quantile(scores, 1 - cfg.input_fpr)),
        evidence={"clean_prompts": len(records), "clean_scores": scores, "clean_median": float(np.median(scores)),
                  "clean_mean": float(np.mean(scores))},
        config={k: getattr(cfg, k) for k in cfg.__dataclass_fields__})


SPEC = ScannerSpec(
    name="consistency", kind="lm", config=ConsistencyScanConfig, run=scan_consistency, score_inputs=score_prompts,
    summary="consecutive-layer inconsistency per input (runtime filter) and the clean set's tail (model level)",
    paper="CROW's premise (Min et al., ICML 2025) read as a detector",
    needs=Needs(trains=False, clean_data=True),
)

__all__ = ["ConsistencyScanConfig", "SPEC", "inconsistency", "scan_consistency", "score_prompts"]
