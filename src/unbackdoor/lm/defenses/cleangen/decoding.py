"""CleanGen decoding over a batch: the suspect drafts ``k`` tokens, the reference vets them (see :mod:`.rule`).

Batched: every active prompt drafts a window with one call of the suspect's ``generate`` (greedy,
KV cache within the window), the reference scores all windows in one forward pass, and each row
keeps what :func:`~.rule.accept_draft` allows; rows then continue from different lengths (re-padded
on the left, positions from the attention mask, so padding never shifts a prompt). No KV cache is
kept across windows: each window re-reads its prefix, the price of batching rows whose lengths
diverge (the benchmarks report the overhead over plain greedy decoding).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ....core.config import check, check_positive, option
from ...decoding_defense import DecodingDefense
from .rule import accept_draft


@dataclass
class CleanGenConfig:
    """CleanGen (EMNLP 2024) defaults: alpha 20, prediction horizon k 4."""

    alpha: float = option(20.0, "replace a drafted token when P_suspect / P_reference >= alpha (paper: 20)")
    k: int = option(4, "tokens the suspect drafts before the reference checks them (paper: 4)")
    seed: int = option(0, "recorded only: greedy decoding is deterministic")

    def __post_init__(self) -> None:
        check(1.0 < self.alpha < float("inf"), "alpha", self.alpha, "a finite ratio of probabilities > 1", type(self).__name__)
        check_positive(self, "k")


def _left_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


class CleanGenModel(DecodingDefense):
    """The suspect whose ``generate`` runs CleanGen against the reference; ``forward`` is the suspect's."""

    kind: ClassVar[str] = "cleangen"
    Config: ClassVar[type] = CleanGenConfig

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 generation_config: Any = None, max_new_tokens: int | None = None, pad_token_id: int | None = None,
                 eos_token_id: Any = None, **_: Any) -> torch.Tensor:
        """Greedy CleanGen decoding; returns ``input_ids`` followed by the new tokens (padded with ``pad_token_id``).

        Length, pad and EOS come from the keyword arguments, else from ``generation_config`` (the
        evaluation's own, :func:`unbackdoor.lm.decoding.generation_config`). Only greedy decoding
        exists here (sampling options are ignored, as in the paper's evaluation).
        """
        if generation_config is not None:
            max_new_tokens = generation_config.max_new_tokens if max_new_tokens is None else max_new_tokens
            pad_token_id = generation_config.pad_token_id if pad_token_id is None else pad_token_id
            eos_token_id = generation_config.eos_token_id if eos_token_id is None else eos_token_id
        max_new_tokens = 128 if max_new_tokens is None else int(max_new_tokens)
        eos_ids = set(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (
            {eos_token_id} if eos_token_id is not None else set())
        cfg: CleanGenConfig = self.cfg
        t0 = time.perf_counter()
        device = input_ids.device
        pad = int(pad_token_id if pad_token_id is not None else (min(eos_ids) if eos_ids else 0))
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, mask)]
        new: list[list[int]] = [[] for _ in prompts]
        done = [max_new_tokens <= 0] * len(prompts)
        replaced = drafted = 0
        while not all(done):
            active = [i for i, d in enumerate(done) if not d]
            rows = [prompts[i] + new[i] for i in active]
            ids, am = _left_pad(rows, pad, device)
            window = min(cfg.k, max(max_new_tokens - len(new[i]) for i in active))
            out = self.suspect.generate(input_ids=ids, attention_mask=am, max_new_tokens=window, do_sample=False,
                                        num_beams=1, use_cache=True, pad_token_id=pad, eos_token_id=eos_token_id,
                                        output_logits=True, return_dict_in_generate=True)
            draft = out.sequences[:, ids.shape[1]:]
            p_s = torch.stack([torch.softmax(lg.float(), dim=-1) for lg in out.logits], dim=1)  # [B, w, V]
            full = out.sequences
            full_mask = torch.cat([am, torch.ones_like(draft)], dim=1)
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
            ref_logits = self.reference(input_ids=full, attention_mask=full_mask, position_ids=positions,
                                        use_cache=False).logits
            p_r = torch.softmax(ref_logits[:, ids.shape[1] - 1:-1].float(), dim=-1)  # predicts draft positions
            for b, i in enumerate(active):
                toks = draft[b].tolist()
                budget = max_new_tokens - len(new[i])
                cut = len(toks)
                ends = [j for j, t in enumerate(toks) if t in eos_ids]
                if ends:
                    cut = ends[0] + 1
                cut = min(cut, budget)
                toks = toks[:cut]
                ps = [float(p_s[b, j, t]) for j, t in enumerate(toks)]
                pr = [float(p_r[b, j, t]) for j, t in enumerate(toks)]
                choice = p_r[b, :cut].argmax(dim=-1).tolist()
                kept, where = accept_draft(toks, ps, pr, choice, cfg.alpha)
                drafted += len(kept)
                replaced += where is not None
                new[i].extend(kept)
                if len(new[i]) >= max_new_tokens or any(t in eos_ids for t in kept):
                    done[i] = True
        self.stats["tokens"] = self.stats.get("tokens", 0) + drafted
        self.stats["replaced"] = self.stats.get("replaced", 0) + replaced
        self.stats["seconds"] = self.stats.get("seconds", 0.0) + time.perf_counter() - t0
        width = max((len(r) for r in new), default=0)
        tail = torch.full((len(new), width), pad, dtype=input_ids.dtype)
        for i, r in enumerate(new):
            tail[i, :len(r)] = torch.tensor(r, dtype=input_ids.dtype)
        return torch.cat([input_ids, tail.to(device)], dim=1)


__all__ = ["CleanGenConfig", "CleanGenModel"]
