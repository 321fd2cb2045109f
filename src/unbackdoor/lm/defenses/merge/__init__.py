"""Merging the suspect with its clean base model, no training: averaging, TIES trimming, DARE.

With two models the merge acts on the suspect's task vector ``delta = W_suspect - W_base`` over
every shared parameter (embeddings, norms and ``lm_head`` included):

- ``average``: ``(1 - w) W_suspect + w W_base``. Task-arithmetic negation of the suspect's own
  task vector, ``W_suspect - lambda * delta``, is the same family with ``lambda = w``, and so is
  ``lora-scale`` with ``s = 1 - w`` (one family, tested as identities).
- ``ties``: keep only the ``density`` largest-magnitude entries of each tensor's delta (TIES-Merging's
  trim step; with one task vector its sign election is a no-op), ``W_base + lambda * trim(delta)``.
- ``dare``: drop each delta entry with probability ``drop_rate`` and rescale the survivors by
  ``1 / (1 - drop_rate)`` (DARE), ``W_base + lambda * dare(delta)``; seeded.

"Here's a Free Lunch" (Arora et al., 2024) sanitised backdoored models by merging them with other
models; this defense is the cheapest case: the only other model is the clean base.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from ....core.config import check, check_non_negative, option
from ....core.defense import DefenseSpec, Needs
from ..common import paired_parameters

log = logging.getLogger("unbackdoor")

__all__ = ["MergeConfig", "SPEC", "average", "dare_delta", "run_merge", "ties_trim"]


@dataclass
class MergeConfig:
    """Merging with the base model (averaging; TIES density 0.2 and DARE drop rate 0.9 as in their papers)."""

    mode: Literal["average", "ties", "dare"] = option("average", "average, ties (trim the delta) or dare (drop and "
                                                                 "rescale the delta)")
    weight: float = option(0.5, "average: weight of the base model, w in (1-w) W_suspect + w W_base (= the "
                                "negation coefficient lambda in W_suspect - lambda*delta); 0.5 = the plain mean")
    density: float = option(0.2, "ties: fraction of each tensor's delta entries kept, by magnitude (TIES: the top fifth)")
    drop_rate: float = option(0.9, "dare: probability of dropping a delta entry (DARE: up to 0.9)")
    coefficient: float = option(1.0, "ties/dare: lambda in W_base + lambda * delta' (1 = keep the delta's scale)")
    seed: int = option(0, "dare's random drop mask")

    def __post_init__(self) -> None:
        name = type(self).__name__
        check(0.0 <= self.weight <= 1.0, "weight", self.weight, "in [0, 1]", name)
        check(0.0 < self.density <= 1.0, "density", self.density, "in (0, 1]", name)
        check(0.0 <= self.drop_rate < 1.0, "drop_rate", self.drop_rate, "in [0, 1)", name)
        check_non_negative(self, "coefficient")


def average(suspect: torch.Tensor, base: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 - weight) * suspect + weight * base``."""
    return (1.0 - weight) * suspect + weight * base


def ties_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``ceil(density * n)`` largest-|.| entries zeroed (ties: the lower index is kept)."""
    flat = delta.reshape(-1)
    k = max(1, int(torch.ceil(torch.tensor(density * flat.numel())).item())) if flat.numel() else 0
    if k >= flat.numel():
        return delta.clone()
    order = torch.argsort(flat.abs(), descending=True, stable=True)[:k]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(delta.shape)


def dare_delta(delta: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability ``drop_rate``; rescale the kept ones by ``1 / (1 - drop_rate)``."""
    keep = torch.rand(delta.shape, generator=generator) >= drop_rate
    return delta * keep.to(delta.dtype).to(delta.device) / (1.0 - drop_rate)


@torch.no_grad()
def run_merge(model: Any, tokenizer: Any, clean: Sequence[dict], cfg: MergeConfig, ctx: Any) -> Any:
    """Merge ``model`` (its adapter merged first) with ``--base-model`` in place; the clean records are not used."""
    base, _ = ctx.load_base_model()
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    gen = torch.Generator().manual_seed(int(cfg.seed))
    changed = total = 0
    for _, p, q in paired_parameters(model, base):
        w, b = p.detach().float(), q.detach().float().to(p.device)
        if cfg.mode == "average":
            new = average(w, b, cfg.weight)
        else:
            delta = w - b
            delta = ties_trim(delta, cfg.density) if cfg.mode == "ties" else dare_delta(delta, cfg.drop_rate, gen)
            new = b + cfg.coefficient * delta
        changed += int((new != w).sum())
        total += w.numel()
        p.copy_(new.to(p.dtype))
    del base
    log.info("merge: %s changed %d of %d weights", cfg.mode, changed, total)
    if ctx is not None and hasattr(ctx, "record"):
        ctx.record.update({"mode": cfg.mode, "weights_changed": changed, "weights": total})
    return model.eval()


SPEC = DefenseSpec(
    name="merge", kind="lm", config=MergeConfig, run=run_merge,
    needs=Needs(trains=False, clean_data=False, base_model=True),
    summary="merge the suspect with its clean base model: weight averaging (= task-arithmetic negation), TIES, DARE",
    paper="Here's a Free Lunch: Sanitizing Backdoored Models with Model Merge (Arora et al., ACL Findings 2024); "
          "TIES-Merging (NeurIPS 2023); DARE (ICML 2024)",
    presets={"ties": {"mode": "ties"}, "dare": {"mode": "dare"}},
)
