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
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from transformers import TrainerCallback

from ....core import distributed
from ....core.errors import DataError, ModelError
from ...consistency import consistency_loss, resolve_layer_range
from ...data import build_sft_features
from ...training import SFTTrainer, run_trainer
from .config import CrowConfig

log = logging.getLogger("unbackdoor")


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
