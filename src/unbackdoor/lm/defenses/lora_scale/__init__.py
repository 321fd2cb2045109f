"""Scaling the suspect's finetuning delta down: ``W_base + s * (W_suspect - W_base)``, no training.

A hub user holding a LoRA adapter usually also holds its clean base model. With the adapter, the
delta is its own ``B A`` (times ``lora_alpha / r``) and the defended weight is ``W_base + s B A``
(the adapter's scaling times ``s``, merged); with a merged suspect, the delta is the weight
difference to ``--base-model`` over every shared parameter (task arithmetic's task vector).
``s = 1`` is the suspect, ``s = 0`` the base. ``s`` is given (``scale``) or searched: the
smallest ``s`` on the grid whose clean-set LM loss stays within ``tolerance`` of the best loss on
the grid, i.e. as much of the delta removed as the clean task allows. The bet is that the
backdoor needs the whole delta and the clean task does not.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ....core.config import check, check_non_negative, check_positive, option
from ....core.defense import DefenseSpec, Needs
from ....core.errors import ConfigError, ModelError
from ..common import clean_batches, lm_loss, paired_parameters

log = logging.getLogger("unbackdoor")

__all__ = ["LoraScaleConfig", "SPEC", "choose_scale", "run_lora_scale", "scaled_weight"]


@dataclass
class LoraScaleConfig:
    """Delta scaling: a fixed ``scale``, or the smallest grid value the clean loss allows."""

    scale: float | None = option(None, "the scale s in W_base + s*delta (None: search the grid on the clean loss)")
    grid: list[float] = option(factory=lambda: [round(0.1 * i, 1) for i in range(11)],
                               help="candidate scales searched when scale is None (0, 0.1, ..., 1)")
    tolerance: float = option(0.05, "search: accept the smallest s whose clean loss <= (1 + tolerance) x the best "
                                    "loss on the grid")
    max_length: int = option(512, "tokens per clean record in the loss")
    batch_size: int = option(8, "clean records per loss batch")
    seed: int = option(0, "recorded only: deterministic")

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.scale is not None:
            check(self.scale >= 0, "scale", self.scale, ">= 0", name)
        else:
            check(bool(self.grid) and all(g >= 0 for g in self.grid), "grid", self.grid, "non-empty, values >= 0", name)
        check_non_negative(self, "tolerance")
        check_positive(self, "max_length", "batch_size")


def scaled_weight(base: torch.Tensor, suspect: torch.Tensor, s: float) -> torch.Tensor:
    """``base + s * (suspect - base)``."""
    return base + s * (suspect - base)


def choose_scale(losses: dict[float, float], tolerance: float) -> float:
    """The smallest scale whose loss is within ``(1 + tolerance)`` of the lowest loss (ties: the smaller scale)."""
    best = min(losses.values())
    return min(s for s, v in losses.items() if v <= best * (1 + tolerance) + 1e-12)


# ---- the two kinds of delta ------------------------------------------------------------------


def _lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


class _AdapterDelta:
    """The suspect's LoRA adapter: scaling ``s`` multiplies each layer's ``lora_alpha / r``."""

    def __init__(self, model: Any):
        self.model = model
        self.layers = _lora_layers(model)
        self.orig = [dict(m.scaling) for m in self.layers]

    def set(self, s: float) -> None:
        for m, orig in zip(self.layers, self.orig):
            for k, v in orig.items():
                m.scaling[k] = v * s

    def finish(self, s: float) -> Any:
        self.set(s)
        return self.model.merge_and_unload()


class _WeightDelta:
    """A merged suspect against its base: every shared parameter moves to ``base + s * delta``."""

    def __init__(self, model: Any, base: Any):
        self.model = model
        self.pairs = [(p, q.detach().to(p.device, p.dtype).clone(), p.detach().clone())
                      for _, p, q in paired_parameters(model, base)]

    @torch.no_grad()
    def set(self, s: float) -> None:
        for p, b, w in self.pairs:
            p.copy_(scaled_weight(b, w, s))

    def finish(self, s: float) -> Any:
        self.set(s)
        self.pairs = []
        return self.model


@torch.no_grad()
def _check_adapter_base(model: Any, base: Any) -> float:
    """Max |difference| between the adapter's own base weights and ``--base-model`` (refused when they differ)."""
    inner = model.get_base_model()
    worst = 0.0
    base_params = dict(base.named_parameters())
    for name, p in inner.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer.", ".")
        q = base_params.get(key)
        if q is None or q.shape != p.shape:
            raise ModelError(f"the base model has no parameter matching the adapter's {key}", where="--base-model",
                             fix="pass the base model the adapter was trained on")
        worst = max(worst, float((p.float() - q.float().to(p.device)).abs().max()))
    if worst > 1e-4:
        raise ModelError(f"--base-model differs from the adapter's own base model (max |diff| {worst:.3g})",
                         where="--base-model", fix="pass the base model the adapter was trained on")
    return worst


def run_lora_scale(model: Any, tokenizer: Any, clean: Sequence[dict], cfg: LoraScaleConfig, ctx: Any) -> Any:
    """Scale the suspect's delta to the chosen or searched ``s``; returns a plain (merged) model."""
    from ...models import is_peft_model

    base, _ = ctx.load_base_model()
    if is_peft_model(model) and _lora_layers(model):
        diff = _check_adapter_base(model, base)
        delta: Any = _AdapterDelta(model)
        kind = "lora-adapter"
    else:
        if is_peft_model(model):
            model = model.merge_and_unload()
        delta, diff, kind = _WeightDelta(model, base), None, "weight-difference"
    del base
    losses: dict[float, float] = {}
    if cfg.scale is None:
        if not clean:
            raise ConfigError("searching the scale needs clean records (their LM loss picks it)", where="clean data",
                              fix="pass clean records, or give --scale")
        batches = clean_batches(model, tokenizer, clean, getattr(ctx, "template", "alpaca"), cfg.max_length,
                                cfg.batch_size)
        for s in sorted(set(float(g) for g in cfg.grid)):
            delta.set(s)
            losses[s] = lm_loss(model, batches)
        s = choose_scale(losses, cfg.tolerance)
    else:
        s = float(cfg.scale)
    out = delta.finish(s)
    log.info("lora-scale: s = %.3g (%s; clean losses %s)", s, kind,
             {k: round(v, 4) for k, v in losses.items()} or "not searched")
    if ctx is not None and hasattr(ctx, "record"):
        ctx.record.update({"scale": s, "searched": cfg.scale is None, "delta": kind,
                           "clean_loss_by_scale": {str(k): round(v, 6) for k, v in losses.items()},
                           "adapter_base_max_diff": diff})
    return out.eval()


SPEC = DefenseSpec(
    name="lora-scale", kind="lm", config=LoraScaleConfig, run=run_lora_scale,
    needs=Needs(trains=False, clean_data=True, base_model=True),
    summary="scale the suspect's LoRA / finetuning delta down: W_base + s*delta, s searched on the clean loss",
    paper="task arithmetic (Ilharco et al., ICLR 2023) applied to the suspect's own delta; LoRA's scaling knob",
    presets={"half": {"scale": 0.5}},
)
