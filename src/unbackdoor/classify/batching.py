"""Batches of model inputs that are tensors or dicts of tensors (images, or tokenised text).

One set of helpers for everything that feeds a classifier outside the ImageData iterator:
evaluation, feature extraction and the defenses' clean-data loops. A dict input is what a
Hugging Face sequence classifier takes (``input_ids``, ``attention_mask``...).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..core.errors import DataError
from ..core.resources import model_device  # noqa: F401  (re-exported: the defenses take it from here)
from ..core.seeds import generator

Inputs = torch.Tensor | Mapping[str, torch.Tensor]
Prepare = Callable[[Any], Any]
"""Maps a raw batch to model inputs (default: uint8 images -> float in [0, 1])."""


def num_samples(inputs: Inputs) -> int:
    """Number of samples in a tensor or a dict of equally long tensors."""
    if isinstance(inputs, Mapping):
        sizes = {k: int(v.shape[0]) for k, v in inputs.items()}
        if len(set(sizes.values())) > 1:
            raise DataError(f"input tensors have different lengths: {sizes}", where="model inputs",
                            fix="give every input tensor (input_ids, attention_mask, ...) one row per sample")
        if not sizes:
            raise DataError("empty input dict", where="model inputs", fix="pass at least input_ids")
        return next(iter(sizes.values()))
    return int(inputs.shape[0])


def take(inputs: Inputs, index: torch.Tensor | slice) -> Inputs:
    """Rows ``index`` of a tensor or of every tensor in a dict."""
    if isinstance(inputs, Mapping):
        return {k: v[index] for k, v in inputs.items()}
    return inputs[index]


def to_device(inputs: Inputs, device: torch.device | str) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return inputs.to(device)


def batch_len(inputs: Inputs) -> int:
    """Rows in one batch (the first tensor of a dict)."""
    if isinstance(inputs, Mapping):
        return int(next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0])
    return int(inputs.shape[0])


def default_prepare(batch: Inputs) -> Inputs:
    """uint8 images -> float in [0, 1]; anything else unchanged (the model normalises)."""
    if isinstance(batch, torch.Tensor) and batch.dtype == torch.uint8:
        return batch.float().div_(255.0)
    return batch


def model_inputs(data: Any) -> Inputs:
    """What a dataset feeds the model: ``.images`` (ImageData) or the tokenised ``.inputs`` (TextData)."""
    return data.images if hasattr(data, "images") else data.inputs


def as_inputs_labels(data: Any) -> tuple[Inputs, torch.Tensor]:
    """Accept an ``ImageData``-like object (``.images``/``.labels``), a ``TextData`` (``.inputs``/``.labels``),
    or an ``(inputs, labels)`` pair."""
    if (hasattr(data, "images") or hasattr(data, "texts")) and hasattr(data, "labels"):
        inputs, labels = model_inputs(data), data.labels
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        inputs, labels = data
    else:
        raise DataError(f"cannot read clean data of type {type(data).__name__}", where="clean data",
                        fix="pass an ImageData or a pair (inputs, labels) of tensors (or a dict of tensors and labels)")
    labels = torch.as_tensor(labels).long()
    if labels.ndim != 1 or num_samples(inputs) != labels.shape[0]:
        raise DataError(f"{num_samples(inputs)} inputs but labels of shape {tuple(labels.shape)}", where="clean data",
                        fix="give exactly one integer label per sample")
    return inputs, labels


def clean_batches(inputs: Inputs, labels: torch.Tensor, batch_size: int, seed: int,
                  prepare: Prepare | None = None, augment: Callable[..., torch.Tensor] | None = None
                  ) -> Callable[[int], list[tuple[Inputs, torch.Tensor]]]:
    """``epoch -> shuffled batches`` for tensors or dicts of tensors (what ``loop.fit`` takes for non-images).

    The order and augmentation of epoch ``e`` come from a generator seeded with ``(seed, e)``.
    A trailing batch of one sample is merged into the previous one (BatchNorm needs two).
    """
    prepare = prepare or default_prepare
    n = num_samples(inputs)

    def epoch_batches(epoch: int) -> list[tuple[Inputs, torch.Tensor]]:
        gen = generator(int(seed) * 1_000_003 + int(epoch))
        perm = torch.randperm(n, generator=gen)
        chunks = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
        if len(chunks) > 1 and chunks[-1].numel() < 2:
            chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
        out = []
        for idx in chunks:
            x = prepare(take(inputs, idx))
            if augment is not None and isinstance(x, torch.Tensor) and x.ndim == 4:
                x = augment(x, gen)
            out.append((x, labels[idx]))
        return out

    return epoch_batches
