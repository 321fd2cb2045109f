"""CROW: remove a backdoor from a causal LM by making its layers consistent under attack.

A backdoor shows up as a sharp change in the hidden states between consecutive layers
when the trigger is present. CROW finetunes on a few clean instructions with the LM loss
plus ``alpha`` times the consecutive-layer inconsistency measured on adversarially
perturbed input embeddings (FGSM, step ``epsilon``), so no small input change can make the
layers jump. The whole method is :meth:`CrowTrainer.compute_loss`; see ``docs/crow.md``.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from ..core import distributed
from ..core.config import check, check_non_negative, check_positive, option
from ..core.errors import ConfigError, DataError, ModelError
from .data import build_sft_features
from .models import LoraSettings
from .sft import SFTConfig, SFTTrainer, run_trainer

log = logging.getLogger("unbackdoor")


@dataclass
class CrowConfig(SFTConfig):
    """CROW defaults from the paper and its official configs (SPEC section 2)."""

    lr: float = option(1e-3, "peak learning rate (paper: 1e-3, cosine, warm-up 0.1)")
    epochs: float = option(5.0, "epochs over the clean set (paper: 5; ~60 steps for 100 samples)")
    per_device_batch_size: int = option(2, "micro-batch size (paper: 2)")
    grad_accum: int = option(4, "gradient accumulation (paper: 4)")
    lora: LoraSettings = option(factory=LoraSettings, help="LoRA settings (paper: r 8, alpha 16, dropout 0, all linear)")
    alpha: float = option(5.5, "weight of the adversarial consistency loss (paper: 5.5; 11 for targeted refusal)")
    epsilon: float = option(0.1, "FGSM step on the input embeddings (paper: 0.1; 0 = no perturbation)")
    layer_start: int = option(1, "first hidden state compared (hs[0] is the embedding output; official: 1)")
    layer_end: int = option(-1, "hidden states hs[layer_start:layer_end] are compared pairwise; negative counts "
                                "from the end (official: -1, i.e. hs[1:-2] vs hs[2:-1], no final-norm pair)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative(self, "alpha", "epsilon")
        check_positive(self, "lr")
        check(self.layer_start >= 0, "layer_start", self.layer_start, ">= 0", type(self).__name__)
        if self.layer_end >= 0:
            check(self.layer_end >= self.layer_start + 2, "layer_end", self.layer_end,
                  f">= layer_start + 2 = {self.layer_start + 2} (at least one pair of states), or negative",
                  type(self).__name__)


# ---- the math (pure) ----------------------------------------------------------------------------------


def resolve_layer_range(n_states: int, layer_start: int = 1, layer_end: int = -1) -> tuple[int, int]:
    """``(start, end)`` as non-negative indices into the ``n_states`` hidden states, checked.

    ``n_states`` is ``num_hidden_layers + 1`` (embedding output first, as in HF).
    """
    end = layer_end + n_states if layer_end < 0 else layer_end
    if not (0 <= layer_start and end <= n_states and end - layer_start >= 2):
        raise ConfigError(
            f"layer range hs[{layer_start}:{layer_end}] selects no pair of consecutive states in a model with "
            f"{n_states} hidden states ({n_states - 1} layers)",
            where="layer_start / layer_end",
            fix=f"choose 0 <= layer_start and layer_start + 2 <= layer_end <= {n_states} (or a negative layer_end); "
                "the default 1 / -1 is the official range")
    return layer_start, end


def consistency_terms(hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor | None,
                      layer_start: int = 1, layer_end: int = -1) -> torch.Tensor:
    """Per-sample, per-pair mean of ``1 - cos(h_l, h_{l+1})`` over real tokens: shape ``[B, P]``.

    Cosines are computed in float32; padded positions (mask 0) are excluded. A sample with
    no real token gets 0.
    """
    start, end = resolve_layer_range(len(hidden_states), layer_start, layer_end)
    first = hidden_states[start]
    if attention_mask is None:
        mask = torch.ones(first.shape[:2], device=first.device, dtype=torch.float32)
    else:
        mask = attention_mask.to(device=first.device, dtype=torch.float32)
    n_tokens = mask.sum(dim=1).clamp(min=1.0)
    cols = []
    for lo in range(start, end - 1):
        cos = F.cosine_similarity(hidden_states[lo].float(), hidden_states[lo + 1].float(), dim=-1)  # [B, T]
        cols.append(((1.0 - cos) * mask).sum(dim=1) / n_tokens)
    return torch.stack(cols, dim=1)


def consistency_loss(hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor | None,
                     layer_start: int = 1, layer_end: int = -1) -> torch.Tensor:
    """CROW's inconsistency: mean over samples of the per-sample mean ``1 - cos`` (pairs x real tokens).

    Each sample counts once whatever its length, so the value does not depend on how a batch
    is padded or split into micro-batches (gradient accumulation gives the large-batch update).
    """
    terms = consistency_terms(hidden_states, attention_mask, layer_start, layer_end)
    if attention_mask is None:
        return terms.mean()
    has_tokens = (attention_mask.sum(dim=1) > 0).to(terms.device)
    if not bool(has_tokens.any()):
        return terms.sum() * 0.0
    return terms.mean(dim=1)[has_tokens].mean()


def layer_cosine_profile(hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor | None,
                         layer_start: int = 0, layer_end: int | None = None) -> torch.Tensor:
    """Mean cosine per consecutive pair (default: every pair), averaged over samples: shape ``[P]``.

    The CROW diagnostic: backdoored models show lower cosines on triggered prompts.
    """
    end = len(hidden_states) if layer_end is None else layer_end
    terms = consistency_terms(hidden_states, attention_mask, layer_start, end)
    return 1.0 - terms.mean(dim=0)


# ---- the trainer ------------------------------------------------------------------------------------------


class CrowTrainer(SFTTrainer):
    """A ``Trainer`` whose loss is CROW's: ``L_LM + alpha * L_adv`` (two forward passes per step)."""

    loss_is_scaled_for_ga = True  # compute_loss scales both terms for gradient accumulation itself

    def __init__(self, *args: Any, crow: CrowConfig, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.crow = crow
        self._sums: dict[str, torch.Tensor] = {}
        self._sums_since: int | None = None  # optimizer step when the current sums started

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.crow
        input_ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        inner = self.accelerator.unwrap_model(model)  # DDP/FSDP wrappers hide get_input_embeddings
        embed = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
        if embed is None:
            raise ModelError(f"{type(model).__name__} exposes no input embeddings", where="CROW",
                             fix="CROW perturbs the input embeddings: use a model with get_input_embeddings()")
        # micro-batches in this optimizer step (set by the training loop; 1 when called outside it)
        ga = getattr(self, "current_gradient_accumulation_steps", 1)

        # 1. Embed; clean forward with hidden states. The LM loss comes from this same pass.
        embeds = embed(input_ids)
        if not embeds.requires_grad:  # frozen embeddings (LoRA): still need d(consistency)/dE
            embeds = embeds.detach().requires_grad_(True)
        lm_kwargs: dict[str, Any] = {}
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            lm_kwargs["num_items_in_batch"] = num_items_in_batch
        out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels, output_hidden_states=True,
                    use_cache=False, **lm_kwargs)
        hs = getattr(out, "hidden_states", None)
        if not hs:
            raise ModelError(f"{type(model).__name__}'s forward returned no hidden states", where="CROW",
                             fix="CROW needs output_hidden_states=True support (any Hugging Face causal LM has it)")
        if out.loss is None:
            raise ModelError(f"{type(model).__name__}'s forward returned no loss for the given labels", where="CROW",
                             fix="use a Hugging Face *ForCausalLM model")
        # Scale for gradient accumulation: a loss normalised by num_items_in_batch already is
        # (the token count of the whole accumulation window), the consistency means are not.
        if lm_kwargs:
            lm_loss = out.loss
            if self.args.average_tokens_across_devices:
                lm_loss = lm_loss * self.accelerator.num_processes  # DDP averages; the count was global
        else:
            lm_loss = out.loss / ga

        # 2. Clean consistency: only used to build the perturbation.
        clean = consistency_loss(hs, mask, cfg.layer_start, cfg.layer_end)

        # 3. FGSM on the embeddings of real tokens; autograd.grad leaves parameter grads alone.
        if cfg.epsilon > 0:
            (grad,) = torch.autograd.grad(clean, embeds, retain_graph=True)
            step = cfg.epsilon * grad.sign() * mask.unsqueeze(-1).to(grad.dtype)
            adv_embeds = embeds + step.detach()
        else:
            adv_embeds = embeds

        # 4. Perturbed forward; its consistency is L_adv (logits of the last token only: unused).
        adv_kwargs = {"logits_to_keep": 1} if self._keeps_logits(inner) else {}
        adv_out = model(inputs_embeds=adv_embeds, attention_mask=mask, output_hidden_states=True,
                        use_cache=False, **adv_kwargs)
        adv = consistency_loss(adv_out.hidden_states, mask, cfg.layer_start, cfg.layer_end)

        # 5. Total.
        self.check_term(lm_loss, "L_LM")
        self.check_term(adv, "L_adv (adversarial consistency)")
        loss = lm_loss + cfg.alpha * adv / ga
        self._accumulate(loss_lm=lm_loss.detach(), loss_adv=adv.detach() / ga, consistency_clean=clean.detach() / ga)
        return (loss, out) if return_outputs else loss

    def _keeps_logits(self, model: Any) -> bool:
        if not hasattr(self, "_logits_to_keep"):
            target = model.get_base_model() if hasattr(model, "get_base_model") else model
            self._logits_to_keep = "logits_to_keep" in inspect.signature(target.forward).parameters
        return self._logits_to_keep

    def _accumulate(self, **terms: torch.Tensor) -> None:
        if self._sums_since is None:
            self._sums_since = self.state.global_step
        for k, v in terms.items():
            self._sums[k] = self._sums.get(k, 0.0) + v.float()

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the mean per-step ``loss_lm``, ``loss_adv``, ``consistency_clean`` since the last log."""
        steps = self.state.global_step - (self._sums_since or 0)
        if self._sums and steps > 0 and "loss" in logs:
            # each process holds its own micro-batches' terms: log their mean over processes (every
            # process calls log, so the all-reduce is collective; one process: the values themselves)
            keys = sorted(self._sums)
            totals = distributed.all_reduce_sum([float(self._sums[k]) for k in keys])
            world = distributed.world_size() if distributed.is_distributed() else 1
            for k, v in zip(keys, totals):
                logs[k] = round(v / world / steps, 6)
            self._sums, self._sums_since = {}, None
        super().log(logs, *args, **kwargs)


def check_crow_model(model: Any, cfg: CrowConfig) -> None:
    """Fail before training when the model cannot run CROW or the layer range does not fit it."""
    if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
        raise ModelError(f"{type(model).__name__} exposes no input embeddings", where="CROW",
                         fix="CROW perturbs the input embeddings: use a Hugging Face causal LM")
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if n_layers is not None:
        resolve_layer_range(int(n_layers) + 1, cfg.layer_start, cfg.layer_end)


def train_crow(model: Any, tokenizer: Any, clean_records: Sequence[dict], cfg: CrowConfig,
               output_dir: str | Path, *, template: str = "alpaca", resume: bool = False,
               callbacks: Iterable[TrainerCallback] = ()) -> Any:
    """Purify ``model`` with CROW on the defender's clean records; returns the trained model (eval mode).

    LoRA by default (a fresh adapter over merged weights, or the model's own adapter with
    ``cfg.continue_adapter``), or full finetuning. Checkpoints and ``log_history.json`` go
    to ``output_dir``; ``resume=True`` continues a killed run.
    """
    if clean_records is None or len(clean_records) == 0:
        raise DataError("the clean set is empty: CROW needs clean instructions to finetune on", where="clean data",
                        fix="pass about 100 clean Alpaca records (instruction / input / output)")
    check_crow_model(model, cfg)
    features = build_sft_features(clean_records, tokenizer, template, cfg.max_length, long_prompts=cfg.long_prompts)
    return run_trainer(CrowTrainer, model, tokenizer, features, cfg, output_dir, resume=resume,
                       callbacks=callbacks, crow=cfg)
