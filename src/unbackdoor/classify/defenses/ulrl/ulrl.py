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
from ....core.errors import ModelError
from ....core.runs import Phases, RunDir, as_run_dir
from ....core.seeds import generator
from ...batching import Prepare, as_inputs_labels, default_prepare, model_device, take, to_device
from ...loop import EpochLog, fit_sgd
from ...models import forward_logits
from ..common import check_clean_data, head_of
from .config import ULRLConfig, scored_layer, stop_accuracy
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
    cos = F.cosine_similarity(weight.index_select(0, idx).flatten(1),
                              original.detach().to(weight.device).index_select(0, idx).flatten(1), dim=1)
    if mode == "positive":
        cos = cos.clamp(min=0.0)
    return cos.sum()


@torch.no_grad()
def reinit_rows(head: nn.Module, rows: Sequence[int], gen: torch.Generator) -> None:
    """Re-initialise output neurons ``rows`` of a Linear (rows) or Conv2d (filters) uniformly in
    ``+-sqrt(2 / fan_in)`` and zero their biases."""
    if not rows:
        return
    w = head.weight
    bound = math.sqrt(2.0 / w[0].numel())
    new = (torch.rand(len(rows), *w.shape[1:], generator=gen) * 2 - 1) * bound
    idx = torch.as_tensor(list(rows), dtype=torch.long, device=w.device)
    w.index_copy_(0, idx, new.to(w.device, w.dtype))
    if getattr(head, "bias", None) is not None:
        head.bias.index_fill_(0, idx, 0.0)


@torch.no_grad()
def feeding_layer(model: nn.Module, head_name: str, head: nn.Linear, inputs: Any,
                  prepare: Prepare | None = None) -> str:
    """The layer whose output neurons feed the head: the last Linear / Conv2d run before it (one forward of
    two clean samples) with ``head.in_features`` outputs (BERT ``bert.pooler.dense``, VGG ``classifier.3``,
    PreActResNet ``layer4.N.conv2``)."""
    order: list[str] = []
    hooks = []
    for name, mod in model.named_modules():
        if name != head_name and isinstance(mod, (nn.Linear, nn.Conv2d)):
            width = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
            if width == head.in_features:
                hooks.append(mod.register_forward_hook(lambda _m, _a, _o, n=name: order.append(n)))
    was = model.training
    model.eval()
    try:
        forward_logits(model, to_device((prepare or default_prepare)(take(inputs, slice(0, 2))), model_device(model)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    if not order:
        raise ModelError(f"no Linear or Conv2d with {head.in_features} outputs runs before the head {head_name}",
                         where=type(model).__name__, fix="use --neurons head, or --head to name another layer")
    return order[-1]


def neuron_cap(cfg: ULRLConfig, scored: str, n: int) -> int:
    """How many suspicious neurons are kept: the paper's 2 head rows, or a fraction of a feeding layer."""
    return cfg.max_neurons if scored == "head" else max(cfg.max_neurons, math.ceil(cfg.feeding_max_fraction * n))


# ---- the three phases -----------------------------------------------------------------------------

def unlearn(model: nn.Module, data: Any, cfg: ULRLConfig, *, seed: int = 0, prepare: Prepare | None = None,
            num_classes: int | None = None) -> dict[str, Any]:
    """Gradient ASCENT on the clean subset, in place, until an epoch's running accuracy is <= the stop
    threshold (``config.stop_accuracy`` for ``num_classes``: the paper's 0.2 from 10 classes up).

    Returns the trace ``{"step", "acc", "loss", "epoch_acc", "epoch_loss", "epochs", "reached"}``
    (running accuracy and running cross-entropy within the epoch after each step; ``reached`` says
    whether the threshold was met).
    """
    trace: dict[str, Any] = {"step": [], "acc": [], "loss": [], "epoch_acc": [], "epoch_loss": []}

    def on_step(step: int, acc: float, loss: float) -> None:
        trace["step"].append(step)
        trace["acc"].append(acc)
        trace["loss"].append(-loss)  # fit reports the optimised (negated) loss

    stop_acc = stop_accuracy(cfg, num_classes if num_classes is not None else cfg.head_min_classes)
    logs = fit_sgd(model, data, epochs=cfg.unlearn_max_epochs, batch_size=cfg.batch_size, lr=cfg.unlearn_lr,
                   momentum=cfg.unlearn_momentum, weight_decay=cfg.unlearn_weight_decay, scheduler="multistep",
                   milestones=cfg.unlearn_milestones, gamma=cfg.unlearn_gamma, clip=cfg.unlearn_clip,
                   augment=cfg.augment, seed=seed, loss_fn=lambda z, y: -F.cross_entropy(z, y), on_step=on_step,
                   stop=lambda _e, lg: lg.acc <= stop_acc, prepare=prepare, desc="ULRL unlearn",
                   optimizer=cfg.optimizer)
    trace["epoch_acc"] = [lg.acc for lg in logs]
    trace["epoch_loss"] = [-lg.loss for lg in logs]
    trace["epochs"] = len(logs)
    trace["stop_acc"] = stop_acc
    trace["reached"] = bool(logs and logs[-1].acc <= stop_acc)
    if not trace["reached"]:
        log.warning("ULRL: clean accuracy still %.3f after %d unlearning epochs (threshold %.3f); the neuron scores "
                    "may be weak", logs[-1].acc, len(logs), stop_acc)
    return trace


def relearn(original: nn.Module, head_name: str, rows: Sequence[int], data: Any, cfg: ULRLConfig, *,
            seed: int = 0, prepare: Prepare | None = None, train: bool = True,
            classes: bool = True) -> tuple[nn.Module, list[EpochLog]]:
    """A copy of the ORIGINAL model with ``rows`` of layer ``head_name`` re-initialised, trained on
    CE + alpha x cosine penalty. ``classes``: the rows are head rows (one per class), so the class weight
    applies to them; False for the neurons of an inner layer.

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
    if rows and classes and cfg.reinit_class_weight != 1.0:
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
                   desc="ULRL relearn", optimizer=cfg.optimizer)
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
    layer: str = ""
    scored: str = "head"
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def status(self) -> str:
        """``ok`` when neurons were re-initialised, else the selection's status (``no_suspect``, ``mad_zero``)."""
        return "ok" if self.selection.selected else (self.selection.status if self.selection.status != "ok"
                                                     else "no_suspect")

    def to_json(self) -> dict[str, Any]:
        return {"head": self.head, "layer": self.layer or self.head, "scored": self.scored,
                "num_classes": self.num_classes, "clean_samples": self.clean_samples, "status": self.status,
                "warnings": list(self.warnings), "selection": self.selection.to_json(),
                "unlearn_epochs": self.trace.get("epochs"), "unlearn_reached": self.trace.get("reached"),
                "unlearn_stop_acc": self.trace.get("stop_acc"), "relearn_log": self.relearn_log,
                "timings": self.timings, "config": self.config}


NO_SUSPECT = "ULRL found no suspicious neuron: this result is plain finetuning"


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
    scored = scored_layer(cfg, num_classes)
    layer_name = head_name if scored == "head" else feeding_layer(model, head_name, head, inputs, prepare)
    phases = Phases(run_dir)

    with phases("unlearn"):
        weight_before = model.get_submodule(layer_name).weight.detach().clone()
        unlearned = copy.deepcopy(model)
        trace = unlearn(unlearned, clean_data, cfg, seed=seed, prepare=prepare, num_classes=num_classes)
    with phases("select"):
        scores = neuron_scores(weight_before, unlearned.get_submodule(layer_name).weight)
        selection = select_suspicious(scores, cfg.z_threshold, neuron_cap(cfg, scored, len(scores)))
        del unlearned
    warnings = _warnings(selection, trace, scored, num_classes)
    log.info("ULRL: %s neurons of %s, top scores %s, selected %s (%s)", scored, layer_name,
             [round(s, 3) for s in sorted(selection.scores, reverse=True)[:5]], selection.selected, selection.status)
    if run_dir is not None:
        run_dir.write_json("unlearn_trace.json", trace)
        run_dir.write_json("ulrl_selection.json", {**selection.to_json(), "head": head_name, "layer": layer_name,
                                                   "scored": scored, "warnings": warnings})
    with phases("relearn"):
        purified, logs = relearn(model, layer_name, selection.selected, clean_data, cfg, seed=seed, prepare=prepare,
                                 classes=scored == "head")
    report = ULRLReport(head=head_name, num_classes=num_classes, clean_samples=int(labels.shape[0]), trace=trace,
                        selection=selection, relearn_log=[dataclasses.asdict(lg) for lg in logs],
                        timings=phases.timings, config=to_dict(cfg), layer=layer_name, scored=scored,
                        warnings=warnings)
    for w in warnings:
        log.warning("ULRL: %s", w)
    return purified, report


def _warnings(selection: Selection, trace: dict[str, Any], scored: str, num_classes: int) -> list[str]:
    """What a reader of the result must know: no suspect (plain finetuning), a stop rule never reached."""
    out = []
    if not selection.selected:
        why = {"mad_zero": "the scores had no spread (MAD = 0)",
               "no_suspect": "no score passed the outlier rule"}.get(selection.status, selection.status)
        hint = (" (with 2 classes the two head rows always get z = 0.674: use --neurons feeding)"
                if scored == "head" and num_classes == 2 else "")
        out.append(f"{NO_SUSPECT} ({why}{hint})")
    if scored == "head" and num_classes < 10:
        out.append(f"the paper's rule scores the head rows, built for 10+ classes; this model has {num_classes} "
                   "(preset few-class or encoder scores the neurons feeding the head and stops relative to chance)")
    if not trace.get("reached"):
        out.append(f"unlearning never reached its stop accuracy {trace.get('stop_acc', 0):.3f} "
                   f"(last epoch: {trace['epoch_acc'][-1] if trace.get('epoch_acc') else float('nan'):.3f}); "
                   "the neuron scores may not point at the backdoor")
    return out


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False
