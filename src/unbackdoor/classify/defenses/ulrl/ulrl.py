"""ULRL: unlearn on clean data, find the output neurons that moved most, relearn without them.

The idea (SPEC section 3): maximising the loss on clean data makes a backdoored network fall
back on its shortcut, so the head row of the target class changes far more than the others.
Those rows are found with a robust outlier rule (median / MAD), re-initialised in the ORIGINAL
model, and the whole model is relearned on the clean subset while a cosine penalty keeps the
new rows away from their old direction. The unlearned model only picks the neurons.

Every constant of the paper is a :class:`ULRLConfig` value. Two documented departures from the
official code: neurons are capped by largest score (the release keeps the lowest indices), and
the head is found generically (``models.find_head``) instead of by a fixed attribute name.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ....core.config import to_dict
from ....core.runs import Phases, RunDir, as_run_dir
from ....core.seeds import generator
from ...batching import Prepare, as_inputs_labels
from ...loop import EpochLog, fit_sgd
from ..common import check_clean_data, head_of
from .config import ULRLConfig
from .selection import Selection, neuron_scores, select_suspicious

log = logging.getLogger("unbackdoor")


# ---- relearning pieces (pure) -----------------------------------------------------------------

def cosine_penalty(weight: torch.Tensor, original: torch.Tensor, rows: Sequence[int],
                   mode: Literal["signed", "positive"] = "signed") -> torch.Tensor:
    """``sum_i cos(W_i, W_i_orig)`` over ``rows`` (signed), or ``sum_i max(cos, 0)`` (positive).

    Differentiable in ``weight``; ``original`` is treated as a constant. Zero for no rows.
    """
    if len(rows) == 0:
        return weight.sum() * 0.0
    idx = torch.as_tensor(list(rows), dtype=torch.long, device=weight.device)
    cos = F.cosine_similarity(weight.index_select(0, idx), original.detach().to(weight.device).index_select(0, idx), dim=1)
    if mode == "positive":
        cos = cos.clamp(min=0.0)
    return cos.sum()


@torch.no_grad()
def reinit_rows(head: nn.Linear, rows: Sequence[int], gen: torch.Generator) -> None:
    """Re-initialise ``rows`` of ``head`` uniformly in ``+-sqrt(2 / fan_in)`` and zero their biases."""
    if not rows:
        return
    bound = math.sqrt(2.0 / head.in_features)
    new = (torch.rand(len(rows), head.in_features, generator=gen) * 2 - 1) * bound
    idx = torch.as_tensor(list(rows), dtype=torch.long, device=head.weight.device)
    head.weight.index_copy_(0, idx, new.to(head.weight.device, head.weight.dtype))
    if head.bias is not None:
        head.bias.index_fill_(0, idx, 0.0)


# ---- the three phases -----------------------------------------------------------------------------

def unlearn(model: nn.Module, data: Any, cfg: ULRLConfig, *, seed: int = 0,
            prepare: Prepare | None = None) -> dict[str, Any]:
    """Gradient ASCENT on the clean subset, in place, until an epoch's running accuracy is <= stop_acc.

    Returns the trace ``{"step", "acc", "loss", "epoch_acc", "epoch_loss", "epochs", "reached"}``
    (running accuracy and running cross-entropy within the epoch after each step; ``reached`` says
    whether the threshold was met).
    """
    trace: dict[str, Any] = {"step": [], "acc": [], "loss": [], "epoch_acc": [], "epoch_loss": []}

    def on_step(step: int, acc: float, loss: float) -> None:
        trace["step"].append(step)
        trace["acc"].append(acc)
        trace["loss"].append(-loss)  # fit reports the optimised (negated) loss

    logs = fit_sgd(model, data, epochs=cfg.unlearn_max_epochs, batch_size=cfg.batch_size, lr=cfg.unlearn_lr,
                   momentum=cfg.unlearn_momentum, weight_decay=cfg.unlearn_weight_decay, scheduler="multistep",
                   milestones=cfg.unlearn_milestones, gamma=cfg.unlearn_gamma, clip=cfg.unlearn_clip,
                   augment=cfg.augment, seed=seed, loss_fn=lambda z, y: -F.cross_entropy(z, y), on_step=on_step,
                   stop=lambda _e, lg: lg.acc <= cfg.unlearn_stop_acc, prepare=prepare, desc="ULRL unlearn")
    trace["epoch_acc"] = [lg.acc for lg in logs]
    trace["epoch_loss"] = [-lg.loss for lg in logs]
    trace["epochs"] = len(logs)
    trace["reached"] = bool(logs and logs[-1].acc <= cfg.unlearn_stop_acc)
    if not trace["reached"]:
        log.warning("ULRL: clean accuracy still %.3f after %d unlearning epochs (threshold %.2f); the neuron scores "
                    "may be weak", logs[-1].acc, len(logs), cfg.unlearn_stop_acc)
    return trace


def relearn(original: nn.Module, head_name: str, rows: Sequence[int], data: Any, cfg: ULRLConfig, *,
            seed: int = 0, prepare: Prepare | None = None, train: bool = True) -> tuple[nn.Module, list[EpochLog]]:
    """A copy of the ORIGINAL model with ``rows`` re-initialised, trained on CE + alpha x cosine penalty.

    ``train=False`` returns the re-initialised copy without training (what the tests inspect).
    """
    model = copy.deepcopy(original)
    head = model.get_submodule(head_name)
    orig_weight = original.get_submodule(head_name).weight.detach().clone()
    reinit_rows(head, rows, generator(seed + 1))
    if not train:
        return model, []
    rows = list(rows)
    class_weight = None
    if rows and cfg.reinit_class_weight != 1.0:
        class_weight = torch.ones(head.out_features, device=head.weight.device)
        class_weight[rows] = cfg.reinit_class_weight

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, y, weight=class_weight)
        if rows and cfg.alpha > 0:
            loss = loss + cfg.alpha * cosine_penalty(head.weight, orig_weight, rows, cfg.penalty)
        return loss

    logs = fit_sgd(model, data, epochs=cfg.relearn_epochs, batch_size=cfg.batch_size, lr=cfg.relearn_lr,
                   momentum=cfg.relearn_momentum, weight_decay=cfg.relearn_weight_decay, scheduler="cosine",
                   clip=cfg.relearn_clip, augment=cfg.augment, seed=seed + 2, loss_fn=loss_fn, prepare=prepare,
                   desc="ULRL relearn")
    return model, logs


@dataclass
class ULRLReport:
    """What ULRL did: the chosen head, the unlearning trace, the selection, timings."""

    head: str
    num_classes: int
    clean_samples: int
    trace: dict[str, Any]
    selection: Selection
    relearn_log: list[dict[str, float]]
    timings: dict[str, float]
    config: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"head": self.head, "num_classes": self.num_classes, "clean_samples": self.clean_samples,
                "selection": self.selection.to_json(), "unlearn_epochs": self.trace.get("epochs"),
                "unlearn_reached": self.trace.get("reached"), "relearn_log": self.relearn_log,
                "timings": self.timings, "config": self.config}


def run_ulrl(model: nn.Module, clean_data: Any, cfg: ULRLConfig | None = None, run_dir: RunDir | str | None = None,
             *, num_classes: int | None = None, seed: int = 0, prepare: Prepare | None = None
             ) -> tuple[nn.Module, ULRLReport]:
    """Purify ``model`` with ULRL using only ``clean_data``; the input model is never modified.

    ``clean_data`` is an ``ImageData`` or ``(inputs, labels)`` with inputs a tensor or a dict of
    tensors. ``prepare`` maps a raw (non-ImageData) batch to model inputs (default: uint8 -> [0, 1]).
    With ``run_dir`` (a folder or RunDir) the trace, scores and selection are saved there
    (``unlearn_trace.json``, ``ulrl_selection.json``) and each phase is timed. Returns the
    relearned model and a report.
    """
    cfg = cfg or ULRLConfig()
    run_dir = as_run_dir(run_dir)
    inputs, labels = as_inputs_labels(clean_data)
    if num_classes is None:
        if cfg.head is not None:
            num_classes = int(model.get_submodule(cfg.head).out_features) if _has_submodule(model, cfg.head) else None
        if num_classes is None:
            num_classes = int(labels.max()) + 1
    head_name, head = head_of(model, num_classes, cfg.head)
    check_clean_data(labels, num_classes, cfg.min_clean_per_class)
    phases = Phases(run_dir)

    with phases("unlearn"):
        head_before = head.weight.detach().clone()
        unlearned = copy.deepcopy(model)
        trace = unlearn(unlearned, clean_data, cfg, seed=seed, prepare=prepare)
    with phases("select"):
        scores = neuron_scores(head_before, unlearned.get_submodule(head_name).weight)
        selection = select_suspicious(scores, cfg.z_threshold, cfg.max_neurons)
        del unlearned
    log.info("ULRL: head %s, scores %s, selected %s (%s)", head_name,
             [round(s, 3) for s in selection.scores], selection.selected, selection.status)
    if run_dir is not None:
        run_dir.write_json("unlearn_trace.json", trace)
        run_dir.write_json("ulrl_selection.json", {**selection.to_json(), "head": head_name})
    with phases("relearn"):
        purified, logs = relearn(model, head_name, selection.selected, clean_data, cfg, seed=seed, prepare=prepare)
    report = ULRLReport(head=head_name, num_classes=num_classes, clean_samples=int(labels.shape[0]), trace=trace,
                        selection=selection, relearn_log=[dataclasses.asdict(lg) for lg in logs],
                        timings=phases.timings, config=to_dict(cfg))
    return purified, report


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False
