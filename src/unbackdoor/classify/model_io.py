"""The classifier folder format: ``model.json`` (architecture, classes, normalisation) + ``model.safetensors``.

``model.json`` fields: ``format`` ("unbackdoor-classifier/1"), ``architecture`` (a name in
``models.MODELS``), ``kwargs`` (constructor arguments), ``num_classes``, ``normalization``
(``{"mean": [...], "std": [...]}`` or null), ``head`` (dotted name of the classifier head), and
what produced the model (``attack``, ``train``, ``poisoned_indices``, ``dataset``...). Weights are
never unpickled; a folder is written whole or not at all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import safeio
from ..core.errors import ModelError
from ..core.runs import atomic_dir, atomic_write_json, read_json
from .models import build_model, find_head

MODEL_FORMAT = "unbackdoor-classifier/1"


def save_classifier(model: nn.Module, out_dir: str | Path, *, architecture: str, num_classes: int,
                    kwargs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``model.json`` (architecture, kwargs, classes, normalisation), atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    norm = getattr(getattr(model, "normalize", None), "stats", None)
    kw = {k: v for k, v in (kwargs or {}).items() if k not in ("mean", "std")}
    head_name, _ = find_head(model, num_classes)
    meta = {"format": MODEL_FORMAT, "architecture": architecture, "kwargs": kw, "num_classes": int(num_classes),
            "normalization": norm, "head": head_name, **(extra or {})}
    safeio.save_state_dict(model.state_dict(), out / "model.safetensors", metadata={"format": MODEL_FORMAT})
    atomic_write_json(out / "model.json", meta)
    return out


def load_classifier(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a classifier saved by :func:`save_classifier` (folder or its ``model.json``), never unpickling."""
    path = Path(path)
    folder = path.parent if path.name == "model.json" else path
    meta_file = folder / "model.json"
    if not meta_file.is_file():
        raise ModelError(f"no model.json in {folder}", where=str(folder),
                         fix="pass a folder written by train_backdoored / save_classifier (model.json + model.safetensors)")
    meta = read_json(meta_file)
    for key in ("architecture", "num_classes"):
        if key not in meta:
            raise ModelError(f"model.json lacks '{key}'", where=f"{meta_file}, field '{key}'",
                             fix="regenerate the model folder with save_classifier")
    kw = dict(meta.get("kwargs") or {})
    for k, v in list(kw.items()):
        if isinstance(v, list):
            kw[k] = tuple(v)
    norm = meta.get("normalization")
    if norm:
        kw["mean"], kw["std"] = tuple(norm["mean"]), tuple(norm["std"])
    model = build_model(meta["architecture"], int(meta["num_classes"]), **kw)
    safeio.load_into(model, folder / "model.safetensors")
    return model.to(device).eval()


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A classifier folder (or its ``model.json``) and its metadata."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    return load_classifier(folder), read_json(folder / "model.json")


def save_model(model: nn.Module, out_dir: str | Path, meta: dict[str, Any] | None) -> Path:
    """``out_dir/model.safetensors`` (+ ``model.json`` when the architecture is known), replaced atomically."""
    with atomic_dir(out_dir) as tmp:
        if meta and "architecture" in meta:
            kwargs = dict(meta.get("kwargs") or {})
            norm = meta.get("normalization")
            extra = {k: v for k, v in meta.items() if k in ("attack", "dataset")}
            if norm:
                kwargs.update(mean=tuple(norm["mean"]), std=tuple(norm["std"]))
            save_classifier(model, tmp, architecture=meta["architecture"], num_classes=int(meta["num_classes"]),
                            kwargs=kwargs, extra=extra)
        else:
            safeio.save_state_dict(model.state_dict(), tmp / "model.safetensors")
    return Path(out_dir)
