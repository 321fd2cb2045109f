"""NAD: neural attention distillation (Li et al., 2021).

A teacher is the model fine-tuned on clean data; the student (the backdoored model) is trained on
CE plus attention-map distillation towards the teacher at chosen layers (``beta`` per layer: 500,
1000, 1000 as in BackdoorBench for CIFAR).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ....core.config import check, check_non_negative, check_positive, option, to_dict
from ....core.defense import DefenseSpec, Needs
from ....core.errors import ModelError
from ....core.runs import Phases, RunDir, as_run_dir
from ...batching import Prepare, as_inputs_labels, model_device
from ..common import DefenseReport, check_clean_data, finetune, head_of, num_classes_of


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


def run_nad(model: nn.Module, clean_data: Any, cfg: NADConfig | None = None, run_dir: RunDir | str | None = None, *,
            num_classes: int | None = None, seed: int = 0, prepare: Prepare | None = None) -> tuple[nn.Module, DefenseReport]:
    """NAD on a copy of ``model``: fine-tuned teacher, attention-distilled student."""
    cfg = cfg or NADConfig()
    inputs, labels = as_inputs_labels(clean_data)
    k = num_classes_of(labels, num_classes)
    head_of(model, k, None)
    check_clean_data(labels, k, cfg.min_clean_per_class, "NAD")
    layers = cfg.layers or default_nad_layers(model)
    betas = cfg.betas
    if len(betas) != len(layers):
        raise ModelError(f"{len(layers)} NAD layers but {len(betas)} betas", where="NADConfig",
                         fix="give one beta per layer")
    phases = Phases(as_run_dir(run_dir))
    teacher = copy.deepcopy(model)
    with phases("teacher"):
        teacher_log = finetune(teacher, clean_data, lr=cfg.lr, momentum=cfg.momentum,
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
            logs = finetune(student, clean_data, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                             epochs=cfg.epochs, batch_size=cfg.batch_size, augment=cfg.augment, seed=seed,
                             prepare=prepare, extra_loss=at_loss, desc="NAD student")
    finally:
        for h in hooks:
            h.remove()
    details = {"layers": list(layers), "betas": list(betas), "teacher_log": teacher_log, "train_log": logs}
    return student, DefenseReport("nad", int(labels.shape[0]), phases.timings, details, to_dict(cfg))


SPEC = DefenseSpec(
    name="nad", kind="classify", config=NADConfig, run=run_nad, needs=Needs(trains=True),
    summary="neural attention distillation from a fine-tuned teacher (Li et al. 2021)",
    paper="Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural Networks (ICLR 2021)",
    budgets={"demo": {"teacher_epochs": 5, "epochs": 5}, "smoke": {"teacher_epochs": 1, "epochs": 2}},
)
