"""The victim: a classifier trained on a poisoned set (what the defenses are judged against)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import to_dict
from .data import ImageData
from .loop import TrainConfig, fit
from .model_io import save_classifier
from .models import build_model


def train_backdoored(data: ImageData, attack_cfg: Any, model_name: str, train_cfg: TrainConfig,
                     out_dir: str | Path | None, *, model_kwargs: dict[str, Any] | None = None,
                     normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                     init_seed: int | None = None, checkpoint_dir: str | Path | None = None,
                     resume: bool = False, extra: dict[str, Any] | None = None) -> nn.Module:
    """Poison ``data`` with ``attack_cfg``, train ``model_name`` on it, save it to ``out_dir``.

    The model is initialised from ``init_seed`` (default: ``train_cfg.seed``); normalisation
    (mean, std) becomes part of the model. ``model.json`` records the attack config and the
    poisoned indices, so evaluation can rebuild the triggered test set.
    """
    from .attacks import poison_full

    result = poison_full(data, attack_cfg)
    poisoned, idx = result.data, result.poisoned
    attack_cfg = result.config or attack_cfg  # fitted attacks (LF, TrojanNN, ...) return their config with the trigger
    kw = dict(model_kwargs or {})
    if normalization is not None:
        kw["mean"], kw["std"] = tuple(normalization[0]), tuple(normalization[1])
    torch.manual_seed(train_cfg.seed if init_seed is None else init_seed)
    model = build_model(model_name, data.num_classes, **kw)
    fit_result = fit(model, poisoned, train_cfg, checkpoint_dir=checkpoint_dir, resume=resume, desc=f"backdoor {model_name}")
    if out_dir is not None:
        attack = to_dict(attack_cfg) if dataclasses.is_dataclass(attack_cfg) else attack_cfg
        save_classifier(model, out_dir, architecture=model_name, num_classes=data.num_classes, kwargs=kw,
                        extra={"attack": attack, "train": to_dict(train_cfg), "poisoned_indices": idx.tolist(),
                               "train_seconds": fit_result.seconds, "history": fit_result.history, "dataset": data.name,
                               **({"attack_fit": result.fit_info} if result.fit_info else {}), **(extra or {})})
    return model
