"""Magnitude pruning of an LM's decoder linear layers: the CROW paper's pruning baseline, no training.

The smallest-magnitude weights of every decoder ``nn.Linear`` (attention and MLP projections;
never the embeddings or ``lm_head``) are set to zero, ``sparsity`` of them per matrix, or per
output row. A backdoor stored in a few large weights survives this; one spread thinly may not.
An adapter the model carries is merged first, so the effective weights are what gets pruned.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import nn

from ....core.config import check, option
from ....core.defense import DefenseSpec, Needs
from ....core.errors import ModelError

log = logging.getLogger("unbackdoor")


@dataclass
class PruneConfig:
    """Magnitude pruning (CROW paper baseline: sparsity 0.35)."""

    sparsity: float = option(0.35, "fraction of each matrix's (or row's) weights set to zero (CROW paper: 0.35)")
    scope: Literal["matrix", "row"] = option("matrix", "rank weights within each weight matrix, or within each "
                                                       "output row (Wanda's comparison group)")
    skip: str = option("lm_head,embed", "comma-separated name fragments of linear layers never pruned")
    seed: int = option(0, "recorded only: pruning is deterministic")

    def __post_init__(self) -> None:
        check(0.0 <= self.sparsity < 1.0, "sparsity", self.sparsity, "in [0, 1)", type(self).__name__)


def prune_mask(weight: torch.Tensor, sparsity: float, scope: str = "matrix") -> torch.Tensor:
    """A boolean keep-mask zeroing exactly ``floor(sparsity * n)`` smallest-|w| entries per group (ties: lower index).

    ``scope='matrix'``: one group per matrix; ``'row'``: one group per output row.
    """
    mag = weight.detach().abs().float()
    groups = mag.reshape(1, -1) if scope == "matrix" else mag.reshape(mag.shape[0], -1)
    k = int(sparsity * groups.shape[1])
    keep = torch.ones_like(groups, dtype=torch.bool)
    if k > 0:
        order = torch.argsort(groups, dim=1, stable=True)[:, :k]
        keep.scatter_(1, order, False)
    return keep.reshape(weight.shape)


def linear_layers(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """The decoder's linear layers: every ``nn.Linear`` whose name holds none of ``skip``."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(s and s in n for s in skip)]


@torch.no_grad()
def run_prune(model: Any, tokenizer: Any, clean: Sequence[dict], cfg: PruneConfig, ctx: Any) -> Any:
    """Prune ``model`` in place (after merging an adapter); the clean records are not used."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    layers = linear_layers(model, [s.strip() for s in cfg.skip.split(",")])
    if not layers:
        raise ModelError(f"{type(model).__name__} has no linear layer to prune", where="prune",
                         fix="check --skip: it must not name every linear layer")
    pruned = total = 0
    for _, layer in layers:
        keep = prune_mask(layer.weight, cfg.sparsity, cfg.scope)
        layer.weight.mul_(keep.to(layer.weight.dtype))
        pruned += int((~keep).sum())
        total += keep.numel()
    log.info("prune: zeroed %d of %d weights (%.3f) in %d linear layers", pruned, total, pruned / max(total, 1),
             len(layers))
    return model


SPEC = DefenseSpec(
    name="prune", kind="lm", config=PruneConfig, run=run_prune, needs=Needs(trains=False, clean_data=False),
    summary="magnitude pruning of the decoder's linear layers (no training, no data)",
    paper="the CROW paper's pruning baseline (sparsity 0.35)",
)
