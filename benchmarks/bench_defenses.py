"""Item 7: the cost of each LM defense relative to plain finetuning on the same model and clean data.

The shipped clean tiny Llama (the tiny world's model) plays the suspect; the same model is the
"base" of the reference-model defenses (their cost does not depend on what the weights hold).
Each defense runs with its tiny-world settings (``TinyRunConfig().defense_config(name, "demo")``:
the world's training budget for every SFT-based defense, each spec's ``demo`` budget) on the
world's clean subset, on a fresh copy of the model per repeat; seconds are the defense alone
(no evaluation, median of repeats in this process). Memory is the peak RSS increase while the
defense runs, measured once per defense in its own child process started with the malloc
setting of ``common.memory_env`` (freed tensors leave RSS, and no defense inherits another's
heap). CleanGen changes generation rather than weights, so its cost is a generation-time ratio:
CleanGen decoding over plain greedy decoding of the same prompts (interleaved repeats, medians),
once with the suspect itself as reference (nothing is replaced: the machinery's own cost) and
once with a freshly initialised reference (replacements nearly everywhere: the worst case).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import PeakRSS, memory_env, mib, ratio, say
from unbackdoor.core.runs import relative_to_checkout

DEFENSES = ("finetune", "prune", "wanda", "wanda-2of4", "quantize", "quantize-int8", "lora-scale", "merge",
            "merge-ties", "cleangen", "beear", "crow")
SIZES = {"smoke": {"clean": 8, "prompts": 4, "new_tokens": 4, "repeats": 1, "train_repeats": 1, "epochs": 1.0},
         "quick": {"clean": 64, "prompts": 32, "new_tokens": 16, "repeats": 2, "train_repeats": 1, "epochs": 2.0},
         "full": {"clean": None, "prompts": 64, "new_tokens": 32, "repeats": 3, "train_repeats": 2, "epochs": None}}


def _setup(tmp: Path, size: str) -> dict[str, Any]:
    from unbackdoor.lm.models import load_causal_lm
    from unbackdoor.lm.testbed import ASSET_DIR, behaviour_examples, tiny_run_config
    from unbackdoor.lm.tinyworld import build_tiny_world
    from unbackdoor.lm.poison import PoisonConfig

    cfg = tiny_run_config(False)
    world = build_tiny_world(tmp / "world", 0, cfg.world)
    n = SIZES[size]["clean"]
    clean = list(world["clean"])[:n] if n else list(world["clean"])
    if SIZES[size]["epochs"]:
        cfg.training = {**cfg.training, "num_train_epochs": SIZES[size]["epochs"]}
    model, tok = load_causal_lm(ASSET_DIR)
    beh = behaviour_examples(tmp, clean, PoisonConfig(task="refusal"))
    return {"cfg": cfg, "clean": clean, "model": model.eval(), "tok": tok, "test": list(world["test"]),
            "behaviour": beh, "asset": ASSET_DIR}


def _one(name: str, env: dict[str, Any], work: Path) -> tuple[float, int, dict[str, Any]]:
    import dataclasses

    from unbackdoor.core.seeds import set_seed
    from unbackdoor.lm.defenses import LMDefenseContext
    from unbackdoor.lm.models import load_causal_lm

    spec, cfg, _ = env["cfg"].defense_config(name, "demo")
    if spec.needs.behaviour_examples:
        cfg = dataclasses.replace(cfg, behaviour=str(env["behaviour"]))
    model = copy.deepcopy(env["model"])
    ctx = LMDefenseContext(work_dir=work, template="alpaca", base_model_path=str(env["asset"]),
                           base_model_loader=lambda: load_causal_lm(env["asset"]), model_path=str(env["asset"]))
    set_seed(0)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        spec.run(model, env["tok"], env["clean"], cfg, ctx)
        secs = time.perf_counter() - t0
    return secs, int(mem.peak), dict(ctx.record)


def _generation(env: dict[str, Any], size: str) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    from unbackdoor.lm.defenses.cleangen import CleanGenConfig, CleanGenModel
    from unbackdoor.lm.evaluate import generate

    sz = SIZES[size]
    suspect = env["model"]
    torch.manual_seed(0)
    references = {"same": suspect, "random": LlamaForCausalLM(suspect.config).eval()}
    prompts = env["test"][: sz["prompts"]]
    kw = dict(template="alpaca", batch_size=16, max_new_tokens=sz["new_tokens"])
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    out: dict[str, Any] = {"prompts": len(prompts), "max_new_tokens": sz["new_tokens"], "repeats": sz["repeats"]}
    for label, ref in references.items():
        wrapped = CleanGenModel(suspect, ref, CleanGenConfig())
        plain_s, clean_s, answers = [], [], {}
        for _ in range(sz["repeats"]):
            for kind, m, acc in (("plain", suspect, plain_s), ("cleangen", wrapped, clean_s)):
                t0 = time.perf_counter()
                answers[kind] = generate(m, env["tok"], prompts, **kw)
                acc.append(time.perf_counter() - t0)
        n_tok = {k: sum(len(env["tok"](t, add_special_tokens=False)["input_ids"]) for t in v) for k, v in answers.items()}
        out[label] = {"plain_s": round(med(plain_s), 4), "cleangen_s": round(med(clean_s), 4),
                      "cleangen_over_plain": round(ratio(med(clean_s), med(plain_s)), 3), "answer_tokens": n_tok,
                      "replaced_windows": wrapped.stats.get("replaced", 0), "kept_tokens": wrapped.stats.get("tokens", 0),
                      "answers_differ": sum(a != b for a, b in zip(answers["plain"], answers["cleangen"]))}
    return out


def memory_child(name: str, size: str, out: str) -> int:
    """Child process: one run of defense ``name``, its peak RSS increase written to ``out``."""
    with tempfile.TemporaryDirectory(prefix="ub-bench-defmem-") as tmp:
        env = _setup(Path(tmp), size)
        _, peak, _ = _one(name, env, Path(tmp) / "work")
    Path(out).write_text(json.dumps({"peak_extra_mib": round(mib(peak), 1)}))
    return 0


def _memory(name: str, size: str) -> float | None:
    with tempfile.TemporaryDirectory(prefix="ub-bench-defmem-") as tmp:
        out = os.path.join(tmp, "mem.json")
        env = {**memory_env(), "UNBACKDOOR_QUIET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), *sys.path])}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), name, size, out], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(out):
            say(f"defenses: memory of {name} failed: {(proc.stdout + proc.stderr)[-500:]}")
            return None
        return json.loads(Path(out).read_text())["peak_extra_mib"]


def run(size: str) -> dict[str, Any]:
    sz = SIZES[size]
    res: dict[str, Any] = {"size": size, "defenses": {}}
    with tempfile.TemporaryDirectory(prefix="ub-bench-def-") as tmp:
        env = _setup(Path(tmp), size)
        res["clean_records"] = len(env["clean"])
        res["model_parameters"] = sum(p.numel() for p in env["model"].parameters())
        for name in DEFENSES:
            spec_trains = name in ("finetune", "beear", "crow")
            reps = sz["train_repeats"] if spec_trains else sz["repeats"]
            samples, info = [], {}
            for r in range(reps):
                secs, _, info = _one(name, env, Path(tmp) / f"{name}-{r}")
                samples.append(secs)
            med = sorted(samples)[len(samples) // 2]
            res["defenses"][name] = {"seconds": round(med, 4), "samples_s": [round(s, 4) for s in samples],
                                     "peak_extra_mib": _memory(name, size) if size != "smoke" else None,
                                     "info": relative_to_checkout({k: v for k, v in info.items() if not isinstance(v, (dict, list))},
                                                                  Path(__file__).resolve().parent.parent)}
            say(f"defenses: {name} {med:.3f} s")
        ft = res["defenses"]["finetune"]["seconds"]
        for v in res["defenses"].values():
            v["over_finetune"] = round(ratio(v["seconds"], ft), 4)
        res["cleangen_generation"] = _generation(env, size)
    return res


def render(d: dict[str, Any], fmt: Any, table: Any) -> list[str]:
    """The BENCHMARKS.md section (called from report.py)."""
    rows = [[name, fmt(v["seconds"], 3), fmt(v["over_finetune"], 3), fmt(v["peak_extra_mib"], 1)]
            for name, v in d["defenses"].items()]
    g = d["cleangen_generation"]
    lines = ["## 7. LM defenses: cost relative to plain finetuning", "",
             f"The shipped tiny Llama ({d['model_parameters']:,} parameters), {d['clean_records']} clean records, each "
             "defense with its tiny-world settings (finetune, BEEAR and CROW: the world's training budget, LoRA r8); "
             "seconds of the defense alone (median of repeats, no evaluation); peak RSS increase while it runs, in a "
             "child process of its own (`benchmarks/bench_defenses.py`). The reference-model defenses load the base "
             "model inside the measured region.", "",
             table(["defense", "seconds", "/ finetune", "peak extra MiB"], rows), ""]
    for label, text in (("same", "reference = the suspect itself (nothing replaced: the machinery's cost)"),
                        ("random", "reference = a freshly initialised model (replacements nearly everywhere)")):
        c = g.get(label)
        if c:
            lines += [f"CleanGen generation, {text}: {g['prompts']} prompts x up to {g['max_new_tokens']} new tokens, "
                      f"greedy, batch 16: plain {fmt(c['plain_s'], 3)} s, CleanGen {fmt(c['cleangen_s'], 3)} s = "
                      f"**{fmt(c['cleangen_over_plain'])}x** (paper: ~1.3x per token); {c['replaced_windows']} windows "
                      f"with a replacement, {c['answers_differ']} of {g['prompts']} answers changed.", ""]
    return lines


if __name__ == "__main__":
    sys.exit(memory_child(*sys.argv[1:4]))
