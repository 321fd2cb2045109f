"""Where the time goes: the PyTorch profiler on one CROW step and one ULRL relearning epoch.

Returns the top operators by self CPU time (the table is also written into BENCHMARKS.md).
"""
from __future__ import annotations

import tempfile
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def _top(prof: Any, n: int) -> dict[str, Any]:
    rows = []
    avgs = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in avgs) or 1.0
    for e in sorted(avgs, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]:
        rows.append({"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000, 2),
                     "self_pct": round(100 * e.self_cpu_time_total / total, 1), "calls": e.count})
    return {"total_self_ms": round(total / 1000, 1), "top": rows}


def crow_step(size: str) -> dict[str, Any]:
    from bench_crow import SIZES, make_steps, random_case

    lg = SIZES[size]["large"]
    case = random_case("profile", vocab=lg["vocab"], hidden=lg["hidden"], layers=lg["layers"], heads=lg["heads"],
                       seq_len=lg["seq_len"], batch_size=lg["batch"])
    with tempfile.TemporaryDirectory(prefix="ub-bench-") as work:
        _, steps, _ = make_steps(case, "lora", work, torch.device("cpu"), check_equivalence=False)
        steps["crow"]()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps["crow"]()
    return {"what": f"one CROW LoRA step, llama {lg['layers']}L/{lg['hidden']}h, batch {lg['batch']} x {lg['seq_len']}",
            **_top(prof, 15)}


def ulrl_epoch(size: str) -> dict[str, Any]:
    from bench_classify import _model, clean_subset
    from unbackdoor.classify.defenses.ulrl import ULRLConfig, relearn

    name, n = ("tiny", 64) if size == "smoke" else ("preactresnet18", 256)
    model = _model(name, 0)
    clean = clean_subset(n)
    cfg = ULRLConfig(relearn_epochs=1, min_clean_per_class=1)
    from unbackdoor.classify.models import find_head

    head_name, _ = find_head(model, 10)
    relearn(model, head_name, [0], clean, cfg)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        relearn(model, head_name, [0], clean, cfg)
    return {"what": f"one ULRL relearning epoch, {name}, {n} clean images, batch 128", **_top(prof, 15)}


def run(size: str) -> dict[str, Any]:
    return {"crow_step": crow_step(size), "ulrl_epoch": ulrl_epoch(size)}


def _loop(target: str, loops: int) -> None:
    """Repeat a CROW step (``crow``) or a ULRL relearning epoch (``ulrl``, ``ulrl-tiny``): py-spy's target."""
    if target == "crow":
        from bench_crow import SIZES, make_steps, random_case

        lg = SIZES["full"]["large"]
        case = random_case("pyspy", vocab=lg["vocab"], hidden=lg["hidden"], layers=lg["layers"], heads=lg["heads"],
                           seq_len=lg["seq_len"], batch_size=lg["batch"])
        with tempfile.TemporaryDirectory(prefix="ub-bench-") as work:
            _, steps, _ = make_steps(case, "lora", work, torch.device("cpu"), check_equivalence=False)
            for _ in range(loops):
                steps["crow"]()
    else:
        from bench_classify import _model, clean_subset
        from unbackdoor.classify.models import find_head
        from unbackdoor.classify.defenses.ulrl import ULRLConfig, relearn

        name, n = ("tiny", 500) if target == "ulrl-tiny" else ("preactresnet18", 256)
        model, clean = _model(name, 0), clean_subset(n)
        head_name, _ = find_head(model, 10)
        relearn(model, head_name, [0], clean, ULRLConfig(relearn_epochs=loops, min_clean_per_class=1))


if __name__ == "__main__":  # py-spy record -r 50 --format raw -o out.txt -- python benchmarks/profile_steps.py crow 5
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ.setdefault("UNBACKDOOR_QUIET", "1")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    _loop(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5)
