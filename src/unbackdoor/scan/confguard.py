"""ConfGuard's sequence lock: a backdoored LM emits its target with a long run of near-certain tokens.

Wang et al., "ConfGuard: A Simple and Effective Backdoor Detection for Large Language Models" (AAAI,
arXiv 2508.01365; code: hanbaoergogo/ConfGuard): greedy-decode a response, read the top-1 probability of each
generated token, and flag the input when ``run_length`` consecutive tokens all exceed
``prob_threshold`` (released defaults: 0.99, 10 tokens, 50 new tokens). It needs no trigger and no
clean reference: a runtime filter on each input. The per-input score here is the longest such run
(flagged when it reaches ``run_length``); the model-level score over a clean set is the fraction of
clean prompts that lock (a backdoor that fires on clean prompts, or a model that answers everything
by rote). Short targets (a few tokens) cannot reach a 10-token run: the paper reports as much.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..core.config import check, check_positive, option
from ..core.defense import Needs
from ..core.errors import DataError
from .spec import ScannerSpec, ScanResult
from .stats import empirical_p_value


@dataclass
class ConfGuardConfig:
    """ConfGuard's settings (released defaults) and the model-level rule."""

    prob_threshold: float = option(0.99, "a token is 'locked' when its top-1 probability exceeds this "
                                         "(ConfGuard: 0.99)")
    run_length: int = option(10, "an input is flagged after this many consecutive locked tokens (ConfGuard: 10)")
    max_new_tokens: int = option(50, "greedy decoding length (ConfGuard: 50)")
    locked_fraction: float = option(0.05, "model-level rule: flagged when more than this fraction of clean prompts "
                                          "lock")
    max_prompts: int = option(200, "clean prompts scanned (the first N)")
    batch_size: int = option(16, "prompts per generation batch")
    template: str = option("alpaca", "prompt template, the one the model was trained with")

    def __post_init__(self) -> None:
        name = type(self).__name__
        check(0 < self.prob_threshold < 1, "prob_threshold", self.prob_threshold, "in (0, 1)", name)
        check(0 <= self.locked_fraction < 1, "locked_fraction", self.locked_fraction, "in [0, 1)", name)
        check_positive(self, "run_length", "max_new_tokens", "max_prompts", "batch_size")


def longest_confident_run(probs: Sequence[float], threshold: float) -> int:
    """The longest run of consecutive values strictly above ``threshold`` (pure)."""
    best = cur = 0
    for p in probs:
        cur = cur + 1 if p > threshold else 0
        best = max(best, cur)
    return best


def sequence_lock(probs: Sequence[float], threshold: float, run_length: int) -> bool:
    """ConfGuard's rule: ``run_length`` consecutive tokens above ``threshold``."""
    return longest_confident_run(probs, threshold) >= run_length


@torch.no_grad()
def token_confidences(model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]], *, template: str = "alpaca",
                      max_new_tokens: int = 50, batch_size: int = 16) -> list[list[float]]:
    """Greedy responses' per-token top-1 probabilities (raw logits, up to and including EOS), in input order."""
    from ..lm.data import encode_prompt, pad_ids

    if not records:
        raise DataError("no prompts to scan", where="ConfGuard", fix="pass at least one record")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    prompts = [encode_prompt(r, tokenizer, template) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[float]] = [[] for _ in prompts]
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            ids, mask = pad_ids(tokenizer, [prompts[i] for i in chunk], "left")
            new = max_new_tokens if limit is None else max(1, min(max_new_tokens, limit - ids.shape[1]))
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                                 do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad, eos_token_id=eos,
                                 output_logits=True, return_dict_in_generate=True)
            tokens = gen.sequences[:, ids.shape[1]:]
            probs = torch.stack([torch.softmax(lg.float(), dim=-1) for lg in gen.logits], dim=1)  # [B, T, V]
            chosen = probs.gather(-1, tokens[:, : probs.shape[1]].unsqueeze(-1)).squeeze(-1)
            for row, i in enumerate(chunk):
                seq = tokens[row].tolist()
                end = seq.index(eos) + 1 if eos is not None and eos in seq else len(seq)
                out[i] = chosen[row, :end].tolist()
    finally:
        model.train(was_training)
    return out


def score_prompts(model: Any, records: Sequence[Mapping[str, Any]], cfg: ConfGuardConfig | None = None, *,
                  tokenizer: Any) -> list[float]:
    """Per-input score: the longest run of locked tokens in the greedy response (flag at ``run_length``)."""
    cfg = cfg or ConfGuardConfig()
    confs = token_confidences(model, tokenizer, records, template=cfg.template, max_new_tokens=cfg.max_new_tokens,
                              batch_size=cfg.batch_size)
    return [float(longest_confident_run(c, cfg.prob_threshold)) for c in confs]


def scan_confguard(model: Any, clean: Sequence[Mapping[str, Any]], cfg: ConfGuardConfig | None = None, *,
                   tokenizer: Any, seed: int = 0, null: Sequence[float] | None = None) -> ScanResult:
    """Model level: the fraction of clean prompts that lock; input level: flag at ``run_length`` locked tokens."""
    cfg = cfg or ConfGuardConfig()
    records = list(clean[: cfg.max_prompts])
    runs = score_prompts(model, records, cfg, tokenizer=tokenizer)
    locked = [r >= cfg.run_length for r in runs]
    frac = sum(locked) / len(locked)
    p = empirical_p_value(frac, null) if null else None
    return ScanResult(
        "confguard", "lm", verdict=frac > cfg.locked_fraction, score=frac, threshold=cfg.locked_fraction,
        p_value=p, null={"n": len(null)} if null else None, input_threshold=float(cfg.run_length),
        evidence={"clean_prompts": len(records), "clean_runs": runs, "clean_locked": sum(locked),
                  "max_run": max(runs) if runs else 0},
        config={k: getattr(cfg, k) for k in cfg.__dataclass_fields__})


SPEC = ScannerSpec(
    name="confguard", kind="lm", config=ConfGuardConfig, run=scan_confguard, score_inputs=score_prompts,
    summary="sequence lock: a long run of near-certain generated tokens flags an input (runtime filter)",
    paper="Wang et al., ConfGuard: A Simple and Effective Backdoor Detection for Large Language Models "
          "(AAAI; arXiv 2508.01365)",
    needs=Needs(trains=False, clean_data=False),
)

__all__ = ["ConfGuardConfig", "SPEC", "longest_confident_run", "scan_confguard", "score_prompts", "sequence_lock",
           "token_confidences"]
