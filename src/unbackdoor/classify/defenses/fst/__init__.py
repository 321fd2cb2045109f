"""FST: feature shift tuning (Min et al., NeurIPS 2023): fine-tune with a fresh head pushed away from the old one.

Plain fine-tuning fails at low poisoning rates because the backdoor and clean features stay
entangled under the old head. FST re-initialises the head (weight and bias uniform in
``+-1/sqrt(fan_in)``), trains ALL parameters on ``CE + alpha * <W, W_orig>`` (the inner product of the
new head weight with the original one, summed over every entry), and after each step rescales the
head weight to the original's Frobenius norm, so the penalty can only turn it, not shrink it.
Defaults are the official code's (SGD lr 0.01, momentum 0.9, no weight decay, cosine over 10
epochs, batch 128, alpha 0.2: the argument default; its README's CIFAR-10 example uses 0.1).
Close in spirit to ULRL, which re-initialises only the rows it finds suspicious.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ....core.config import check_non_negative, check_positive, option, to_dict
from ....core.defense import DefenseSpec, Needs
from ....core.runs import Phases, RunDir, as_run_dir
from ....core.seeds import generator
from ...batching import Prepare
from ...loop import fit_sgd
from ..common import ENCODER_RECIPE, OPTIMIZER_HELP, DefenseReport, checked_labels, head_of, trainable_copy


@dataclass
class FSTConfig:
    """FST settings (official code: lr 0.01, 10 epochs, alpha 0.2)."""

    alpha: float = option(0.2, "weight of the inner product <W, W_orig> of new and original head weights (0.2; README example 0.1)")
    lr: float = option(0.01, "SGD learning rate (0.01)")
    momentum: float = option(0.9, "SGD momentum (0.9)")
    weight_decay: float = option(0.0, "weight decay (official: none)")
    epochs: int = option(10, "epochs, cosine-annealed lr (10)")
    batch_size: int = option(128, "minibatch size (128)")
    optimizer: Literal["sgd", "adamw"] = option("sgd", OPTIMIZER_HELP)
    augment: bool = option(True, "random crop + flip on image batches")
    min_clean_per_class: int = option(5, "refuse clean subsets smaller than this many samples per class")
    head: str | None = option(None, "dotted path of the classifier head (default: found automatically)")

    def __post_init__(self) -> None:
        check_positive(self, "lr", "epochs", "batch_size")
        check_non_negative(self, "alpha", "momentum", "weight_decay", "min_clean_per_class")


def fst_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, original: torch.Tensor,
             alpha: float) -> torch.Tensor:
    """``CE(logits, labels) + alpha * sum(W * W_orig)`` (the original weight treated as a constant)."""
    return F.cross_entropy(logits, labels) + alpha * (weight * original.detach().to(weight.device)).sum()


@torch.no_grad()
def reinit_head(head: nn.Linear, gen: torch.Generator) -> None:
    """Weight and bias uniform in ``+-1/sqrt(fan_in)`` (the official re-initialisation)."""
    bound = 1.0 / math.sqrt(head.in_features)
    head.weight.copy_(((torch.rand(head.weight.shape, generator=gen) * 2 - 1) * bound).to(head.weight))
    if head.bias is not None:
        head.bias.copy_(((torch.rand(head.bias.shape, generator=gen) * 2 - 1) * bound).to(head.bias))


@torch.no_grad()
def rescale_to(weight: torch.Tensor, norm: float) -> None:
    """``W <- W * norm / ||W||_F`` in place (FST's step after every update)."""
    weight.mul_(norm / float(weight.norm()))


def run_fst(model: nn.Module, clean_data: Any, cfg: FSTConfig | None = None, run_dir: RunDir | str | None = None, *,
            num_classes: int | None = None, seed: int = 0, prepare: Prepare | None = None
            ) -> tuple[nn.Module, DefenseReport]:
    """FST on a copy of ``model`` with the clean subset."""
    cfg = cfg or FSTConfig()
    labels, k = checked_labels(model, clean_data, num_classes, cfg.min_clean_per_class, "FST", cfg.head)
    head_name, _ = head_of(model, k, cfg.head)
    phases = Phases(as_run_dir(run_dir))
    out = trainable_copy(model)
    head = out.get_submodule(head_name)
    original = head.weight.detach().clone()
    norm = float(original.norm())
    reinit_head(head, generator(seed + 5))
    with phases("train"):
        logs = fit_sgd(out, clean_data, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                       momentum=cfg.momentum, weight_decay=cfg.weight_decay, scheduler="cosine", augment=cfg.augment,
                       seed=seed, loss_fn=lambda z, y: fst_loss(z, y, head.weight, original, cfg.alpha),
                       on_step=lambda *_: rescale_to(head.weight, norm), prepare=prepare, desc="FST",
                       optimizer=cfg.optimizer)
    cos = float(F.cosine_similarity(head.weight.detach().flatten(), original.flatten(), dim=0))
    details = {"head": head_name, "train_log": [{"acc": lg.acc, "loss": lg.loss} for lg in logs],
               "head_cosine_to_original": cos}
    return out, DefenseReport("fst", int(labels.shape[0]), phases.timings, details, to_dict(cfg))


SPEC = DefenseSpec(
    name="fst", kind="classify", config=FSTConfig, run=run_fst, needs=Needs(trains=True),
    summary="feature shift tuning: re-initialised head pushed away from the original one (Min et al. 2023)",
    paper="Towards Stable Backdoor Purification through Feature Shift Tuning (NeurIPS 2023)",
    # encoder: pretrained transformers get the fine-tuning defenses' AdamW recipe (common.ENCODER_RECIPE);
    # the CNN recipe (SGD 0.01, batch 128) is one step an epoch on a 100-text clean set
    presets={"readme": {"alpha": 0.1}, "encoder": dict(ENCODER_RECIPE)},
    budgets={"demo": {"epochs": 5}, "smoke": {"epochs": 1}},
)
