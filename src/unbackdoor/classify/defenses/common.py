"""What the classifier defenses share: clean-data checks, the head, fine-tuning, and their report.

A defense imports from here (and from ``..loop``, ``..batching``, ``..models``), never from
another defense or from the evaluation: removing a backdoor must not peek at how it is judged.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import DataError
from ..batching import Prepare, as_inputs_labels, clean_batches, to_device
from ..loop import augmentation, fit_sgd
from ..models import find_head


def check_clean_data(labels: torch.Tensor, num_classes: int, min_per_class: int, what: str = "ULRL") -> None:
    """Labels in range and enough samples to run; errors say how many are needed."""
    bad = torch.nonzero((labels < 0) | (labels >= num_classes)).flatten()
    if bad.numel():
        i = int(bad[0])
        raise DataError(f"label {int(labels[i])} outside 0..{num_classes - 1} ({bad.numel()} such labels)",
                        where=f"clean data, record {i}, field 'label'",
                        fix=f"labels must index the model's {num_classes} outputs; check the dataset matches the model")
    needed = max(2, min_per_class * num_classes)
    if labels.shape[0] < needed:
        raise DataError(
            f"the clean subset has {labels.shape[0]} samples; {what} needs at least {needed} "
            f"({min_per_class} per class x {num_classes} classes)", where="clean data",
            fix=f"give at least {needed} clean samples (the paper uses 1% of the training set, e.g. 500 for CIFAR-10)")


def num_classes_of(labels: torch.Tensor, num_classes: int | None) -> int:
    """The class count given, else the largest clean label + 1."""
    return int(num_classes) if num_classes is not None else int(labels.max()) + 1


def head_of(model: nn.Module, num_classes: int, path: str | None = None) -> tuple[str, nn.Linear]:
    """The classifier head (dotted name, module): ``path``, else found generically (models.find_head)."""
    return find_head(model, num_classes, path)


ENCODER_RECIPE: dict[str, Any] = {"optimizer": "adamw", "lr": 5e-5, "weight_decay": 0.01, "batch_size": 16,
                                  "epochs": 10, "augment": False}
"""The ``encoder`` preset of the fine-tuning defenses: pretrained transformers are finetuned with AdamW at
5e-5 in small batches (SPEC section 5: the CIFAR recipe, SGD at 0.01 with batch 128 on 100 samples, is one
step per epoch and either does nothing or collapses the classifier)."""

OPTIMIZER_HELP = "sgd (the CNN recipe) or adamw (pretrained encoders; momentum unused)"


def finetune(model: nn.Module, data: Any, *, lr: float, momentum: float, weight_decay: float, epochs: int,
             batch_size: int, augment: bool, seed: int, prepare: Prepare | None, extra_loss: Any = None,
             desc: str = "fine-tune", optimizer: str = "sgd") -> list[dict[str, float]]:
    """SGD (or AdamW) with a cosine schedule on CE (+ ``extra_loss()``), in place; returns the per-epoch log."""
    if epochs == 0:
        return []

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, y)
        return loss + extra_loss() if extra_loss is not None else loss

    logs = fit_sgd(model, data, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                   weight_decay=weight_decay, scheduler="cosine", augment=augment, seed=seed, loss_fn=loss_fn,
                   prepare=prepare, desc=desc, optimizer=optimizer)
    return [dataclasses.asdict(lg) for lg in logs]


@dataclass
class DefenseReport:
    """What a defense did: its name, the clean samples it used, timings, and method details."""

    method: str
    clean_samples: int
    timings: dict[str, float]
    details: dict[str, Any]
    config: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def unlearn(model: nn.Module, data: Any, *, lr: float, momentum: float, weight_decay: float,
            milestones: tuple[int, ...], gamma: float, clip: float | None, max_epochs: int, stop_acc: float,
            batch_size: int, augment: bool, seed: int, prepare: Prepare | None,
            desc: str = "unlearn") -> list[dict[str, float]]:
    """Gradient ASCENT on clean data (SGD, MultiStepLR), in place, until an epoch's running accuracy is <= ``stop_acc``.

    RNP's unlearning step (ULRL took it from there); returns the per-epoch ``{"acc", "loss"}`` with the
    loss as cross-entropy (not negated).
    """
    logs = fit_sgd(model, data, epochs=max_epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                   weight_decay=weight_decay, scheduler="multistep", milestones=milestones, gamma=gamma, clip=clip,
                   augment=augment, seed=seed, loss_fn=lambda z, y: -F.cross_entropy(z, y),
                   stop=lambda _e, lg: lg.acc <= stop_acc, prepare=prepare, desc=desc)
    return [{"acc": lg.acc, "loss": -lg.loss} for lg in logs]


def image_batches(data: Any, batch_size: int, seed: int, prepare: Prepare | None, augment: bool,
                  device: torch.device) -> Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    """``epoch -> shuffled (inputs, labels) batches on device`` of the clean data (the defenses' own loops)."""
    inputs, labels = as_inputs_labels(data)
    epochs = clean_batches(inputs, labels, batch_size, seed, prepare, augmentation(augment))

    def on_device(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(to_device(x, device), y.to(device)) for x, y in epochs(epoch)]

    return on_device


def image_tensor(data: Any, method: str) -> torch.Tensor:
    """The clean inputs as an image tensor ``[N, C, H, W]``; input-space defenses cannot perturb a dict of token ids."""
    inputs, _ = as_inputs_labels(data)
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4:
        kind = "a dict of tensors" if isinstance(inputs, dict) else f"shape {tuple(getattr(inputs, 'shape', ()))}"
        raise DataError(f"{method} perturbs input images; the clean inputs are {kind}", where="clean data",
                        fix=f"use {method} on image classifiers (inputs [N, C, H, W]), or another defense for text")
    return inputs


def checked_labels(model: nn.Module, clean_data: Any, num_classes: int | None, min_per_class: int, what: str,
                   head: str | None = None) -> tuple[torch.Tensor, int]:
    """The clean labels and the class count, after the checks a training defense makes before any compute:
    a head with one output per class, labels in range, enough samples per class."""
    _, labels = as_inputs_labels(clean_data)
    k = num_classes_of(labels, num_classes)
    head_of(model, k, head)
    check_clean_data(labels, k, min_per_class, what)
    return labels, k


def trainable_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every parameter trainable (the input model is never modified)."""
    out = copy.deepcopy(model)
    for p in out.parameters():
        p.requires_grad_(True)
    return out
