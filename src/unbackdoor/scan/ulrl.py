"""ULRL as a scanner: unlearn on clean data and ask whether one head row moved far more than the others.

ULRL's premise (SPEC section 3): maximising the loss on clean data makes a backdoored network fall
back on its shortcut, so the head row of the target class changes far more than the others. The
scanner runs ULRL's unlearning phase on a copy of the model, scores each head row by how far it moved
(``neuron_scores``) and applies the MAD rule (``select_suspicious``). The model-level score is the
largest robust z among the rows that moved more than the median; the verdict is ``score > z_threshold``
(ULRL's own 3.5); the suspected target is that row. ``p_value`` calibrates the score against the same
scanner on clean models, when a null sample is given.

With 2 classes the MAD rule cannot single out a row (both get z = 0.674, SPEC section 5): the scanner
returns no verdict.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from ..classify.batching import as_inputs_labels
from ..classify.defenses.common import check_clean_data, head_of, num_classes_of
from ..classify.defenses.ulrl import ULRLConfig, neuron_scores, select_suspicious, unlearn
from ..core.config import check_positive, option
from ..core.defense import Needs
from .spec import ScannerSpec, ScanResult
from .stats import empirical_p_value

log = logging.getLogger("unbackdoor")


@dataclass
class ULRLScanConfig:
    """The unlearning and the outlier rule; defaults are ULRL's (paper) except where noted."""

    z_threshold: float = option(3.5, "the model is flagged when a head row's robust z exceeds this (ULRL: 3.5)")
    unlearn_lr: float = option(0.01, "SGD learning rate of the unlearning (gradient ascent) (ULRL: 0.01)")
    unlearn_max_epochs: int = option(20, "at most this many unlearning epochs (ULRL: 20)")
    unlearn_stop_acc: float = option(0.2, "stop once an epoch's running clean accuracy is <= this (ULRL: 0.2)")
    batch_size: int = option(128, "minibatch size (ULRL: 128)")
    augment: bool = option(True, "random crop + flip while unlearning (ULRL: on)")
    head: str | None = option(None, "dotted path of the classifier head (default: found automatically)")
    min_clean_per_class: int = option(5, "refuse clean subsets smaller than this many samples per class")

    def __post_init__(self) -> None:
        check_positive(self, "z_threshold", "unlearn_lr", "unlearn_max_epochs", "batch_size")

    def ulrl(self) -> ULRLConfig:
        """The ULRL config whose unlearning this scanner runs."""
        return ULRLConfig(unlearn_lr=self.unlearn_lr, unlearn_max_epochs=self.unlearn_max_epochs,
                          unlearn_stop_acc=self.unlearn_stop_acc, batch_size=self.batch_size, augment=self.augment,
                          head=self.head, z_threshold=self.z_threshold, max_neurons=1,
                          min_clean_per_class=self.min_clean_per_class)


def decide(z: Sequence[float], scores: Sequence[float], median: float, z_threshold: float) -> tuple[float, int | None]:
    """``(score, suspected target)``: the largest z among rows that moved more than the median (pure).

    No row above the median (every row moved the same): score 0, no target.
    """
    above = [i for i in range(len(z)) if scores[i] > median]
    if not above:
        return 0.0, None
    best = max(above, key=lambda i: (z[i], scores[i], -i))
    return float(z[best]), best


def scan_ulrl(model: nn.Module, clean: Any, cfg: ULRLScanConfig | None = None, *, tokenizer: Any = None,
              seed: int = 0, null: Sequence[float] | None = None, num_classes: int | None = None,
              prepare: Any = None) -> ScanResult:
    """Unlearn a copy of ``model`` on ``clean`` and judge its head-row scores (the model is never modified)."""
    cfg = cfg or ULRLScanConfig()
    _, labels = as_inputs_labels(clean)
    k = num_classes_of(labels, num_classes)
    head_name, head = head_of(model, k, cfg.head)
    check_clean_data(labels, k, cfg.min_clean_per_class, "the ULRL scanner")
    settings = dataclasses.asdict(cfg)
    if head.out_features < 3:
        return ScanResult("ulrl", "classify", None, 0.0, cfg.z_threshold, status="abstain: 2 classes (the MAD rule "
                          "gives both head rows z = 0.674 whatever they moved)", config=settings)
    before = head.weight.detach().clone()
    unlearned = copy.deepcopy(model)
    trace = unlearn(unlearned, clean, cfg.ulrl(), seed=seed, prepare=prepare)
    scores = neuron_scores(before, unlearned.get_submodule(head_name).weight)
    sel = select_suspicious(scores, cfg.z_threshold, 1)
    score, target = decide(sel.z, sel.scores, sel.median, cfg.z_threshold)
    status = "ok" if trace["reached"] else (f"weak: clean accuracy never fell to {cfg.unlearn_stop_acc} in "
                                            f"{trace['epochs']} unlearning epochs")
    if head.out_features < 10:
        status += f"; {head.out_features} classes (the MAD rule is built for 10+)"
    p = empirical_p_value(score, null) if null else None
    return ScanResult(
        "ulrl", "classify", verdict=score > cfg.z_threshold, score=score, threshold=cfg.z_threshold, status=status,
        target=target if score > cfg.z_threshold else None, p_value=p, null={"n": len(null)} if null else None,
        evidence={"head": head_name, "scores": sel.scores, "z": sel.z, "median": sel.median, "mad": sel.mad,
                  "scale_kind": sel.scale_kind, "mad_status": sel.status, "top_row": target,
                  "unlearn_epochs": trace["epochs"], "unlearn_reached": trace["reached"],
                  "unlearn_epoch_acc": trace["epoch_acc"]},
        config=settings)


SPEC = ScannerSpec(
    name="ulrl", kind="classify", config=ULRLScanConfig, run=scan_ulrl,
    summary="unlearn on clean data; the head row that moved most (robust z) flags the model and names the target",
    paper="ULRL's unlearning phase and MAD rule, read as a model-level detector",
    needs=Needs(trains=False, clean_data=True),
)

__all__ = ["SPEC", "ULRLScanConfig", "decide", "scan_ulrl"]
