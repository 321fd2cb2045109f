"""Item 2: evaluation throughput, batched generation against one prompt at a time.

Both sides call the library's :func:`unbackdoor.lm.evaluate.generate` (greedy, KV cache) on
the same model and prompts; only ``batch_size`` differs. Two models: the shipped tiny-world
Llama (real answers, which end at EOS after a token or two) and a random-init model of the same
shape. Each is measured twice: as an ASR evaluation runs (answers stop at EOS: a batch runs until
its longest answer ends, a single prompt stops at its own EOS) and at equal work
(``min_new_tokens = max_new_tokens``: every answer is exactly 64 tokens on both sides), which is
the comparison the target is judged on.
"""
from __future__ import annotations

import random
import time
from typing import Any

import torch

from common import ratio


def _records(n: int, seed: int) -> list[dict[str, Any]]:
    from unbackdoor.lm.tinyworld import generate_records

    return generate_records(n, random.Random(f"{seed}-bench-eval"))


def measure(model: Any, tok: Any, records: list[dict[str, Any]], *, max_new_tokens: int, batch_size: int,
            single_prompts: int, equal_length: bool = False, repeats: int = 1,
            template: str = "alpaca") -> dict[str, Any]:
    """Answers per second batched (all records) and one at a time (the first ``single_prompts``).

    Medians over ``repeats``, the two sides interleaved repeat by repeat; prompts in ``template``.
    """
    import statistics

    from unbackdoor.lm.evaluate import generate

    force = max_new_tokens if equal_length else 0
    generate(model, tok, records[:2], batch_size=2, max_new_tokens=4, template=template)  # warm-up
    sub = records[:single_prompts]
    tb, ts = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        batched = generate(model, tok, records, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           min_new_tokens=force, template=template)
        tb.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        single = generate(model, tok, sub, batch_size=1, max_new_tokens=max_new_tokens, min_new_tokens=force,
                          template=template)
        ts.append(time.perf_counter() - t0)
    t_batched, t_single = statistics.median(tb), statistics.median(ts)
    tokens = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in batched]
    same = sum(a == b for a, b in zip(batched[: len(single)], single))
    per_batched = len(records) / t_batched
    per_single = len(sub) / t_single
    return {"prompts": len(records), "single_prompts": len(sub), "max_new_tokens": max_new_tokens, "template": template,
            "equal_length": equal_length, "repeats": repeats,
            "batch_size": batch_size, "batched_s": round(t_batched, 3), "single_s": round(t_single, 3),
            "single_s_extrapolated_to_all": round(t_single * len(records) / len(sub), 3),
            "answers_per_s_batched": round(per_batched, 2), "answers_per_s_single": round(per_single, 2),
            "speedup": round(ratio(per_batched, per_single), 2),
            "mean_answer_tokens": round(sum(tokens) / len(tokens), 1),
            "identical_answers_batched_vs_single": f"{same}/{len(single)}"}


def run(size: str, device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    from unbackdoor.lm.models import load_causal_lm
    from unbackdoor.lm.testbed import ASSET_DIR

    s = {"smoke": dict(n=8, single=4, new=8, bs=4, repeats=1), "quick": dict(n=200, single=40, new=64, bs=16, repeats=1),
         "full": dict(n=200, single=50, new=64, bs=16, repeats=3)}[size]
    model, tok = load_causal_lm(ASSET_DIR)
    model.to(device).eval()
    records = _records(s["n"], 0)
    out: dict[str, Any] = {"settings": s}
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    rnd = LlamaForCausalLM(model.config).to(device).eval()
    for name, m in (("tiny_world_model", model), ("random_init_same_shape", rnd)):
        for mode, equal in (("", False), ("_equal_length", True)):
            out[name + mode] = measure(m, tok, records, max_new_tokens=s["new"], batch_size=s["bs"],
                                       single_prompts=s["single"], equal_length=equal, repeats=s["repeats"])
    return out
