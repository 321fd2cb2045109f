"""FP: fine-pruning (Liu et al., 2018): prune the least active neurons of a late layer, then fine-tune.

CNNs: the channels feeding the head (for global-average-pooled networks such as PreActResNet, the
last convolutional block's channels after BN-ReLU). Transformers: the intermediate neurons of the
last block's feed-forward network (the input of its output projection, after the activation),
the counterpart of the paper's last convolutional layer. Neurons are ranked by their mean
activation on clean data (over real tokens); the least active are pruned until the clean
accuracy falls below ``acc_ratio`` of the original, then the model is fine-tuned with the mask held
fixed. The mask is baked into the weight columns of the layer they feed, so the saved model is a
plain state dict.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ....core.config import check_fraction, check_non_negative, check_positive, option, to_dict
from ....core.defense import DefenseSpec, Needs
from ....core.errors import ModelError
from ....core.runs import Phases, RunDir, as_run_dir
from ...batching import Prepare, as_inputs_labels, default_prepare, model_device, num_samples, take, to_device
from ...models import feed_forward_linears, forward_logits, transformer_blocks
from ..common import ENCODER_RECIPE, OPTIMIZER_HELP, DefenseReport, check_clean_data, finetune, head_of, num_classes_of

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
    optimizer: Literal["sgd", "adamw"] = option("sgd", OPTIMIZER_HELP)
    augment: bool = option(True, "random crop + flip on image batches while fine-tuning")
    min_clean_per_class: int = option(5, "refuse clean subsets smaller than this many samples per class")
    head: str | None = option(None, "dotted path of the classifier head (default: found automatically)")
    layer: str | None = option(None, "the nn.Linear whose INPUT neurons are pruned (default: the head for CNNs; for "
                                     "transformers the last block's FFN output projection, i.e. its intermediate neurons)")
    inner_step_fraction: float = option(0.05, "for a layer other than the head: neurons pruned per search step, as a "
                                              "fraction of the layer (each step is a forward pass over the clean data)")

    def __post_init__(self) -> None:
        check_positive(self, "lr", "batch_size", "prune_step", "inner_step_fraction")
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


def prune_search(order: list[int], accuracy_with: Any, acc_ratio: float, max_prune_ratio: float,
                 step: int = 1) -> tuple[list[int], list[dict[str, float]]]:
    """Fine-pruning's search: prune ``order`` (least active first) ``step`` at a time while
    ``accuracy_with(mask)`` stays >= ``acc_ratio`` x the unpruned accuracy, at most ``max_prune_ratio``
    of the neurons. The step that falls below is not kept. Returns the pruned neurons and the trace."""
    mask = torch.ones(len(order))
    base = accuracy_with(mask)
    limit = int(max_prune_ratio * len(order))
    pruned: list[int] = []
    trace = [{"pruned": 0, "acc": base}]
    i = 0
    while i < limit:
        chunk = order[i:min(i + step, limit)]
        mask[chunk] = 0.0
        a = accuracy_with(mask)
        trace.append({"pruned": i + len(chunk), "acc": a})
        if a < acc_ratio * base:
            break  # this step went too far: it is not kept
        pruned += chunk
        i += len(chunk)
    return pruned, trace


def prune_until(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                acc_ratio: float, max_prune_ratio: float, step: int = 1) -> tuple[list[int], list[dict[str, float]]]:
    """Fine-pruning's search on the head, exact and cheap: the head is linear, so the accuracy with a
    channel mask ``m`` is that of ``(features * m) @ W.T + b`` -- no network forward per step.

    Prunes channels from least to most active (mean clean activation) while the clean accuracy
    stays >= ``acc_ratio`` x the unpruned accuracy, at most ``max_prune_ratio`` of them.
    """
    w = weight.detach().float().cpu()
    b = bias.detach().float().cpu() if bias is not None else torch.zeros(w.shape[0])
    return prune_search(prune_order(features.mean(0)),
                        lambda mask: float((((features * mask) @ w.T + b).argmax(1) == labels).float().mean()),
                        acc_ratio, max_prune_ratio, step)


@torch.no_grad()
def input_means(model: nn.Module, layer: nn.Linear, inputs: Any, *, batch_size: int = 64,
                prepare: Prepare | None = None) -> torch.Tensor:
    """Mean activation of each input neuron of ``layer`` over the clean samples (and over their real
    tokens, padding excluded, when the layer sees ``[N, T, D]`` hidden states)."""
    prepare = prepare or default_prepare
    device = model_device(model)
    total = torch.zeros(layer.in_features)
    count = torch.zeros(())
    state: dict[str, Any] = {}

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().float()
        mask = state.get("mask")
        if x.ndim == 3 and mask is not None:
            w = mask.to(x.dtype).unsqueeze(-1)
            total.add_((x * w).sum((0, 1)).cpu())
            count.add_(w.sum().cpu())
        else:
            flat = x.reshape(-1, layer.in_features)
            total.add_(flat.sum(0).cpu())
            count.add_(flat.shape[0])

    h = layer.register_forward_pre_hook(hook)
    was = model.training
    model.eval()
    try:
        for s in range(0, num_samples(inputs), batch_size):
            batch = to_device(prepare(take(inputs, slice(s, s + batch_size))), device)
            state["mask"] = batch.get("attention_mask") if isinstance(batch, dict) else None
            forward_logits(model, batch)
    finally:
        h.remove()
        model.train(was)
    return total / count.clamp(min=1)


def prune_target(model: nn.Module, head_name: str, head: nn.Linear, layer: str | None) -> tuple[str, nn.Linear]:
    """The Linear whose input neurons are pruned: ``layer``, else the head for CNNs (the channels feeding it),
    else the last transformer block's FFN output projection (its input = the FFN's intermediate neurons)."""
    if layer:
        try:
            mod = model.get_submodule(layer)
        except AttributeError:
            mod = None
        if not isinstance(mod, nn.Linear):
            raise ModelError(f"FP layer '{layer}' is not an nn.Linear of the model", where="FPConfig.layer",
                             fix="name a Linear whose input neurons should be pruned (see model.named_modules())")
        return layer, mod
    blocks = transformer_blocks(model)
    if blocks:
        found = feed_forward_linears(blocks[-1][1])
        if found is not None:
            return f"{blocks[-1][0]}.{found[0]}", found[1]
    return head_name, head


def _accuracy_with_mask(model: nn.Module, layer: nn.Linear, inputs: Any, labels: torch.Tensor,
                        prepare: Prepare | None) -> Any:
    """``mask -> clean accuracy`` of the model with ``layer``'s inputs multiplied by ``mask`` (real forwards)."""
    from ...batching import default_prepare as dp

    def accuracy_with(mask: torch.Tensor) -> float:
        m = mask.to(layer.weight.device, layer.weight.dtype)
        h = layer.register_forward_pre_hook(lambda _m, args: (args[0] * m,) + tuple(args[1:]))
        was = model.training
        model.eval()
        try:
            correct = 0
            with torch.no_grad():
                for s in range(0, num_samples(inputs), 64):
                    batch = to_device((prepare or dp)(take(inputs, slice(s, s + 64))), model_device(model))
                    pred = forward_logits(model, batch).argmax(-1).cpu()
                    correct += int((pred == labels[s:s + 64]).sum())
        finally:
            h.remove()
            model.train(was)
        return correct / len(labels)

    return accuracy_with


def run_fp(model: nn.Module, clean_data: Any, cfg: FPConfig | None = None, run_dir: RunDir | str | None = None, *,
           num_classes: int | None = None, seed: int = 0, prepare: Prepare | None = None) -> tuple[nn.Module, DefenseReport]:
    """Fine-pruning of a copy of ``model`` (see the module docstring)."""
    cfg = cfg or FPConfig()
    inputs, labels = as_inputs_labels(clean_data)
    k = num_classes_of(labels, num_classes)
    out = copy.deepcopy(model)
    head_name, head = head_of(out, k, cfg.head)
    check_clean_data(labels, k, cfg.min_clean_per_class, "FP")
    target_name, target = prune_target(out, head_name, head, cfg.layer)
    phases = Phases(as_run_dir(run_dir))
    with phases("prune"):
        if target is head:  # exact and cheap: the head is linear in its input features
            feats = head_inputs(out, head, inputs, prepare=prepare)
            pruned, trace = prune_until(feats, labels, head.weight, head.bias, cfg.acc_ratio, cfg.max_prune_ratio,
                                        cfg.prune_step)
        else:  # an inner layer (a transformer FFN): real forwards, in steps of inner_step_fraction
            step = max(cfg.prune_step, math.ceil(cfg.inner_step_fraction * target.in_features))
            pruned, trace = prune_search(prune_order(input_means(out, target, inputs, prepare=prepare)),
                                         _accuracy_with_mask(out, target, inputs, labels, prepare), cfg.acc_ratio,
                                         cfg.max_prune_ratio, step)
    mask = torch.ones(target.in_features, device=target.weight.device)
    mask[pruned] = 0.0
    log.info("FP: pruned %d of %d neurons feeding %s (clean-subset acc %.3f -> %.3f)", len(pruned),
             target.in_features, target_name, trace[0]["acc"],
             next(t["acc"] for t in trace if t["pruned"] == len(pruned)))
    h = target.register_forward_pre_hook(lambda _m, args: (args[0] * mask,) + tuple(args[1:]))
    try:
        with phases("train"):
            logs = finetune(out, clean_data, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                             epochs=cfg.epochs, batch_size=cfg.batch_size, augment=cfg.augment, seed=seed, prepare=prepare,
                        optimizer=cfg.optimizer)
    finally:
        h.remove()
    with torch.no_grad():  # bake the mask: layer(x * m) == (W * m) x + b exactly
        target.weight.mul_(mask.view(1, -1))
    details = {"head": head_name, "layer": target_name, "pruned": sorted(pruned), "num_channels": target.in_features,
               "prune_trace": trace, "train_log": logs}
    return out, DefenseReport("fp", int(labels.shape[0]), phases.timings, details, to_dict(cfg))


SPEC = DefenseSpec(
    name="fp", kind="classify", config=FPConfig, run=run_fp, needs=Needs(trains=True),
    summary="fine-pruning: prune dormant channels feeding the head, then fine-tune (Liu et al. 2018)",
    paper="Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks (RAID 2018)",
    presets={"encoder": dict(ENCODER_RECIPE)},  # pretrained transformers (common.ENCODER_RECIPE)
    budgets={"demo": {"epochs": 10}, "smoke": {"epochs": 2}},
)
