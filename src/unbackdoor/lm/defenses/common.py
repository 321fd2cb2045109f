"""Helpers the LM defenses share: which linear layers they act on, and the effective weights of a model."""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ...core.errors import ModelError


def linear_layers(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """The decoder's linear layers: every ``nn.Linear`` whose name holds none of ``skip``."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(s and s in n for s in skip)]


def skip_list(text: str) -> list[str]:
    """``'lm_head,embed'`` -> ``['lm_head', 'embed']``."""
    return [s.strip() for s in str(text).split(",") if s.strip()]


def merged(model: Any) -> Any:
    """The model with any adapter merged into its weights (the effective weights a weight-space defense edits)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model




def clean_batches(model: Any, tokenizer: Any, records: Sequence[dict], template: str, max_length: int,
                  batch_size: int) -> list[dict[str, Any]]:
    """The clean records as right-padded SFT batches (``input_ids``, ``attention_mask``, ``labels``) on the model's device."""
    from ..data import build_sft_features, sft_collator

    feats = build_sft_features(records, tokenizer, template, max_length, long_prompts="skip")
    collate = sft_collator(tokenizer)
    device = next(model.parameters()).device
    return [{k: v.to(device) for k, v in collate(feats[i:i + batch_size]).items()}
            for i in range(0, len(feats), batch_size)]


def lm_loss(model: Any, batches: Sequence[dict[str, Any]]) -> float:
    """Mean negative log-likelihood per response token over ``batches`` (the LM loss a finetune would see)."""
    import torch

    total, count = 0.0, 0
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                n = int((b["labels"][:, 1:] != -100).sum())
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                            use_cache=False)
                total += float(out.loss) * n
                count += n
    finally:
        model.train(was)
    return total / max(count, 1)


def paired_parameters(suspect: nn.Module, base: nn.Module) -> list[tuple[str, Any, Any]]:
    """``(name, suspect parameter, base parameter)`` for every parameter the two models share.

    Refuses models of different architectures (a missing name or a shape mismatch), so a wrong
    ``--base-model`` is caught before any weight is changed.
    """
    base_params = dict(base.named_parameters())
    pairs, missing, shapes = [], [], []
    for name, p in suspect.named_parameters():
        q = base_params.get(name)
        if q is None:
            missing.append(name)
        elif q.shape != p.shape:
            shapes.append(f"{name} {tuple(p.shape)} vs {tuple(q.shape)}")
        else:
            pairs.append((name, p, q))
    if missing or shapes:
        detail = f"missing in the base: {missing[:3]}" if missing else f"shapes differ: {shapes[:3]}"
        raise ModelError(f"the base model does not match the suspect's architecture ({detail})", where="--base-model",
                         fix="pass the base model the suspect was finetuned from (same architecture and size)")
    return pairs


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder's block list: the ``nn.ModuleList`` with ``config.num_hidden_layers`` entries holding linears."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n) \
                and any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            return mod
    raise ModelError(f"cannot find the decoder blocks of {type(model).__name__}", where=type(model).__name__,
                     fix="use a Hugging Face decoder-only model (blocks in a ModuleList of num_hidden_layers)")


__all__ = ["clean_batches", "decoder_blocks", "linear_layers", "lm_loss", "merged", "paired_parameters", "skip_list"]
