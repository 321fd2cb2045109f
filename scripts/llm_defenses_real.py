#!/usr/bin/env python
"""The LLM defenses beside CROW on SmolLM2-135M-Instruct (issue 16), against issue 13's backdoored model.

Reuses the real-model protocol of issue 13 (scripts/real_lm.py): the refusal/vpi backdoor
(LoRA SFT on 150 poisoned + 150 clean-twin official records, merged), its 100 clean and 100
triggered official test prompts (triggered references stripped of the stray target prefix), the
100 official clean defense samples, the model's own chat template, greedy decoding of 32 new
tokens, ROUGE-L utilities. The base model is the GGUF-converted SmolLM2-135M-Instruct that the
attack started from. The backdoored model is evaluated once (cached); each defense then runs
through ``unbackdoor.lm.flow.defend_loaded`` into a full run folder. Resumable: a defense whose
run folder holds metrics.json is skipped. Raw metrics: results/llm_defenses/smollm2/.

    python scripts/llm_defenses_real.py --real-runs runs/real_lm --base ~/.cache/unbackdoor/gguf/SmolLM2-...
    python scripts/llm_defenses_real.py ... --defenses quantize wanda --seeds 0
    python scripts/llm_defenses_real.py --collect

Not part of the test suite (hours on a shared 2-core CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_defenses import KEYS, collect_rows  # noqa: E402

RESULTS = ROOT / "results" / "llm_defenses" / "smollm2"
DATA = ROOT.parent / "shared" / "data" / "backdoorllm"
DEFENSES = ("quantize", "wanda", "cleangen", "lora-scale", "merge", "prune", "quantize-int8", "merge-ties", "beear")
SEEDED = {"beear", "merge-dare", "finetune", "crow"}  # the others are deterministic: one run stands for every seed
OVERRIDES: dict[str, dict[str, Any]] = {
    # CROW's SmolLM2 budget in issue 13 (lr 1e-3, 5 epochs, batch 2 x 4); BEEAR's inner loop cut to 2 steps for the CPU
    "beear": {"learning_rate": 1e-3, "num_train_epochs": 5.0, "per_device_train_batch_size": 2,
              "gradient_accumulation_steps": 4, "max_length": 256, "save_steps": 10, "inner_steps": 2},
    "wanda": {"max_length": 256, "batch_size": 4},
    "lora-scale": {"max_length": 256, "batch_size": 4},
}


def real_lm_rows(task: str) -> str:
    """CROW and the finetuning points of scripts/real_lm.py on the same backdoored model, data and evaluation,
    as rows of the same table (mean ± sd over their seeds; seconds: training, from its summary)."""
    from llm_defenses import _ms

    res = ROOT / "results" / "real_lm"
    models = json.loads((res / "summary.json").read_text())["tasks"].get(task.replace("-", "/"), {}).get("models", {})
    rows = []
    for name in ("ft-lr2e-4", "ft-lr1e-3", "crow"):
        files = sorted((res / task).glob(f"eval-{name}-seed*.json"))
        if not files:
            continue
        recs = [json.loads(f.read_text())["metrics"] for f in files]
        seeds = [f.stem.rpartition("-seed")[2] for f in files]
        secs = [models.get(f"{name}-seed{sd}", {}).get("train_seconds") for sd in seeds]
        cells = [_ms([r.get(k) for r in recs]) for k in KEYS[:-1]]
        rows.append(f"| {name} (real_lm.py) | " + " | ".join(cells) +
                    f" | {_ms([x for x in secs if x is not None])} | n/a | clean data, training | {','.join(seeds)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real-runs", type=Path, help="issue 13's runs/real_lm folder (data/ and <task>/backdoored/)")
    ap.add_argument("--base", type=Path, help="the clean base model folder (the converted SmolLM2-135M-Instruct)")
    ap.add_argument("--task", default="refusal-vpi")
    ap.add_argument("--defenses", nargs="+", default=list(DEFENSES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "llm-defenses-smollm2")
    ap.add_argument("--collect", action="store_true")
    a = ap.parse_args(argv)
    if a.collect:
        print(collect_rows(RESULTS, a.defenses))
        print(real_lm_rows(a.task))
        return 0
    os.environ.setdefault("UNBACKDOOR_QUIET", "1")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from unbackdoor.core.runs import atomic_write_json, relative_to_checkout
    from unbackdoor.lm.data import read_alpaca
    from unbackdoor.lm.evaluate import EvalConfig
    from unbackdoor.lm.flow import defend_loaded, evaluation_block, resolve_defense
    from unbackdoor.lm.models import load_causal_lm
    from unbackdoor.lm.poison import PoisonConfig
    from unbackdoor.lm.testbed import behaviour_examples

    task, trigger = a.task.split("-")
    data_dir = a.real_runs / "data" / a.task
    suspect_dir = a.real_runs / a.task / "backdoored" / "model"
    test, triggered = read_alpaca(data_dir / "test_clean.json"), read_alpaca(data_dir / "test_triggered.json")
    clean = read_alpaca(DATA / "consistency_data" / "consistency_data.json")
    poison = PoisonConfig(attack=trigger, task=task)
    ecfg = EvalConfig(batch_size=16, max_new_tokens=32, template="chat", exact_match=False)
    out = a.out / a.task
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "before.json"
    if cache.is_file():
        c = json.loads(cache.read_text())
        before = (c["metrics"], c["generations"], c["layer_cosine"])
    else:
        t0 = time.perf_counter()
        model, tok = load_causal_lm(suspect_dir)
        before = evaluation_block(model, tok, test, triggered, poison, ecfg, "backdoored", 32)
        atomic_write_json(cache, {"metrics": before[0], "generations": before[1], "layer_cosine": before[2],
                                  "seconds": time.perf_counter() - t0})
        del model
    print("[real] backdoored:", {k: round(v, 3) for k, v in before[0].items()}, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for d in a.defenses:
        for seed in (a.seeds if d in SEEDED else a.seeds[:1]):
            run_dir = out / d / f"seed{seed}"
            if not (run_dir / "metrics.json").is_file():
                spec, cfg, preset = resolve_defense(d, overrides={**OVERRIDES.get(d.split("-")[0], {}), "seed": seed})
                if spec.needs.behaviour_examples:
                    import dataclasses

                    cfg = dataclasses.replace(cfg, behaviour=str(behaviour_examples(out, clean, poison)))
                model, tok = load_causal_lm(suspect_dir)
                t0 = time.perf_counter()
                defend_loaded(run_dir, model, tok, clean, list(range(len(clean))), spec.name, cfg, preset=preset,
                              test=test, triggered=triggered, poison=poison, eval_cfg=ecfg, template="chat",
                              before=before, n_profile=32, name=d, overwrite=True,
                              sources={"model": str(suspect_dir), "clean": "consistency_data/consistency_data.json",
                                       "test": str(data_dir / "test_clean.json"),
                                       "triggered": str(data_dir / "test_triggered.json")},
                              inputs=[suspect_dir], base_model=a.base if spec.needs.base_model else None)
                print(f"[real] {d} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
                del model
            m = json.loads((run_dir / "metrics.json").read_text())
            tm = json.loads((run_dir / "threat_model.json").read_text())
            atomic_write_json(RESULTS / f"{d}-seed{seed}.json", relative_to_checkout({
                "defense": d, "seed": seed, "task": a.task, "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)",
                "metrics": m, "timings": json.loads((run_dir / "timings.json").read_text()), "needs": tm["needs"],
                "defense_info": tm["given"].get("defense_info"),
                "config": json.loads((run_dir / "config.json").read_text()).get("config"),
                "deterministic": d not in SEEDED}, ROOT, home=Path.home()))
            print(f"[real] {d} seed {seed}:", {k: round(m['after'][k], 3) for k in KEYS if k in m["after"]}, flush=True)
    print(collect_rows(RESULTS, a.defenses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
