"""Pruning the decoder's linear layers, no training: magnitude (data-free) and Wanda (clean activations).

Two registered names, because they need different things: ``prune`` ranks weights by ``|W|``
and reads no data; ``wanda`` ranks them by ``|W| x ||X_j||_2`` (the input feature's norm over the
defender's clean tokens), so its run records that it read the clean set. Both act on every
decoder ``nn.Linear`` (attention and MLP projections; never the embeddings or ``lm_head``), after
merging an adapter the model carries, unstructured (``sparsity`` per matrix or per output row) or
N:M semi-structured (``structure='2:4'``). A backdoor stored in a few large weights survives
magnitude pruning; one carried by features the clean data never activates is what Wanda removes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import nn

from ....core.config import check, check_positive, option
from ....core.defense import DefenseSpec, Needs
from ....core.errors import ConfigError, DataError, ModelError
from ..common import clean_batches, linear_layers, merged, skip_list
from .activations import input_norms_one_pass, prune_sequentially
from .masks import keep_mask, parse_structure, prune_mask, wanda_scores

log = logging.getLogger("unbackdoor")

__all__ = ["PruneConfig", "SPEC", "WANDA_SPEC", "WandaConfig", "keep_mask", "linear_layers", "prune_mask",
           "run_prune", "run_wanda", "wanda_scores"]


@dataclass
class PruneConfig:
    """Magnitude pruning (CROW paper baseline: sparsity 0.35)."""

    sparsity: float = option(0.35, "fraction of each matrix's (or row's) weights set to zero (CROW paper: 0.35)")
    scope: Literal["matrix", "row"] = option("matrix", "rank weights within each weight matrix, or within each "
                                                       "output row (Wanda's comparison group)")
    structure: str = option("unstructured", "'unstructured', or 'N:M' semi-structured: zero the N lowest of every M "
                                            "consecutive weights of a row (2:4 = half; sparsity/scope then unused)")
    skip: str = option("lm_head,embed", "comma-separated name fragments of linear layers never pruned")
    seed: int = option(0, "recorded only: pruning is deterministic")

    def __post_init__(self) -> None:
        check(0.0 <= self.sparsity < 1.0, "sparsity", self.sparsity, "in [0, 1)", type(self).__name__)
        try:
            parse_structure(self.structure)
        except ValueError as e:
            raise ConfigError(f"{type(self).__name__}.structure: {e}", where="structure",
                              fix="use 'unstructured' or N:M such as 2:4") from None

    def skip_list(self) -> list[str]:
        return skip_list(self.skip)


@dataclass
class WandaConfig(PruneConfig):
    """Wanda (Sun et al., ICLR 2024): weight x input-activation norm on the clean set, compared per output row."""

    scope: Literal["matrix", "row"] = option("row", "comparison group (Wanda: per output row)")
    sparsity: float = option(0.35, "fraction of each row's weights set to zero (CROW paper's pruning ratio 0.35; "
                                   "the Wanda paper's headline setting is 0.5)")
    sequential: bool = option(True, "measure each block's inputs after the blocks before it were pruned (the Wanda "
                                    "release); false = one pass of the unpruned model")
    max_length: int = option(512, "tokens per clean record (prompt + response) in the calibration pass")
    batch_size: int = option(8, "clean records per calibration batch")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "max_length", "batch_size")


def _apply(layers: Sequence[tuple[str, nn.Linear]], masks: Sequence[torch.Tensor]) -> tuple[int, int]:
    pruned = total = 0
    for (_, layer), keep in zip(layers, masks):
        layer.weight.mul_(keep.to(layer.weight.dtype))
        pruned += int((~keep).sum())
        total += keep.numel()
    return pruned, total


def _check_structure(model: Any, cfg: PruneConfig) -> None:
    nm = parse_structure(cfg.structure)
    if nm is None:
        return
    bad = [n for n, m in linear_layers(model, cfg.skip_list()) if m.in_features % nm[1]]
    if bad:
        raise ModelError(f"{len(bad)} linear layers have input widths that are not a multiple of {nm[1]} "
                         f"(e.g. {bad[0]})", where="structure", fix="use 'unstructured', or skip those layers")


def _report(ctx: Any, cfg: PruneConfig, method: str, pruned: int, total: int, n_layers: int, **extra: Any) -> None:
    log.info("%s: zeroed %d of %d weights (%.3f) in %d linear layers", method, pruned, total, pruned / max(total, 1),
             n_layers)
    if ctx is not None and hasattr(ctx, "record"):
        ctx.record.update({"method": method, "structure": cfg.structure, "zeroed": pruned, "weights": total,
                           "achieved_sparsity": round(pruned / max(total, 1), 6), "layers": n_layers, **extra})


@torch.no_grad()
def run_prune(model: Any, tokenizer: Any, clean: Sequence[dict], cfg: PruneConfig, ctx: Any) -> Any:
    """Magnitude-prune ``model`` in place (after merging an adapter); the clean records are not used."""
    model = merged(model)
    layers = linear_layers(model, cfg.skip_list())
    if not layers:
        raise ModelError(f"{type(model).__name__} has no linear layer to prune", where="prune",
                         fix="check --skip: it must not name every linear layer")
    _check_structure(model, cfg)
    pruned, total = _apply(layers, [prune_mask(m.weight, cfg.sparsity, cfg.scope, cfg.structure) for _, m in layers])
    _report(ctx, cfg, "magnitude", pruned, total, len(layers))
    return model


@torch.no_grad()
def run_wanda(model: Any, tokenizer: Any, clean: Sequence[dict], cfg: WandaConfig, ctx: Any) -> Any:
    """Wanda-prune ``model`` in place, its input norms measured on the defender's clean records."""
    if not clean:
        raise DataError("Wanda measures input activations on clean records, and the clean set is empty",
                        where="clean data", fix="pass clean Alpaca records (about 100), or use --method prune")
    model = merged(model).eval()
    _check_structure(model, cfg)
    batches = clean_batches(model, tokenizer, clean, getattr(ctx, "template", "alpaca"), cfg.max_length,
                            cfg.batch_size)
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    counts = [0, 0, 0]

    def prune_block(layers: list[tuple[str, nn.Linear]], sums: dict[str, torch.Tensor]) -> None:
        masks = [keep_mask(wanda_scores(m.weight, sums[n]), cfg.sparsity, cfg.scope, cfg.structure) for n, m in layers]
        p, t = _apply(layers, masks)
        counts[0] += p
        counts[1] += t
        counts[2] += len(layers)

    if cfg.sequential:
        prune_sequentially(model, batches, cfg.skip_list(), prune_block)
    else:
        layers = linear_layers(model, cfg.skip_list())
        prune_block(layers, input_norms_one_pass(model, layers, batches))
    if counts[2] == 0:
        raise ModelError(f"{type(model).__name__} has no linear layer to prune", where="wanda",
                         fix="check --skip: it must not name every linear layer")
    _report(ctx, cfg, "wanda", counts[0], counts[1], counts[2], calibration_records=len(clean),
            calibration_tokens=tokens, sequential=cfg.sequential)
    return model


_BUDGETS = {"smoke": {"batch_size": 4}}

SPEC = DefenseSpec(
    name="prune", kind="lm", config=PruneConfig, run=run_prune, needs=Needs(trains=False, clean_data=False),
    summary="magnitude pruning of the decoder's linear layers (no training, no data)",
    paper="the CROW paper's pruning baseline (sparsity 0.35)",
    presets={"2of4": {"structure": "2:4"}, "row": {"scope": "row"}},
)

WANDA_SPEC = DefenseSpec(
    name="wanda", kind="lm", config=WandaConfig, run=run_wanda, needs=Needs(trains=False, clean_data=True),
    summary="Wanda pruning: |W| x clean input-activation norm, per output row (no training)",
    paper="Wanda: A Simple and Effective Pruning Approach for Large Language Models (ICLR 2024); the CROW paper's "
          "pruning baseline",
    presets={"2of4": {"structure": "2:4"}, "half": {"sparsity": 0.5}},
    budgets=_BUDGETS,
)
