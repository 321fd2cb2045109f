"""Wanda's calibration pass: the squared L2 norm of every linear layer's input features on clean tokens.

Sequential, as in the Wanda release: the decoder blocks are visited in order, each block's
linear inputs are measured on the outputs of the blocks before it *after they were pruned*,
then the block is pruned and its outputs are recomputed for the next one (two block forwards
per block in all, not one full forward per block). Padding tokens never count.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ....core.errors import ModelError
from ..common import decoder_blocks


class _Stop(Exception):
    """Raised by the capture hook: nothing after the first block needs to run."""


def _norm_hooks(layers: Iterable[tuple[str, nn.Linear]], mask_box: list[torch.Tensor],
                sums: dict[str, torch.Tensor]) -> list[Any]:
    """Forward pre-hooks adding each linear's squared input features over real tokens to ``sums[name]``."""
    def make(name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float()
            real = mask_box[0].to(torch.bool)
            x = x[real] if x.dim() == 3 and real.shape == x.shape[:2] else x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
        return hook
    return [layer.register_forward_pre_hook(make(name)) for name, layer in layers]


@torch.no_grad()
def input_norms_one_pass(model: nn.Module, layers: Sequence[tuple[str, nn.Linear]],
                         batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Squared input norms of ``layers`` from one forward pass of the (unpruned) model per batch."""
    sums: dict[str, torch.Tensor] = {}
    box: list[torch.Tensor] = [torch.empty(0)]
    hooks = _norm_hooks(layers, box, sums)
    try:
        for b in batches:
            box[0] = b["attention_mask"]
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return sums


@torch.no_grad()
def prune_sequentially(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], skip: Sequence[str],
                       prune_block: Callable[[list[tuple[str, nn.Linear]], dict[str, torch.Tensor]], None]) -> int:
    """Visit the decoder blocks in order: measure their linear inputs, ``prune_block``, recompute the outputs.

    Returns the number of blocks visited. The first block's inputs (hidden states and every keyword the
    model passes its blocks: mask, positions, rotary embeddings) are captured once per batch.
    """
    blocks = decoder_blocks(model)
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def catch(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args, dict(kwargs)))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for b in batches:
            try:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise ModelError("the first decoder block was not reached for every batch", where="wanda",
                         fix="pass --sequential false")
    for i, block in enumerate(blocks):
        prefix = f"{_path_of(model, blocks)}.{i}."
        layers = [(prefix + n, m) for n, m in block.named_modules()
                  if isinstance(m, nn.Linear) and not any(s and s in prefix + n for s in skip)]
        sums: dict[str, torch.Tensor] = {}
        box: list[torch.Tensor] = [torch.empty(0)]
        hooks = _norm_hooks(layers, box, sums)
        try:
            for (args, kwargs), b in zip(captured, batches):
                box[0] = b["attention_mask"]
                block(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        prune_block(layers, sums)
        for j, ((args, kwargs), b) in enumerate(zip(captured, batches)):
            out = block(*args, **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            if args:
                captured[j] = ((hidden, *args[1:]), kwargs)
            else:
                captured[j] = (args, {**kwargs, "hidden_states": hidden})
    return len(blocks)


def _path_of(model: nn.Module, target: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is target)


__all__ = ["input_norms_one_pass", "prune_sequentially"]
