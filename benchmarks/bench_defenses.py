"""Item 7: the cost of each LM defense relative to plain finetuning on the same model and clean data.

The shipped clean tiny Llama (the tiny world's model) plays the suspect; the same model is the
"base" of the reference-model defenses (their cost does not depend on what the weights hold).
Each defense runs with its tiny-world settings (``TinyRunConfig().defense_config(name, "demo")``:
the world's training budget for every SFT-based defense, each spec's ``demo`` budget) on the
world's clean subset, on a fresh copy of the model per repeat; seconds are the defense alone
(no evaluation), memory is the peak RSS increase while it runs, in this process (the first run
of a kind also pays for its allocator growth; see ``common.py``). CleanGen changes generation
rather than weights, so its cost is a generation-time ratio: CleanGen decoding over plain
greedy decoding of the same prompts (interleaved repeats, medians), with a reference whose
weights differ slightly from the suspect's so that some drafted tokens are replaced.
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import PeakRSS, mib, ratio, say

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
    from unbackdoor.lm.defenses.cleangen import CleanGenConfig, CleanGenModel
    from unbackdoor.lm.evaluate import generate

    sz = SIZES[size]
    suspect = env["model"]
    reference = copy.deepcopy(suspect)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * p.detach().abs().mean() * torch.randn(p.shape, generator=g))
    wrapped = CleanGenModel(suspect, reference, CleanGenConfig())
    prompts = env["test"][: sz["prompts"]]
    kw = dict(template="alpaca", batch_size=16, max_new_tokens=sz["new_tokens"])
    plain_s, clean_s, outs = [], [], {}
    for _ in range(sz["repeats"]):
        for label, m, acc in (("plain", suspect, plain_s), ("cleangen", wrapped, clean_s)):
            t0 = time.perf_counter()
            outs[label] = generate(m, env["tok"], prompts, **kw)
            acc.append(time.perf_counter() - t0)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    tokens = {k: sum(len(env["tok"](t, add_special_tokens=False)["input_ids"]) for t in v) for k, v in outs.items()}
    st = wrapped.stats
    return {"prompts": len(prompts), "max_new_tokens": sz["new_tokens"], "repeats": sz["repeats"],
            "plain_s": round(med(plain_s), 4), "cleangen_s": round(med(clean_s), 4),
            "cleangen_over_plain": round(ratio(med(clean_s), med(plain_s)), 3),
            "answer_tokens": tokens, "replaced_windows": st.get("replaced", 0), "kept_tokens": st.get("tokens", 0),
            "answers_differ": sum(a != b for a, b in zip(outs["plain"], outs["cleangen"]))}


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
            samples, mems, info = [], [], {}
            for r in range(reps):
                secs, peak, info = _one(name, env, Path(tmp) / f"{name}-{r}")
                samples.append(secs)
                mems.append(peak)
            med = sorted(samples)[len(samples) // 2]
            res["defenses"][name] = {"seconds": round(med, 4), "samples_s": [round(s, 4) for s in samples],
                                     "peak_extra_mib": round(mib(max(mems)), 1),
                                     "info": {k: v for k, v in info.items() if not isinstance(v, (dict, list))}}
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
    return ["## 7. LM defenses: cost relative to plain finetuning", "",
            f"The shipped tiny Llama ({d['model_parameters']:,} parameters), {d['clean_records']} clean records, each "
            "defense with its tiny-world settings (finetune, BEEAR and CROW: the world's training budget, LoRA r8, "
            "5 epochs); seconds of the defense alone (median of repeats), peak RSS increase in-process.", "",
            table(["defense", "seconds", "/ finetune", "peak extra MiB"], rows), "",
            f"CleanGen generation: {g['prompts']} prompts x up to {g['max_new_tokens']} new tokens, greedy: plain "
            f"{fmt(g['plain_s'], 3)} s, CleanGen {fmt(g['cleangen_s'], 3)} s = **{fmt(g['cleangen_over_plain'])}x** "
            f"(paper: ~1.3x); {g['replaced_windows']} drafted windows had a token replaced, {g['answers_differ']} of "
            f"{g['prompts']} answers changed (reference = the suspect with 2% weight noise).", ""]
