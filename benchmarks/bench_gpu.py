"""Item 6: items 1 and 2 on a GPU in bf16 at a ~1B-parameter random-init Llama.

Runs only when CUDA is present (never in CI). Records step time, tokens/s and peak GPU memory
(``torch.cuda.max_memory_allocated``) for SFT / CROW / reference, LoRA and full finetuning, and
batched vs one-at-a-time generation. ``shape`` can be shrunk to exercise the code path on CPU.
"""
from __future__ import annotations

from typing import Any

import torch

# ~1.1B parameters (TinyLlama-1.1B's shape with full multi-head attention)
ONE_B = dict(vocab=32000, hidden=2048, layers=22, heads=32, intermediate=5632, seq_len=512, batch=4)
# --smoke (the CI test) only exercises the code path, also on a CUDA machine
SMOKE = dict(vocab=512, hidden=64, layers=3, heads=4, intermediate=128, seq_len=32, batch=2)


def run(size: str, device: torch.device | None = None, shape: dict[str, int] | None = None) -> dict[str, Any]:
    from bench_crow import measure_case, random_case

    device = device or torch.device("cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    shape = shape or (SMOKE if size == "smoke" else ONE_B)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    case = random_case("llama-1b-bf16" if shape is ONE_B else "llama-small", vocab=shape["vocab"], hidden=shape["hidden"], layers=shape["layers"],
                       heads=shape["heads"], intermediate=shape["intermediate"], seq_len=shape["seq_len"],
                       batch_size=shape["batch"], dtype=dtype)
    out: dict[str, Any] = {"shape": shape, "dtype": str(dtype), "device": str(device),
                           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                           "cases": []}
    repeats = 1 if size == "smoke" else 5
    for mode in ("lora", "full"):
        out["cases"].append(measure_case(case, mode, warmup=2 if size != "smoke" else 1, repeats=repeats,
                                         device=device))
    # generation: 200 prompts of random tokens, up to 64 new tokens
    import time


    model = case.model.to(device).eval()
    n, new, bs = (8, 4, 4) if size == "smoke" else (200, 64, 16)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, shape["vocab"], (n, 32), generator=g)

    @torch.no_grad()
    def gen(batch: int) -> float:
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            ids = prompts[i:i + batch].to(device)
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                           use_cache=True, pad_token_id=0, eos_token_id=None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    gen(bs)
    tb, ts = gen(bs), gen(1)
    out["generation"] = {"prompts": n, "max_new_tokens": new, "batch_size": bs, "batched_s": round(tb, 3),
                         "single_s": round(ts, 3), "speedup": round(ts / tb, 2),
                         "new_tokens_per_s_batched": round(n * new / tb, 1)}
    return out
