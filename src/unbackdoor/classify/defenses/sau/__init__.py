"""SAU: shared adversarial unlearning (Wei et al., NeurIPS 2023).

A backdoor trigger is an adversarial perturbation that fools the backdoored model; SAU removes
the ones the defended model still SHARES with the original (reference) model. Per clean batch:

1. **Shared adversarial example** (:func:`shared_pgd`): a per-image perturbation in an L-inf ball
   (0.2, starting at the ball's corner +0.2, 5 signed steps of 0.2) minimising
   ``beta_1 L_adv + beta_2 L_share`` where ``L_adv`` is minus the cross-entropy of the images not yet
   misclassified by each model and ``L_share`` the Jensen-Shannon divergence between the two models'
   predictions on the images not yet fooled into the SAME wrong class by both.
2. **Unlearning** step (Adam lr 1e-4) on ``lmd_1 CE(clean) + lmd_2 CE(adversarial) + lmd_3 L_sar``,
   where ``L_sar`` (:func:`shared_risk_loss`) lowers the defended model's probability of the class
   the reference model was fooled into, on the images that fooled the reference.

Defaults are BackdoorBench's (the first author's implementation): batch 256, 100 rounds, no
augmentation, both models in eval mode, perturbations in pixel space and not clipped to [0, 1].
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ....core.config import check, check_non_negative, check_positive, option, to_dict
from ....core.defense import DefenseSpec, Needs
from ....core.progress import progress
from ....core.runs import Phases, RunDir, as_run_dir
from ...batching import Prepare, model_device
from ...models import forward_logits
from ..common import DefenseReport, checked_labels, image_batches, image_tensor, trainable_copy


@dataclass
class SAUConfig:
    """SAU settings (BackdoorBench's CIFAR-10 config, by the paper's first author)."""

    rounds: int = option(100, "passes over the clean subset (n_rounds: 100)")
    batch_size: int = option(256, "clean images per batch (256)")
    lr: float = option(1e-4, "Adam learning rate of the unlearning step (1e-4)")
    norm_bound: float = option(0.2, "L-inf bound of the shared perturbation, pixel scale (trigger_norm: 0.2)")
    adv_lr: float = option(0.2, "signed step of the perturbation (adv_lr: 0.2)")
    adv_steps: int = option(5, "perturbation steps per batch, fewer once every image is a shared example (5)")
    pgd_init: Literal["max", "min", "zero"] = option("max", "perturbation start: +bound, -bound or 0 (max)")
    beta_1: float = option(0.01, "weight of the adversarial loss while perturbing (0.01)")
    beta_2: float = option(1.0, "weight of the sharing (JS divergence) loss while perturbing (1)")
    lmd_1: float = option(1.0, "weight of the clean cross-entropy while unlearning (1)")
    lmd_2: float = option(0.0, "weight of adversarial-training cross-entropy while unlearning (0: off)")
    lmd_3: float = option(1.0, "weight of the shared adversarial risk while unlearning (1)")
    train_mode: bool = option(False, "batch statistics in the unlearning forward pass (False: frozen, as released)")
    min_clean_per_class: int = option(5, "refuse clean subsets smaller than this many samples per class")

    def __post_init__(self) -> None:
        check_positive(self, "rounds", "batch_size", "lr", "adv_steps", "adv_lr")
        check_non_negative(self, "norm_bound", "beta_1", "beta_2", "lmd_1", "lmd_2", "lmd_3",
                           "min_clean_per_class")
        check(self.pgd_init in ("max", "min", "zero"), "pgd_init", self.pgd_init, "max, min or zero", type(self).__name__)


# ---- the pieces (pure functions of logits) ---------------------------------------------------------

def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence of the two softmaxes (probabilities clamped at 1e-8, as released)."""
    p, q = F.softmax(logits_a, 1).clamp(min=1e-8), F.softmax(logits_b, 1).clamp(min=1e-8)
    m = 0.5 * (p + q)
    return (0.5 * (p * (p.log() - m.log())) + 0.5 * (q * (q.log() - m.log()))).sum(1)


def perturbation_loss(logits: torch.Tensor, logits_ref: torch.Tensor, labels: torch.Tensor, own: torch.Tensor,
                      own_ref: torch.Tensor, beta_1: float, beta_2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``beta_1 L_adv + beta_2 L_share`` on perturbed logits, and the mask of images already shared examples.

    ``own``/``own_ref``: each model's prediction on the clean images. An image fools a model when
    its perturbed prediction differs from that; it is shared when it fools both into one class.
    """
    n = labels.shape[0]
    pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
    fooled, fooled_ref = pred != own, pred_ref != own_ref
    shared = fooled & fooled_ref & (pred == pred_ref)
    ce, ce_ref = F.cross_entropy(logits, labels, reduction="none"), F.cross_entropy(logits_ref, labels, reduction="none")
    loss_adv = -((ce * (~fooled)).sum() + (ce_ref * (~fooled_ref)).sum()) / 2 / n
    loss_share = (js_divergence(logits, logits_ref) * (~shared)).sum() / n
    return beta_1 * loss_adv + beta_2 * loss_share, shared


def shared_pgd(model: nn.Module, reference: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SAUConfig) -> torch.Tensor:
    """The shared adversarial perturbation of batch ``x`` (per image, L-inf <= ``norm_bound``)."""
    start = {"max": cfg.norm_bound, "min": -cfg.norm_bound, "zero": 0.0}[cfg.pgd_init]
    delta = torch.full_like(x, start).clamp(-cfg.norm_bound, cfg.norm_bound)
    with torch.no_grad():
        own, own_ref = forward_logits(model, x).argmax(1), forward_logits(reference, x).argmax(1)
    for _ in range(cfg.adv_steps):
        delta.requires_grad_(True)
        loss, shared = perturbation_loss(forward_logits(model, x + delta), forward_logits(reference, x + delta), y,
                                         own, own_ref, cfg.beta_1, cfg.beta_2)
        (grad,) = torch.autograd.grad(loss, [delta])
        delta = (delta.detach() - cfg.adv_lr * grad.sign()).clamp(-cfg.norm_bound, cfg.norm_bound)
        if bool(shared.all()):
            break
    return delta.detach()


def shared_risk_loss(logits_adv: torch.Tensor, logits_adv_ref: torch.Tensor, logits_clean_ref: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
    """``L_sar``: on images whose perturbation fooled the reference model (wrong AND changed), ``-log(1 - p)``
    of the defended model's probability ``p`` of the reference's (wrong) class, averaged over the batch.

    As released, ``-log(1 - p)`` is the mean of ``-log(1e-6 + min(1 - p, 0.999))`` and
    ``-log(1 + 1e-6 - max(p, 0.001))`` (the same in exact arithmetic, steadier in floating point).
    """
    pred_ref = logits_adv_ref.argmax(1)
    poison = (pred_ref != labels) & (pred_ref != logits_clean_ref.argmax(1))
    if not bool(poison.any()):
        return logits_adv.sum() * 0.0
    p = F.softmax(logits_adv, 1).gather(1, pred_ref[:, None])[:, 0][poison]
    neg = (1 - p).clamp(max=0.999)
    loss = (-torch.log(1e-6 + neg).sum() - torch.log(1 + 1e-6 - p.clamp(min=0.001)).sum()) / 2
    return loss / labels.shape[0]


def run_sau(model: nn.Module, clean_data: Any, cfg: SAUConfig | None = None, run_dir: RunDir | str | None = None, *,
            num_classes: int | None = None, seed: int = 0, prepare: Prepare | None = None
            ) -> tuple[nn.Module, DefenseReport]:
    """SAU on a copy of ``model`` (the reference is a frozen copy of the input model)."""
    cfg = cfg or SAUConfig()
    image_tensor(clean_data, "SAU")
    labels, _ = checked_labels(model, clean_data, num_classes, cfg.min_clean_per_class, "SAU")
    phases = Phases(as_run_dir(run_dir))
    out, reference = trainable_copy(model), copy.deepcopy(model)
    for p in reference.parameters():
        p.requires_grad_(False)
    out.eval()
    reference.eval()
    opt = torch.optim.Adam(out.parameters(), lr=cfg.lr)
    batches = image_batches(clean_data, cfg.batch_size, seed, prepare, False, model_device(out))
    history = []
    with phases("unlearn"):
        for rnd in progress(range(cfg.rounds), desc="SAU rounds"):
            totals = {"loss": 0.0, "shared_risk": 0.0, "ref_fooled": 0}
            seen = 0
            for x, y in batches(rnd):
                delta = shared_pgd(out, reference, x, y, cfg)
                adv = x + delta
                if cfg.train_mode:
                    out.train()
                logits, logits_adv = forward_logits(out, torch.cat([x, adv])).split(x.shape[0])
                out.eval()
                with torch.no_grad():
                    ref_clean, ref_adv = forward_logits(reference, x), forward_logits(reference, adv)
                sar = shared_risk_loss(logits_adv, ref_adv, ref_clean, y)
                loss = (cfg.lmd_1 * F.cross_entropy(logits, y) + cfg.lmd_2 * F.cross_entropy(logits_adv, y)
                        + cfg.lmd_3 * sar)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                totals["loss"] += float(loss.detach()) * len(y)
                totals["shared_risk"] += float(sar.detach()) * len(y)
                ref_pred = ref_adv.argmax(1)
                totals["ref_fooled"] += int(((ref_pred != y) & (ref_pred != ref_clean.argmax(1))).sum())
                seen += len(y)
            history.append({"round": rnd + 1, "loss": totals["loss"] / seen,
                            "shared_risk": totals["shared_risk"] / seen, "ref_fooled": totals["ref_fooled"] / seen})
    return out, DefenseReport("sau", int(labels.shape[0]), phases.timings, {"history": history}, to_dict(cfg))


SPEC = DefenseSpec(
    name="sau", kind="classify", config=SAUConfig, run=run_sau, needs=Needs(trains=True),
    summary="shared adversarial unlearning: unlearn the adversarial examples shared with the original (Wei et al. 2023)",
    paper="Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared Adversarial Examples (NeurIPS 2023)",
    presets={"short": {"rounds": 20}},  # a fifth of the paper's rounds: the tiny-world table's CPU budget
    budgets={"demo": {"rounds": 10}, "smoke": {"rounds": 1}},
)
