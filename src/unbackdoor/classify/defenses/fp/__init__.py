"""FP: fine-pruning (Liu et al., 2018): prune the least active channels feeding the head, then fine-tune.

Channels feeding the head (for global-average-pooled networks such as PreActResNet, the last
convolutional block's channels after BN-ReLU) are ranked by their mean activation on clean data;
the least active are pruned until the clean accuracy falls below ``acc_ratio`` of the original,
then the model is fine-tuned with the mask held fixed. The mask is baked into the head's weight
columns, so the saved model is a plain state dict.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ....core.config import check_fraction, check_non_negative, check_positive, option, to_dict
from ....core.defense import DefenseSpec, Needs
from ....core.runs import Phases, RunDir, as_run_dir
from ...batching import Prepare, as_inputs_labels, default_prepare, model_device, num_samples, take, to_device
from ...models import forward_logits
from ..common import DefenseReport, check_clean_data, finetune, head_of, num_classes_of

log = logging.getLogger("unbackdoor")


@dataclass
class FPConfig:
    """Fine-pruning: prune the least active channels feeding the head, then fine-tune."""

    acc_ratio: float = option(0.9, "keep pruning while clean-subset accuracy >= this x the original (BackdoorBench fp: 0.9)")
    max_prune_ratio: float = option(0.95, "never prune more than this fraction of the channels")
    prune_step: int = option(1, "channels pruned per step (1 = the paper's one-at-a-time)")
    lr: float = option(0.01, "fine-tuning SGD learning rate")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "weight decay")
    epochs: int = option(20, "fine-tuning epochs after pruning, cosine-annealed lr")
    batch_size: int = option(128, "minibatch size")
    augment: bool = option(True, "random crop + flip on image batches while fine-tuning")
    min_clean_per_class: int = option(5, "refuse clean subsets smaller than this many samples per class")
    head: str | None = option(None, "dotted path of the classifier head (default: found automatically)")

    def __post_init__(self) -> None:
        check_positive(self, "lr", "batch_size", "prune_step")
        check_non_negative(self, "momentum", "weight_decay", "epochs", "min_clean_per_class")
        check_fraction(self, "acc_ratio", "max_prune_ratio")



@torch.no_grad()
def head_inputs(model: nn.Module, head: nn.Linear, inputs: Any, *, batch_size: int = 256,
                prepare: Prepare | None = None) -> torch.Tensor:
    """The features entering ``head`` for every clean sample, ``[N, in_features]`` (eval mode)."""
    prepare = prepare or default_prepare
    device = model_device(model)
    feats: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        feats.append(args[0].detach().float().reshape(-1, head.in_features).cpu())

    h = head.register_forward_pre_hook(hook)
    was = model.training
    model.eval()
    try:
        n = num_samples(inputs)
        for s in range(0, n, batch_size):
            forward_logits(model, to_device(prepare(take(inputs, slice(s, s + batch_size))), device))
    finally:
        h.remove()
        model.train(was)
    return torch.cat(feats)


def prune_order(activation: torch.Tensor) -> list[int]:
    """Channels from least to most active (ties: lower index first)."""
    return sorted(range(activation.numel()), key=lambda i: (float(activation[i]), i))


def prune_until(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                acc_ratio: float, max_prune_ratio: float, step: int = 1) -> tuple[list[int], list[dict[str, float]]]:
    """Fine-pruning's search, exact and cheap: the head is linear, so the accuracy with a channel mask
    ``m`` is that of ``(features * m) @ W.T + b`` -- no network forward per step.

    Prunes channels from least to most active (mean clean activation) while the clean accuracy
    stays >= ``acc_ratio`` x the unpruned accuracy, at most ``max_prune_ratio`` of them.
    """
    w = weight.detach().float().cpu()
    b = bias.detach().float().cpu() if bias is not None else torch.zeros(w.shape[0])
    mask = torch.ones(w.shape[1])

    def acc() -> float:
        return float((((features * mask) @ w.T + b).argmax(1) == labels).float().mean())

    base = acc()
    order = prune_order(features.mean(0))
    limit = int(max_prune_ratio * len(order))
    pruned: list[int] = []
    trace = [{"pruned": 0, "acc": base}]
    i = 0
    while i < limit:
        chunk = order[i:min(i + step, limit)]
        mask[chunk] = 0.0
        a = acc()
        trace.append({"pruned": i + len(chunk), "acc": a})
        if a < acc_ratio * base:
            break  # this step went too far: it is not kept
        pruned += chunk
        i += len(chunk)
    return pruned, trace


def run_fp(model: nn.Module, clean_data: Any, cfg: FPConfig | None = None, run_dir: RunDir | str | None = None, *,
           num_classes: int | None = None, seed: int = 0, prepare: Prepare | None = None) -> tuple[nn.Module, DefenseReport]:
    """Fine-pruning of a copy of ``model`` (see the module docstring)."""
    cfg = cfg or FPConfig()
    inputs, labels = as_inputs_labels(clean_data)
    k = num_classes_of(labels, num_classes)
    out = copy.deepcopy(model)
    head_name, head = head_of(out, k, cfg.head)
    check_clean_data(labels, k, cfg.min_clean_per_class, "FP")
    phases = Phases(as_run_dir(run_dir))
    with phases("prune"):
        feats = head_inputs(out, head, inputs, prepare=prepare)
        pruned, trace = prune_until(feats, labels, head.weight, head.bias, cfg.acc_ratio, cfg.max_prune_ratio,
                                    cfg.prune_step)
    mask = torch.ones(head.in_features, device=head.weight.device)
    mask[pruned] = 0.0
    log.info("FP: pruned %d of %d channels feeding %s (clean-subset acc %.3f -> %.3f)", len(pruned),
             head.in_features, head_name, trace[0]["acc"], trace[len(pruned)]["acc"] if pruned else trace[0]["acc"])
    h = head.register_forward_pre_hook(lambda _m, args: (args[0] * mask,) + tuple(args[1:]))
    try:
        with phases("train"):
            logs = finetune(out, clean_data, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                             epochs=cfg.epochs, batch_size=cfg.batch_size, augment=cfg.augment, seed=seed, prepare=prepare)
    finally:
        h.remove()
    with torch.no_grad():  # bake the mask: head(x * m) == (W * m) x + b exactly
        head.weight.mul_(mask.view(1, -1))
    details = {"head": head_name, "pruned": sorted(pruned), "num_channels": head.in_features, "prune_trace": trace,
               "train_log": logs}
    return out, DefenseReport("fp", int(labels.shape[0]), phases.timings, details, to_dict(cfg))


SPEC = DefenseSpec(
    name="fp", kind="classify", config=FPConfig, run=run_fp, needs=Needs(trains=True),
    summary="fine-pruning: prune dormant channels feeding the head, then fine-tune (Liu et al. 2018)",
    paper="Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks (RAID 2018)",
    budgets={"demo": {"epochs": 10}, "smoke": {"epochs": 2}},
)
