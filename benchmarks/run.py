#!/usr/bin/env python
"""Run every benchmark of unbackdoor in one process and write BENCHMARKS.md + benchmarks/results.json.

    python benchmarks/run.py                  # default sizes (< 15 min on a 2-core CPU)
    python benchmarks/run.py --quick          # smaller, for development
    python benchmarks/run.py --only crow,eval # a subset: crow eval classify pipeline demo profile gpu real_lm
    python benchmarks/run.py --smoke --out-json /tmp/r.json --out-md /tmp/B.md   # seconds; the CI smoke test

Timings are medians of repeated runs after warm-up and every ratio is taken within the same
run. CPU memory is measured in a child process (see ``benchmarks/common.py`` for why); on a GPU
it is ``torch.cuda.max_memory_allocated``. Nothing here is part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

SECTIONS = ("crow", "eval", "classify", "pipeline", "demo", "profile", "gpu", "real_lm", "defenses")
SCHEMA_VERSION = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="size", const="quick", help="smaller sizes, fewer repeats")
    size.add_argument("--smoke", action="store_const", dest="size", const="smoke",
                      help="toy sizes that only check the code paths and the JSON schema (seconds)")
    p.set_defaults(size="full")
    p.add_argument("--only", default="", help=f"comma-separated sections to run (default: all of {', '.join(SECTIONS)}; "
                                              "gpu only runs where CUDA is present)")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--out-json", default=str(HERE / "results.json"), help="raw numbers (default benchmarks/results.json)")
    p.add_argument("--out-md", default=str(ROOT / "BENCHMARKS.md"), help="the report (default BENCHMARKS.md)")
    p.add_argument("--render-only", action="store_true",
                   help="only re-render --out-md from an existing --out-json (after editing benchmarks/NOTES.md)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    only = [s.strip() for s in a.only.split(",") if s.strip()] or list(SECTIONS)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    bad = [s for s in [*only, *skip] if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {', '.join(bad)}: choose from {', '.join(SECTIONS)}")
    a.sections = [s for s in only if s not in skip]
    return a


def memory_child(size: str, out: str) -> int:
    """Child process (started with the fixed mmap threshold): item 1's peak-memory column."""
    import bench_crow

    rows = bench_crow.memory_run(size)
    Path(out).write_text(json.dumps(rows))
    return 0


def crow_with_memory(size: str, threads: int) -> dict[str, Any]:
    import bench_crow
    from common import memory_env

    res = bench_crow.run(size)
    if size == "smoke":  # no child process: the numbers mean nothing at this size, only the schema is checked
        res["memory_method"] = "smoke size: measured in-process without the malloc setting (not meaningful)"
        return res
    with tempfile.TemporaryDirectory(prefix="ub-bench-mem-") as tmp:
        out = os.path.join(tmp, "mem.json")
        env = {**memory_env(), "UNBACKDOOR_QUIET": "1", "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", out, "--threads", str(threads)]
        if size != "full":
            cmd.append(f"--{size}")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(out):
            res["memory_error"] = (proc.stdout + proc.stderr)[-2000:]
            return res
        rows = json.loads(Path(out).read_text())
    res["memory_method"] = ("peak RSS increase during one optimizer step after one warm-up step (optimizer state "
                            "already allocated), sampled every 1 ms from /proc/self/statm in a child process with "
                            "MALLOC_MMAP_THRESHOLD_=131072 so freed tensors leave RSS; CPU, fp32")
    _merge_memory(res, rows)
    return res


def _merge_memory(res: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from common import ratio

    for case in res["cases"]:
        row = next(r for r in rows if r["case"] == case["case"] and r["finetune"] == case["finetune"])
        for k, v in row["peak_mem_mib"].items():
            case["variants"][k]["peak_mem_mib"] = v
        v = case["variants"]
        case["ratios"]["crow_over_sft_mem"] = round(ratio(v["crow"]["peak_mem_mib"], v["sft"]["peak_mem_mib"]), 3)
        case["ratios"]["reference_over_crow_mem"] = round(ratio(v["reference"]["peak_mem_mib"],
                                                                v["crow"]["peak_mem_mib"]), 3)


def run_section(name: str, size: str, threads: int) -> dict[str, Any]:
    import torch

    if name == "crow":
        return crow_with_memory(size, threads)
    if name == "eval":
        import bench_eval

        return bench_eval.run(size)
    if name == "classify":
        import bench_classify

        return bench_classify.run(size)
    if name == "pipeline":
        import bench_pipeline

        return bench_pipeline.run(size)
    if name == "demo":
        import bench_demo

        if size == "smoke":
            return {"skipped": "not run at --smoke size (it takes minutes)"}
        return bench_demo.run(size)
    if name == "profile":
        import profile_steps

        return profile_steps.run(size)
    if name == "real_lm":
        import bench_real_lm

        return bench_real_lm.run(size, threads)
    if name == "defenses":
        import bench_defenses

        return bench_defenses.run(size)
    if name == "gpu":
        if not torch.cuda.is_available():
            return {"skipped": "no CUDA device on this machine: items 1-2 were not run on a GPU"}
        import bench_gpu

        return bench_gpu.run(size)
    raise ValueError(name)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("UNBACKDOOR_QUIET", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(a.threads)
    if a.memory_child:
        return memory_child(a.size, a.memory_child)
    if a.render_only:
        from report import render
        from unbackdoor.core.runs import atomic_write_text

        atomic_write_text(a.out_md, render(json.loads(Path(a.out_json).read_text()), notes=HERE / "NOTES.md"))
        print(f"[bench] rendered {a.out_md} from {a.out_json}")
        return 0
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from common import machine_info
    from report import render

    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "command": "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "size": a.size, "threads": a.threads, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(str(ROOT)), "sections": {}, "seconds": {}, "errors": {},
    }
    t_all = time.perf_counter()
    for name in a.sections:
        print(f"[bench] {name} ({a.size}) ...", flush=True)
        t0 = time.perf_counter()
        try:
            results["sections"][name] = run_section(name, a.size, a.threads)
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            results["errors"][name] = traceback.format_exc()[-3000:]
            print(f"[bench] {name} FAILED:\n{results['errors'][name]}", file=sys.stderr, flush=True)
        results["seconds"][name] = round(time.perf_counter() - t0, 1)
        print(f"[bench] {name}: {results['seconds'][name]} s", flush=True)
    results["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
    results["machine"]["load_avg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out_json, out_md = Path(a.out_json), Path(a.out_md)
    from unbackdoor.core.runs import atomic_write_text

    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_json, json.dumps(results, indent=1, default=str) + "\n")
    atomic_write_text(out_md, render(results, notes=HERE / "NOTES.md"))
    print(f"[bench] done in {results['seconds']['total']} s: {out_md}, {out_json}", flush=True)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
