"""Baseline defenses at ULRL's clean-data budget: fine-tuning (FT), fine-pruning (FP), NAD.

Each takes the backdoored model and the same clean subset ULRL sees, never modifies the input
model, and returns ``(model, report)``. Defaults follow BackdoorBench's configs where they exist,
scaled to ULRL's relearning budget (same batch size and epochs) so comparisons are fair.

* **FT**: plain SGD on clean data.
* **FP** (Liu et al., 2018): rank the channels feeding the head (for global-average-pooled
  networks such as PreActResNet these are the last convolutional block's channels, after BN-ReLU)
  by their mean activation on clean data, prune the least active ones until the clean accuracy
  falls below ``acc_ratio`` of the original, then fine-tune with the pruning mask held fixed. The
  mask is baked into the head's weight columns, so the saved model is a plain state dict.
* **NAD** (Li et al., 2021): a teacher is the model fine-tuned on clean data; the student (the
  backdoored model) is trained on CE plus attention-map distillation towards the teacher at
  chosen layers (``beta`` per layer: 500, 1000, 1000 as in BackdoorBench for CIFAR).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import check, check_fraction, check_non_negative, check_positive, option, to_dict
from ..core.errors import ModelError
from ..core.runs import RunDir
from .evaluate import Prepare, default_prepare, logits_of, model_device, num_samples, take, to_device
from .ulrl import _find_head, as_inputs_labels, check_clean_data, fit_sgd

log = logging.getLogger("unbackdoor")


# ---- configs ----------------------------------------------------------------------------------

@dataclass
class FTConfig:
    """Fine-tuning on the clean subset (ULRL's relearning budget: 20 epochs, batch 128)."""

    lr: float = option(0.01, "SGD learning rate (BackdoorBench ft: 0.01)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "weight decay (BackdoorBench: 5e-4)")
    epochs: int = option(20, "epochs, cosine-annealed lr (ULRL's relearning budget)")
    batch_size: int = option(128, "minibatch size")
    augment: bool = option(True, "random crop + flip on image batches")
    min_clean_per_class: int = option(5, "refuse clean subsets smaller than this many samples per class")
    head: str | None = option(None, "dotted path of the classifier head (default: found automatically)")

    def __post_init__(self) -> None:
        check_positive(self, "lr", "epochs", "batch_size")
        check_non_negative(self, "momentum", "weight_decay", "min_clean_per_class")


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


@dataclass
class NADConfig:
    """Neural attention distillation (Li et al., 2021) with BackdoorBench's CIFAR defaults."""

    teacher_epochs: int = option(10, "epochs of fine-tuning that make the teacher (BackdoorBench nad: 10)")
    epochs: int = option(20, "student distillation epochs (ULRL's relearning budget)")
    lr: float = option(0.01, "SGD learning rate for teacher and student (BackdoorBench nad: 0.01)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "weight decay")
    batch_size: int = option(128, "minibatch size")
    layers: tuple[str, ...] | None = option(None, "modules whose attention maps are distilled (default: layer2, layer3, layer4)")
    betas: tuple[float, ...] = option((500.0, 1000.0, 1000.0), "weight of each layer's attention loss (paper/BackdoorBench: 500, 1000, 1000)")
    power: float = option(2.0, "attention map = mean over channels of |activation|^power (paper: 2)")
    augment: bool = option(True, "random crop + flip on image batches")
    min_clean_per_class: int = option(5, "refuse clean subsets smaller than this many samples per class")

    def __post_init__(self) -> None:
        check_positive(self, "teacher_epochs", "epochs", "lr", "batch_size", "power")
        check_non_negative(self, "momentum", "weight_decay", "min_clean_per_class")
        check(all(b >= 0 for b in self.betas), "betas", self.betas, "non-negative", "NADConfig")
        if self.layers is not None:
            check(len(self.layers) == len(self.betas), "betas", self.betas,
                  f"one beta per layer ({len(self.layers)} layers)", "NADConfig")


@dataclass
class BaselineReport:
    method: str
    clean_samples: int
    timings: dict[str, float]
    details: dict[str, Any]
    config: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- helpers ----------------------------------------------------------------------------------

class _Phases:
    """Time phases into a RunDir when there is one, else into a dict."""

    def __init__(self, run_dir: RunDir | None):
        self.run_dir, self.timings = run_dir, {}

    def __call__(self, name: str):
        if self.run_dir is not None:
            return self.run_dir.phase(name)
        from .ulrl import _Timer

        return _Timer(self.timings, name)

    def result(self) -> dict[str, float]:
        return dict(self.run_dir.timings) if self.run_dir is not None else self.timings


def _num_classes(model: nn.Module, labels: torch.Tensor, num_classes: int | None) -> int:
    return int(num_classes) if num_classes is not None else int(labels.max()) + 1


def _finetune(model: nn.Module, data: Any, *, lr: float, momentum: float, weight_decay: float, epochs: int,
              batch_size: int, augment: bool, seed: int, prepare: Prepare | None, extra_loss: Any = None,
              desc: str = "fine-tune") -> list[dict[str, float]]:
    """SGD with a cosine schedule on CE (+ ``extra_loss()``), through ``train.fit``."""
    if epochs == 0:
        return []

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, y)
        return loss + extra_loss() if extra_loss is not None else loss

    logs = fit_sgd(model, data, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                   weight_decay=weight_decay, scheduler="cosine", augment=augment, seed=seed, loss_fn=loss_fn,
                   prepare=prepare, desc=desc)
    return [dataclasses.asdict(lg) for lg in logs]


# ---- FT ----------------------------------------------------------------------------------------

def run_ft(model: nn.Module, clean_data: Any, cfg: FTConfig | None = None, run_dir: RunDir | None = None, *,
           num_classes: int | None = None, seed: int = 0, prepare: Prepare | None = None) -> tuple[nn.Module, BaselineReport]:
    """Fine-tune a copy of ``model`` on the clean subset."""
    cfg = cfg or FTConfig()
    inputs, labels = as_inputs_labels(clean_data)
    k = _num_classes(model, labels, num_classes)
    _find_head(model, k, cfg.head)  # a clear error for models we cannot classify with
    check_clean_data(labels, k, cfg.min_clean_per_class, "FT")
    phases = _Phases(run_dir)
    out = copy.deepcopy(model)
    with phases("train"):
        logs = _finetune(out, clean_data, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                         epochs=cfg.epochs, batch_size=cfg.batch_size, augment=cfg.augment, seed=seed, prepare=prepare)
    return out, BaselineReport("ft", int(labels.shape[0]), phases.result(), {"train_log": logs}, to_dict(cfg))


# ---- FP ----------------------------------------------------------------------------------------

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
            logits_of(model, to_device(prepare(take(inputs, slice(s, s + batch_size))), device))
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


def run_fp(model: nn.Module, clean_data: Any, cfg: FPConfig | None = None, run_dir: RunDir | None = None, *,
           num_classes: int | None = None, seed: int = 0, prepare: Prepare | None = None) -> tuple[nn.Module, BaselineReport]:
    """Fine-pruning of a copy of ``model`` (see the module docstring)."""
    cfg = cfg or FPConfig()
    inputs, labels = as_inputs_labels(clean_data)
    k = _num_classes(model, labels, num_classes)
    out = copy.deepcopy(model)
    head_name, head = _find_head(out, k, cfg.head)
    check_clean_data(labels, k, cfg.min_clean_per_class, "FP")
    phases = _Phases(run_dir)
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
            logs = _finetune(out, clean_data, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                             epochs=cfg.epochs, batch_size=cfg.batch_size, augment=cfg.augment, seed=seed, prepare=prepare)
    finally:
        h.remove()
    with torch.no_grad():  # bake the mask: head(x * m) == (W * m) x + b exactly
        head.weight.mul_(mask.view(1, -1))
    details = {"head": head_name, "pruned": sorted(pruned), "num_channels": head.in_features, "prune_trace": trace,
               "train_log": logs}
    return out, BaselineReport("fp", int(labels.shape[0]), phases.result(), details, to_dict(cfg))


# ---- NAD ---------------------------------------------------------------------------------------

def attention_map(features: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """NAD's attention map: L2-normalised ``mean_c |a|^p`` per sample, flattened."""
    am = features.abs().pow(power).mean(dim=1).reshape(features.shape[0], -1)
    return F.normalize(am, dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """Mean squared difference of the two attention maps (teacher treated as constant)."""
    return (attention_map(student, power) - attention_map(teacher.detach(), power)).pow(2).mean()


def default_nad_layers(model: nn.Module) -> tuple[str, ...]:
    names = ("layer2", "layer3", "layer4")
    if all(hasattr(model, n) for n in names):
        return names
    raise ModelError(f"NAD needs the names of the layers to distill; {type(model).__name__} has no layer2/3/4",
                     where=type(model).__name__,
                     fix="pass NADConfig(layers=('module.a', 'module.b', ...)) with one beta per layer "
                         "(modules whose outputs are [N, C, H, W] feature maps)")


def run_nad(model: nn.Module, clean_data: Any, cfg: NADConfig | None = None, run_dir: RunDir | None = None, *,
            num_classes: int | None = None, seed: int = 0, prepare: Prepare | None = None) -> tuple[nn.Module, BaselineReport]:
    """NAD on a copy of ``model``: fine-tuned teacher, attention-distilled student."""
    cfg = cfg or NADConfig()
    inputs, labels = as_inputs_labels(clean_data)
    k = _num_classes(model, labels, num_classes)
    _find_head(model, k, None)
    check_clean_data(labels, k, cfg.min_clean_per_class, "NAD")
    layers = cfg.layers or default_nad_layers(model)
    betas = cfg.betas
    if len(betas) != len(layers):
        raise ModelError(f"{len(layers)} NAD layers but {len(betas)} betas", where="NADConfig",
                         fix="give one beta per layer")
    phases = _Phases(run_dir)
    teacher = copy.deepcopy(model)
    with phases("teacher"):
        teacher_log = _finetune(teacher, clean_data, lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, epochs=cfg.teacher_epochs, batch_size=cfg.batch_size,
                                augment=cfg.augment, seed=seed + 11, prepare=prepare, desc="NAD teacher")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(model)
    feats_s: dict[str, torch.Tensor] = {}
    feats_t: dict[str, torch.Tensor] = {}
    hooks = []
    for name in layers:
        try:
            ms, mt = student.get_submodule(name), teacher.get_submodule(name)
        except AttributeError:
            raise ModelError(f"the model has no module '{name}'", where="NADConfig.layers",
                             fix="name modules that exist (see model.named_modules())") from None
        hooks.append(ms.register_forward_hook(lambda _m, _a, o, n=name: feats_s.__setitem__(n, o)))
        hooks.append(mt.register_forward_hook(lambda _m, _a, o, n=name: feats_t.__setitem__(n, o)))

    # the student's forward fills feats_s; the teacher must see the SAME (augmented) batch, so we run it
    # from a forward pre-hook on the student with the student's input.
    def teacher_pass(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        with torch.no_grad():
            teacher(*args, **kwargs)

    hooks.append(student.register_forward_pre_hook(teacher_pass, with_kwargs=True))

    def at_loss() -> torch.Tensor:
        total = torch.zeros((), device=model_device(student))
        for name, beta in zip(layers, betas):
            s, t = feats_s[name], feats_t[name]
            if s.ndim != 4:
                raise ModelError(f"NAD layer '{name}' outputs shape {tuple(s.shape)}, not [N, C, H, W]",
                                 where="NADConfig.layers", fix="choose convolutional feature-map layers")
            total = total + beta * attention_loss(s, t, cfg.power)
        return total

    try:
        with phases("train"):
            logs = _finetune(student, clean_data, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                             epochs=cfg.epochs, batch_size=cfg.batch_size, augment=cfg.augment, seed=seed,
                             prepare=prepare, extra_loss=at_loss, desc="NAD student")
    finally:
        for h in hooks:
            h.remove()
    details = {"layers": list(layers), "betas": list(betas), "teacher_log": teacher_log, "train_log": logs}
    return student, BaselineReport("nad", int(labels.shape[0]), phases.result(), details, to_dict(cfg))
