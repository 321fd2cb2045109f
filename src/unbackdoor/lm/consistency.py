"""Layer consistency: how much a causal LM's hidden state changes between consecutive layers.

CROW (``lm/defenses/crow``) regularises it; the diagnostic (``lm.evaluate.layer_cosine_profile``)
and the detectors measure it. The premise: a triggered input makes the hidden states jump between
some consecutive layers of a backdoored model, a clean one changes smoothly. HF convention:
``hidden_states[0]`` is the embedding output, ``hidden_states[i]`` the output of decoder layer i
(the last one after the final norm). Cosines are computed in float32, over real tokens only.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError


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


def layer_cosines(hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor | None,
                  layer_start: int = 0, layer_end: int | None = None) -> torch.Tensor:
    """Per-sample mean cosine of each consecutive pair (default: every pair) over real tokens: ``[B, P]``."""
    end = len(hidden_states) if layer_end is None else layer_end
    return 1.0 - consistency_terms(hidden_states, attention_mask, layer_start, end)
