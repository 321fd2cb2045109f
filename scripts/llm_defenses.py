#!/usr/bin/env python
"""The LLM defenses beside CROW on the LM tiny world, over several seeds (issue 16).

For each seed, every defense runs against the same backdoored tiny model (BadNets refusal,
cached per seed) on the same clean subset, through ``unbackdoor.lm.testbed.run_tiny_world``
(the budgets of each defense's spec; every SFT-based defense, plain finetuning included, gets
the world's training budget, i.e. CROW's learning rate and steps). Resumable: a (seed, defense)
whose run folder holds a metrics.json is not run again. Raw metrics go to
results/llm_defenses/tiny/<defense>-seed<N>.json; ``--collect`` prints the Markdown table.

    python scripts/llm_defenses.py --seeds 0 1 2
    python scripts/llm_defenses.py --seeds 0 --defenses wanda cleangen
    python scripts/llm_defenses.py --collect

Not part of the test suite (minutes per seed on a CPU).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFENSES = ("finetune", "prune", "prune-2of4", "wanda", "wanda-2of4", "quantize", "quantize-int8", "lora-scale",
            "merge", "merge-ties", "merge-dare", "cleangen", "beear", "crow")
KEYS = ("asr", "strict_asr", "triggered_utility", "clean_utility", "rouge_l", "false_trigger_rate", "target_loss")
RESULTS = ROOT / "results" / "llm_defenses" / "tiny"


def run(seeds: list[int], defenses: list[str], out: Path, attack: str, task: str) -> None:
    from unbackdoor.core.runs import atomic_write_json, relative_to_checkout
    from unbackdoor.lm.testbed import run_tiny_world

    RESULTS.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for d in defenses:
            folder = out / f"{attack}-{task}" / d / f"seed{seed}"
            if not (folder / "metrics.json").is_file():
                t0 = time.perf_counter()
                run_tiny_world(out, seed=seed, attack=attack, task=task, defenses=(d,), echo=False)
                print(f"[llm-defenses] seed {seed} {d}: {time.perf_counter() - t0:.0f} s", flush=True)
            m = json.loads((folder / "metrics.json").read_text())
            tm = json.loads((folder / "threat_model.json").read_text())
            timings = json.loads((folder / "timings.json").read_text())
            atomic_write_json(RESULTS / f"{d}-seed{seed}.json", relative_to_checkout({
                "defense": d, "seed": seed, "attack": attack, "task": task, "metrics": m, "timings": timings,
                "needs": tm["needs"], "given": {k: v for k, v in tm["given"].items() if k != "defense_info"},
                "defense_info": tm["given"].get("defense_info"),
                "config": json.loads((folder / "config.json").read_text()).get("config")}, ROOT))


def _ms(vals: list[float]) -> str:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def needs_text(needs: dict[str, bool]) -> str:
    parts = [label for key, label in (("clean_data", "clean data"), ("base_model", "base model"),
                                      ("behaviour_examples", "behaviour examples"), ("trains", "training"))
             if needs.get(key)]
    return ", ".join(parts) or "nothing"


def collect(defenses: list[str]) -> str:
    return collect_rows(RESULTS, defenses)


def collect_rows(results: Path, defenses: list[str]) -> str:
    """The Markdown table of every (defense, seed) JSON under ``results``: mean ± sd over seeds."""
    rows = []
    before: dict[str, list[float]] = {}
    seeds_seen: set[int] = set()
    for d in defenses:
        files = sorted(results.glob(f"{d}-seed*.json"))
        if not files:
            continue
        recs = [json.loads(f.read_text()) for f in files]
        seeds_seen |= {r["seed"] for r in recs}
        for r in recs:
            for k in KEYS:
                before.setdefault(f"{r['seed']}:{k}", []).append(r["metrics"]["before"][k])
        cells = [_ms([r["metrics"]["after"][k] for r in recs]) for k in KEYS[:-1]]
        secs = _ms([r["metrics"]["seconds"] for r in recs])
        mem = [r["metrics"]["peak_memory_mib"] for r in recs if r["metrics"].get("peak_memory_mib") is not None]
        mem_cell = f"{statistics.fmean(mem):.0f} ({len(mem)})" if mem else "n/a"  # runs before it was recorded lack it
        rows.append(f"| {d} | " + " | ".join(cells) + f" | {secs} | {mem_cell} | {needs_text(recs[0]['needs'])} | "
                    f"{','.join(str(r['seed']) for r in recs)} |")
    head = ("| defense | keyword ASR | strict ASR | triggered utility | clean utility (EM) | clean ROUGE-L | "
            "false-trigger rate | seconds | extra MiB (runs) | needs | seeds |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    bd = [_ms([before[f"{s}:{k}"][0] for s in sorted(seeds_seen) if f"{s}:{k}" in before]) for k in KEYS[:-1]]
    return "\n".join([head, "| backdoored (before) | " + " | ".join(bd) + " | | | | " +
                      ",".join(map(str, sorted(seeds_seen))) + " |", *rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--defenses", nargs="+", default=list(DEFENSES))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "llm-defenses", help="run folders")
    ap.add_argument("--attack", default="badnet")
    ap.add_argument("--task", default="refusal")
    ap.add_argument("--collect", action="store_true", help="only print the table from results/")
    a = ap.parse_args(argv)
    os.environ.setdefault("UNBACKDOOR_QUIET", "1")
    if not a.collect:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        run(a.seeds, a.defenses, a.out, a.attack, a.task)
    print(collect(a.defenses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
