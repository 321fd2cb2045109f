"""ANP: adversarial neuron pruning (Wu & Wang, NeurIPS 2021).

Backdoor neurons are the ones whose small perturbation changes the output most. ANP gives every
batch-norm channel a mask ``m`` in ``[0, 1]`` and a multiplicative perturbation (``delta`` on the
weight, ``xi`` on the bias, both in ``+-eps``). Each iteration on a clean batch:

1. perturbation: ``delta, xi ~ U(-eps, eps)``, then ``steps`` signed-gradient ASCENT steps of size
   ``eps / steps`` on the cross-entropy of the perturbed model;
2. mask: one SGD step (lr 0.2, momentum 0.9) on ``alpha * CE(clean) + (1 - alpha) * CE(perturbed)``,
   then clip to ``[0, 1]``.

After ``iterations`` steps the ORIGINAL model's channels with ``m <= threshold`` are pruned (their
batch-norm weight zeroed). Defaults are the released code's (eps 0.4, 1 step, alpha 0.2, lr 0.2,
2000 iterations of 128 images drawn with replacement, threshold 0.2 as in the paper). Two documented
differences from BackdoorBench: the threshold is fixed (BackdoorBench sweeps thresholds and keeps the
model with the lowest ASR on the TEST set, which a defender does not have), and, like the released
code, the perturbation is not clipped back to ``+-eps`` after its step unless ``project_noise``.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ....core.config import check, check_fraction, check_non_negative, check_positive, option, to_dict
from ....core.defense import DefenseSpec, Needs
from ....core.progress import progress
from ....core.runs import Phases, RunDir, as_run_dir
from ....core.seeds import generator
from ...batching import Prepare, as_inputs_labels, default_prepare, model_device, take
from ...loop import augmentation
from ...models import forward_logits
from ..common import DefenseReport, checked_labels
from ..neuron_mask import (MaskedBatchNorm, attach_masks, check_has_batch_norm, clip_masks, mask_parameters,
                           mask_values, noise_parameters, prune_copy, set_perturbed)

log = logging.getLogger("unbackdoor")


@dataclass
class ANPConfig:
    """ANP settings (released code / BackdoorBench CIFAR-10 defaults; threshold 0.2 as in the paper)."""

    eps: float = option(0.4, "bound of the relative neuron perturbation (anp_eps: 0.4)")
    steps: int = option(1, "signed-gradient ascent steps of the perturbation per iteration (anp_steps: 1)")
    alpha: float = option(0.2, "weight of the clean loss; 1 - alpha weighs the perturbed loss (anp_alpha: 0.2)")
    mask_lr: float = option(0.2, "SGD learning rate of the masks (0.2)")
    momentum: float = option(0.9, "SGD momentum of the masks (0.9)")
    iterations: int = option(2000, "mask updates, each on a batch drawn with replacement (nb_iter: 2000)")
    batch_size: int = option(128, "images per iteration (released code: 128; BackdoorBench: 256)")
    threshold: float = option(0.2, "prune channels whose final mask is <= this (paper: 0.2)")
    project_noise: bool = option(False, "clip the perturbation to +-eps after its ascent step (the paper's constraint; "
                                        "the released code does not clip, so one step can reach 2 eps)")
    augment: bool = option(True, "random crop + flip of image batches (the released code's training transform)")
    min_clean_per_class: int = option(5, "refuse clean subsets smaller than this many samples per class")

    def __post_init__(self) -> None:
        check_positive(self, "steps", "mask_lr", "iterations", "batch_size")
        check_non_negative(self, "eps", "momentum", "min_clean_per_class")
        check_fraction(self, "alpha", "threshold")
        check(self.momentum < 1, "momentum", self.momentum, "< 1", type(self).__name__)


# ---- the two updates (pure given the model) ----------------------------------------------------------

def perturbation_ascent(noise: list[torch.Tensor], grads: list[torch.Tensor], step: float,
                        bound: float | None) -> None:
    """One signed-gradient ascent step ``noise += step * sign(grad)`` in place, clipped to ``+-bound`` if given."""
    with torch.no_grad():
        for p, g in zip(noise, grads):
            p.add_(g.sign(), alpha=step)
            if bound is not None:
                p.clamp_(-bound, bound)


def anp_loss(loss_clean: torch.Tensor, loss_perturbed: torch.Tensor | float, alpha: float) -> torch.Tensor:
    """The mask objective ``alpha * L(clean) + (1 - alpha) * L(perturbed)``."""
    return alpha * loss_clean + (1.0 - alpha) * loss_perturbed


def anp_iteration(model: nn.Module, wrappers: dict[str, MaskedBatchNorm], x: torch.Tensor, y: torch.Tensor,
                  cfg: ANPConfig, mask_opt: torch.optim.Optimizer, gen: torch.Generator) -> tuple[float, float]:
    """One ANP iteration on batch ``(x, y)``: perturb the neurons adversarially, then update the masks.

    Returns ``(mask loss, clean accuracy of the batch)``.
    """
    noise = noise_parameters(wrappers)
    loss_rob: torch.Tensor | float = 0.0
    if cfg.eps > 0:
        with torch.no_grad():
            for p in noise:
                p.copy_(((torch.rand(p.shape, generator=gen) * 2 - 1) * cfg.eps).to(p.device, p.dtype))
        set_perturbed(wrappers, True)
        for _ in range(cfg.steps):
            loss = F.cross_entropy(forward_logits(model, x), y)
            grads = torch.autograd.grad(loss, noise)
            perturbation_ascent(noise, list(grads), cfg.eps / cfg.steps, cfg.eps if cfg.project_noise else None)
        loss_rob = F.cross_entropy(forward_logits(model, x), y)
    set_perturbed(wrappers, False)
    logits = forward_logits(model, x)
    loss = anp_loss(F.cross_entropy(logits, y), loss_rob, cfg.alpha)
    masks = mask_parameters(wrappers)
    mask_opt.zero_grad(set_to_none=True)
    for p, g in zip(masks, torch.autograd.grad(loss, masks)):
        p.grad = g
    mask_opt.step()
    clip_masks(wrappers)
    return float(loss.detach()), float((logits.detach().argmax(1) == y).float().mean())


def learn_masks(model: nn.Module, clean_data: Any, cfg: ANPConfig, *, seed: int = 0,
                prepare: Prepare | None = None) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """ANP's mask optimisation on a copy of ``model``; returns the masks and a per-500-iteration log."""
    inputs, labels = as_inputs_labels(clean_data)
    prepare = prepare or default_prepare
    work = copy.deepcopy(model)
    wrappers = attach_masks(work)
    device = model_device(work)
    work.train()  # as released: batch statistics while the masks are learned
    mask_opt = torch.optim.SGD(mask_parameters(wrappers), lr=cfg.mask_lr, momentum=cfg.momentum)
    gen = generator(seed)
    aug = augmentation(cfg.augment)
    n = int(labels.shape[0])
    history: list[dict[str, float]] = []
    loss_sum = acc_sum = 0.0
    for it in progress(range(cfg.iterations), desc="ANP masks"):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        x = prepare(take(inputs, idx))
        if aug is not None and isinstance(x, torch.Tensor) and x.ndim == 4:
            x = aug(x, gen)
        x, y = x.to(device), labels[idx].to(device)
        loss, acc = anp_iteration(work, wrappers, x, y, cfg, mask_opt, gen)
        loss_sum, acc_sum = loss_sum + loss, acc_sum + acc
        if (it + 1) % 500 == 0 or it + 1 == cfg.iterations:
            k = (it % 500) + 1
            history.append({"iteration": it + 1, "loss": loss_sum / k, "acc": acc_sum / k})
            loss_sum = acc_sum = 0.0
    return mask_values(wrappers), history


def run_anp(model: nn.Module, clean_data: Any, cfg: ANPConfig | None = None, run_dir: RunDir | str | None = None, *,
            num_classes: int | None = None, seed: int = 0, prepare: Prepare | None = None
            ) -> tuple[nn.Module, DefenseReport]:
    """Learn ANP masks on the clean subset and prune a copy of ``model`` at ``cfg.threshold``."""
    cfg = cfg or ANPConfig()
    _check(model, cfg)
    labels, _ = checked_labels(model, clean_data, num_classes, cfg.min_clean_per_class, "ANP")
    run_dir = as_run_dir(run_dir)
    phases = Phases(run_dir)
    with phases("masks"):
        masks, history = learn_masks(model, clean_data, cfg, seed=seed, prepare=prepare)
    with phases("prune"):
        out, pruned = prune_copy(model, masks, cfg.threshold, run_dir, "ANP")
    details = {**pruned, "history": history}
    return out, DefenseReport("anp", int(labels.shape[0]), phases.timings, details, to_dict(cfg))


def _check(model: nn.Module, cfg: Any) -> None:
    check_has_batch_norm(model, "ANP")


SPEC = DefenseSpec(
    name="anp", kind="classify", config=ANPConfig, run=run_anp, needs=Needs(trains=False),
    summary="adversarial neuron pruning: masks learned under neuron perturbations, pruned at 0.2 (Wu & Wang 2021)",
    paper="Adversarial Neuron Pruning Purifies Backdoored Deep Models (NeurIPS 2021)",
    presets={"backdoorbench": {"batch_size": 256},
             "short": {"iterations": 500}},  # a quarter of the paper's budget: the tiny-world table's CPU budget
    budgets={"demo": {"iterations": 300}, "smoke": {"iterations": 20}},
    check=_check,
)
