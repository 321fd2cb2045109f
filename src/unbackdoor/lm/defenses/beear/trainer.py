"""BEEAR: entrap the backdoor as a universal perturbation in a middle layer, then train it away.

Each optimizer micro-step on a batch of behaviour examples (one prompt, a desired and an unwanted
answer):

1. **Entrapment (inner level).** A perturbation ``delta`` (one vector of the hidden size, shared by
   every prompt token of every example: "universal") is added to the output of decoder block
   ``layer`` at the prompt positions. Starting from zero, ``inner_steps`` normalised-gradient
   steps minimise ``CE(unwanted | delta) - contrast * CE(desired | delta)``: ``delta`` becomes the
   drift a trigger would cause, found without the trigger.
2. **Removal (outer level).** With ``delta`` fixed, the trainable weights (LoRA) take a step on
   ``CE(desired | delta) + anchor_weight * CE(clean records)``: the desired behaviour survives the
   entrapped drift, and the clean task (performance anchoring, no perturbation) is kept.

The perturbation only ever enters through a forward hook; ``torch.autograd.grad`` gives its
gradient without touching the parameters' ``.grad`` (gradient accumulation stays correct).
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from transformers import TrainerCallback

from ....core.errors import DataError
from ...data import IGNORE_INDEX, build_sft_features, read_alpaca, sft_collator
from ...training import SFTTrainer, run_trainer
from ..common import decoder_blocks
from .config import BeearConfig

log = logging.getLogger("unbackdoor")


def read_behaviour(path: str | Path) -> list[dict[str, Any]]:
    """Behaviour examples: Alpaca records (``output`` = desired) each with a string ``unwanted`` answer."""
    records = read_alpaca(path)
    for i, r in enumerate(records):
        if not isinstance(r.get("unwanted"), str) or not r["unwanted"].strip():
            raise DataError(f"behaviour example {i} has no 'unwanted' answer", where=f"{path}, record {i}",
                            fix="give every record an 'unwanted' string beside its desired 'output'")
    return records


def behaviour_features(records: Sequence[dict[str, Any]], tokenizer: Any, template: str, max_length: int
                       ) -> list[dict[str, list[int]]]:
    """One feature per example: the desired answer's ids as ``d_*`` and the unwanted one's as ``u_*``."""
    desired = build_sft_features(records, tokenizer, template, max_length)
    unwanted = build_sft_features([{**r, "output": r["unwanted"]} for r in records], tokenizer, template, max_length)
    return [{**{f"d_{k}": v for k, v in d.items()}, **{f"u_{k}": v for k, v in u.items()}}
            for d, u in zip(desired, unwanted)]


class PairCollator:
    """Pads the ``d_*`` and ``u_*`` halves of each batch separately with the library's SFT collator."""

    def __init__(self, tokenizer: Any):
        self.inner = sft_collator(tokenizer)

    def __call__(self, feats: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for prefix in ("d_", "u_"):
            part = self.inner([{k[2:]: v for k, v in f.items() if k.startswith(prefix)} for f in feats])
            out.update({prefix + k: v for k, v in part.items()})
        return out


class _Perturbation:
    """A forward hook adding ``delta`` to a block's output at the current batch's prompt positions."""

    def __init__(self, block: torch.nn.Module):
        self.block = block
        self.delta: torch.Tensor | None = None
        self.where: torch.Tensor | None = None
        self.handle = block.register_forward_hook(self._hook)

    def _hook(self, _mod: Any, _args: Any, out: Any) -> Any:
        if self.delta is None or self.where is None:
            return out
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        moved = hidden + self.where.unsqueeze(-1).to(hidden.dtype) * self.delta.to(hidden.dtype)
        if isinstance(out, (tuple, list)):
            return type(out)([moved, *out[1:]])
        return moved

    def set(self, delta: torch.Tensor | None, batch: dict[str, torch.Tensor] | None) -> None:
        self.delta = delta
        self.where = None if batch is None else prompt_positions(batch)


def prompt_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Real prompt tokens of an SFT batch: attended and not learned (``labels == -100``)."""
    return (batch["labels"] == IGNORE_INDEX) & (batch["attention_mask"] == 1)


class BeearTrainer(SFTTrainer):
    """A ``Trainer`` whose loss is BEEAR's outer objective, after an inner entrapment of the perturbation."""

    loss_is_scaled_for_ga = False  # per-micro-batch means: the Trainer divides by the accumulation steps

    def __init__(self, *args: Any, beear: BeearConfig, anchor: Sequence[dict[str, torch.Tensor]],
                 report: dict[str, Any], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.data_collator = PairCollator(self.processing_class)
        self.beear = beear
        self._anchor = itertools.cycle(list(anchor)) if anchor else None
        self._perturb: _Perturbation | None = None
        self.report = report
        report["trace"] = {"entrapped_unwanted_ce": [], "desired_ce_under_delta": [], "anchor_ce": [],
                           "delta_norm": []}

    def _hook(self, model: Any) -> _Perturbation:
        if self._perturb is None:
            blocks = decoder_blocks(self.accelerator.unwrap_model(model))
            layer = self.beear.resolve_layer(len(blocks))
            self._perturb = _Perturbation(blocks[layer])
            self.report["layer"], self.report["layers"] = layer, len(blocks)
            log.info("BEEAR: perturbing the output of decoder block %d of %d", layer, len(blocks))
        return self._perturb

    @torch.no_grad()
    def _hidden_scale(self, model: Any, batch: dict[str, torch.Tensor]) -> float:
        """Mean L2 norm of the perturbed block's prompt-token outputs (measured once, on the first batch)."""
        if "hidden_scale" not in self.report:
            cap: list[torch.Tensor] = []
            probe = self._perturb.block.register_forward_hook(
                lambda _m, _a, o: cap.append((o[0] if isinstance(o, (tuple, list)) else o).detach()))
            try:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            finally:
                probe.remove()
            where = prompt_positions(batch)
            self.report["hidden_scale"] = float(cap[0][where].float().norm(dim=-1).mean()) if where.any() else 1.0
        return self.report["hidden_scale"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.beear
        desired = {k[2:]: v for k, v in inputs.items() if k.startswith("d_")}
        unwanted = {k[2:]: v for k, v in inputs.items() if k.startswith("u_")}
        perturb = self._hook(model)
        perturb.set(None, None)
        scale = self._hidden_scale(model, desired)
        hidden = self.accelerator.unwrap_model(model).config.hidden_size
        delta = torch.zeros(hidden, device=desired["input_ids"].device, requires_grad=True)

        def ce(batch: dict[str, torch.Tensor], d: torch.Tensor | None) -> torch.Tensor:
            perturb.set(d, batch)
            try:
                return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"], use_cache=False).loss
            finally:
                perturb.set(None, None)

        if "unwanted_ce_without_delta" not in self.report:  # the entrapment's starting point, once
            with torch.no_grad():
                self.report["unwanted_ce_without_delta"] = round(float(ce(unwanted, None)), 6)

        # 1. entrapment: the universal drift that elicits the unwanted answer (parameters untouched)
        step = cfg.inner_step_size * scale
        ce_u = torch.tensor(float("nan"))
        for _ in range(cfg.inner_steps):
            ce_u = ce(unwanted, delta)
            inner = ce_u - cfg.contrast * ce(desired, delta) if cfg.contrast else ce_u
            (grad,) = torch.autograd.grad(inner, delta)
            with torch.no_grad():
                delta -= step * grad / grad.norm().clamp(min=1e-12)
        delta = delta.detach()

        # 2. removal: the desired answer under the entrapped drift, plus performance anchoring
        loss_d = ce(desired, delta)
        self.check_term(loss_d, "CE(desired | delta)")
        loss = loss_d
        anchor_ce = torch.tensor(float("nan"))
        if self._anchor is not None and cfg.anchor_weight > 0:
            batch = {k: v.to(desired["input_ids"].device) for k, v in next(self._anchor).items()}
            anchor_ce = ce(batch, None)
            self.check_term(anchor_ce, "anchor CE")
            loss = loss + cfg.anchor_weight * anchor_ce
        trace = self.report["trace"]
        for key, val in (("entrapped_unwanted_ce", ce_u), ("desired_ce_under_delta", loss_d),
                         ("anchor_ce", anchor_ce), ("delta_norm", delta.norm())):
            trace[key].append(round(float(val.detach()), 6))
        return (loss, None) if return_outputs else loss


def train_beear(model: Any, tokenizer: Any, clean_records: Sequence[dict], cfg: BeearConfig, output_dir: str | Path,
                *, template: str = "alpaca", resume: bool = False, callbacks: Iterable[TrainerCallback] = ()
                ) -> tuple[Any, dict[str, Any]]:
    """BEEAR on the behaviour examples of ``cfg.behaviour`` with the clean records as performance anchor.

    Returns ``(model, info)``: ``info`` records the behaviour file, its size and the loss trace.
    """
    path = cfg.require_behaviour()
    behaviour = read_behaviour(path)
    features = behaviour_features(behaviour, tokenizer, template, cfg.max_length)
    collate = sft_collator(tokenizer)
    anchor_feats = build_sft_features(clean_records, tokenizer, template, cfg.max_length) if clean_records else []
    bs = cfg.per_device_train_batch_size
    anchor = [collate(anchor_feats[i:i + bs]) for i in range(0, len(anchor_feats), bs)]
    report: dict[str, Any] = {}
    trained = run_trainer(BeearTrainer, model, tokenizer, features, cfg, output_dir, resume=resume,
                          callbacks=callbacks, beear=cfg, anchor=anchor, report=report)
    trace = report.pop("trace")
    report.update({"behaviour_examples": {"file": str(Path(path).resolve()), "count": len(behaviour)},
                   "anchor_records": len(clean_records),
                   "trace_first": {k: v[0] if v else None for k, v in trace.items()},
                   "trace_last": {k: v[-1] if v else None for k, v in trace.items()}})
    return trained, report


__all__ = ["BeearTrainer", "PairCollator", "behaviour_features", "read_behaviour", "train_beear"]
