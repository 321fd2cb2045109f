"""The attacker's clean surrogate: a small classifier trained on the clean training set.

LF (a universal perturbation), LC (adversarial target-class images) and TrojanNN (neurons of a
pre-trained model) need a clean model of the task. The attacker trains one on the training set
before poisoning it: the tiny world's PreActResNet at width 8, normalised with the data's own
per-channel statistics, seeded, a few epochs. One surrogate is kept per (data, settings) in this
process, so the attacks fitted on the same training set reuse it; the returned record is what a
poisoning run keeps about it (``model.json``'s ``attack_fit``).
"""
from __future__ import annotations

import hashlib
import time
from typing import Any

import torch
from torch import nn

from ..data import ImageData, to_float
from ..loop import TrainConfig, evaluate_accuracy, fit
from ..models import build_model

_CACHE: dict[str, tuple[nn.Module, dict[str, Any]]] = {}


def _key(data: ImageData, epochs: int, seed: int) -> str:
    h = hashlib.sha256()
    h.update(data.images.numpy().tobytes())
    h.update(data.labels.numpy().tobytes())
    return f"{h.hexdigest()[:16]}-{epochs}-{seed}"


def train_surrogate(data: ImageData, *, epochs: int, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """A clean model of ``data`` (eval mode, frozen) and its record; cached per (data, epochs, seed)."""
    key = _key(data, epochs, seed)
    if key in _CACHE:
        return _CACHE[key]
    x = to_float(data.images)
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist()
    torch.manual_seed(seed)
    model = build_model("preact_resnet_tiny", data.num_classes, width=8, in_channels=data.images.shape[1],
                        mean=mean, std=std)
    t0 = time.perf_counter()
    fit(model, data, TrainConfig(epochs=epochs, lr=0.05, flip=False, seed=seed), desc="attack surrogate")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    info = {"architecture": "preact_resnet_tiny", "width": 8, "epochs": epochs, "seed": seed, "lr": 0.05,
            "train_accuracy": round(evaluate_accuracy(model, data), 4), "seconds": round(time.perf_counter() - t0, 1),
            "trained_on": f"the clean training set '{data.name}' ({len(data)} images)"}
    _CACHE[key] = (model, info)
    return model, info
