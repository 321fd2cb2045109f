"""Neuron masks on batch-norm channels, shared by the pruning defenses that learn them (ANP, RNP).

Both methods give every channel ``k`` of every batch norm a mask ``m_k`` in ``[0, 1]`` that scales
its affine weight (``gamma_k * m_k``), learn the masks on clean data, and prune the channels whose
mask ends at or below a threshold by zeroing ``gamma_k`` in the ORIGINAL model (the bias stays, as
in the released code of both: a pruned channel outputs its constant ``beta_k``). ANP also perturbs
each channel multiplicatively (``gamma_k (m_k + delta_k)``, ``beta_k (1 + xi_k)``) while learning.

:class:`MaskedBatchNorm` wraps an existing batch norm (it is not a copy of torch's class) so any
architecture with batch norms works; :func:`attach_masks` swaps them in on a model the caller owns.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...core.errors import ModelError

log = logging.getLogger("unbackdoor")


class MaskedBatchNorm(nn.Module):
    """``bn`` with its weight scaled by ``mask (+ noise_weight)`` and its bias by ``1 (+ noise_bias)``.

    The noise terms count only while ``perturbed`` is True. Running statistics and the train/eval
    behaviour are ``bn``'s own (the same ``F.batch_norm`` call torch's module makes).
    """

    def __init__(self, bn: _BatchNorm):
        super().__init__()
        if not bn.affine:
            raise ModelError(f"batch norm {bn} has no affine weight to mask", where=type(bn).__name__,
                             fix="use a model whose batch norms are affine (the default)")
        self.bn = bn
        c = bn.num_features
        dev, dt = bn.weight.device, bn.weight.dtype
        self.mask = nn.Parameter(torch.ones(c, device=dev, dtype=dt))
        self.noise_weight = nn.Parameter(torch.zeros(c, device=dev, dtype=dt))
        self.noise_bias = nn.Parameter(torch.zeros(c, device=dev, dtype=dt))
        self.perturbed = False

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor | float]:
        """The factors applied to ``bn.weight`` and ``bn.bias`` in the current mode."""
        if self.perturbed:
            return self.mask + self.noise_weight, 1.0 + self.noise_bias
        return self.mask, 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = 1.0 / float(bn.num_batches_tracked)
        batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        track = not bn.training or bn.track_running_stats
        cw, cb = self.coefficients()
        return F.batch_norm(x, bn.running_mean if track else None, bn.running_var if track else None,
                            bn.weight * cw, bn.bias * cb, batch_stats, factor, bn.eps)


def batch_norms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every affine batch norm of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.affine]


def check_has_batch_norm(model: nn.Module, method: str) -> None:
    """Refuse a model without affine batch norms (nothing to mask) before any compute."""
    if not batch_norms(model):
        raise ModelError(f"{method} learns masks on batch-norm channels; {type(model).__name__} has none",
                         where=method.lower(), fix=f"use {method} on CNN classifiers with batch norm "
                                                  "(PreActResNet, VGG-BN, ...), or another defense")


def attach_masks(model: nn.Module) -> dict[str, MaskedBatchNorm]:
    """Replace every affine batch norm of ``model`` (in place) by a :class:`MaskedBatchNorm` around it.

    Freezes the model's own parameters (only masks and noise are learned). Returns
    ``{batch-norm name: wrapper}``; the names are those of the original model.
    """
    found = batch_norms(model)
    for p in model.parameters():
        p.requires_grad_(False)
    wrappers: dict[str, MaskedBatchNorm] = {}
    for name, bn in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = MaskedBatchNorm(bn)
        setattr(parent, child, wrapper)
        wrappers[name] = wrapper
    return wrappers


def mask_parameters(wrappers: dict[str, MaskedBatchNorm]) -> list[nn.Parameter]:
    return [w.mask for w in wrappers.values()]


def noise_parameters(wrappers: dict[str, MaskedBatchNorm]) -> list[nn.Parameter]:
    return [p for w in wrappers.values() for p in (w.noise_weight, w.noise_bias)]


def set_perturbed(wrappers: dict[str, MaskedBatchNorm], on: bool) -> None:
    for w in wrappers.values():
        w.perturbed = on


@torch.no_grad()
def clip_masks(wrappers: dict[str, MaskedBatchNorm], low: float = 0.0, high: float = 1.0) -> None:
    for w in wrappers.values():
        w.mask.clamp_(low, high)


def mask_values(wrappers: dict[str, MaskedBatchNorm]) -> dict[str, torch.Tensor]:
    """``{batch-norm name: mask values}`` (detached CPU copies)."""
    return {name: w.mask.detach().cpu().clone() for name, w in wrappers.items()}


def channels_at_or_below(masks: dict[str, torch.Tensor], threshold: float) -> dict[str, list[int]]:
    """The channels whose mask is ``<= threshold``, per batch norm (empty layers left out)."""
    out = {}
    for name, m in masks.items():
        idx = torch.nonzero(m <= threshold).flatten().tolist()
        if idx:
            out[name] = idx
    return out


@torch.no_grad()
def prune_channels(model: nn.Module, channels: dict[str, list[int]]) -> int:
    """Zero the batch-norm weight of each listed channel of ``model`` (in place); returns how many."""
    n = 0
    for name, idx in channels.items():
        bn = model.get_submodule(name)
        if not isinstance(bn, _BatchNorm):
            raise ModelError(f"'{name}' is a {type(bn).__name__}, not a batch norm", where="prune_channels",
                             fix="prune the model the masks were learned on")
        bn.weight[idx] = 0.0
        n += len(idx)
    return n


def mask_summary(masks: dict[str, torch.Tensor]) -> Iterator[tuple[str, int, float]]:
    """``(layer, channel, mask)`` for every channel, smallest mask first (the released codes' mask file)."""
    rows = [(name, i, float(v)) for name, m in masks.items() for i, v in enumerate(m.tolist())]
    return iter(sorted(rows, key=lambda r: r[2]))


def prune_copy(model: nn.Module, masks: dict[str, torch.Tensor], threshold: float, run_dir: Any = None,
               method: str = "") -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` with the channels whose mask is ``<= threshold`` pruned, and what was pruned.

    With ``run_dir`` the masks are saved there (``<method>_masks.json``).
    """
    out = copy.deepcopy(model)
    pruned = channels_at_or_below(masks, threshold)
    n = prune_channels(out, pruned)
    total = sum(int(m.numel()) for m in masks.values())
    log.info("%s: pruned %d of %d batch-norm channels (mask <= %s)", method, n, total, threshold)
    if run_dir is not None:
        run_dir.write_json(f"{method.lower()}_masks.json", {name: m.tolist() for name, m in masks.items()})
    return out, {"pruned": pruned, "channels_pruned": n, "channels": total}
