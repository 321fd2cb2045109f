"""The benchmark runner still runs end to end and writes the documented JSON schema.

Timings are never asserted (speed is checked in benchmarks, not in unit tests); only that each
section produced the fields BENCHMARKS.md is rendered from.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def test_runner_smoke_writes_results_json_and_markdown(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNBACKDOOR_QUIET": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--threads", "1",
         "--only", "crow,eval,classify,pipeline,gpu", "--out-json", str(out_json), "--out-md", str(out_md)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out_json.read_text())

    assert res["schema_version"] == 1 and res["size"] == "smoke" and res["errors"] == {}
    assert set(res["sections"]) == {"crow", "eval", "classify", "pipeline", "gpu"}
    assert {"cpu", "logical_cpus", "versions", "cuda"} <= set(res["machine"])
    assert res["machine"]["versions"]["torch"]

    crow = res["sections"]["crow"]
    assert {(c["case"].split("-")[0], c["finetune"]) for c in crow["cases"]} >= {("tiny", "full"), ("tiny", "lora")}
    for case in crow["cases"]:
        assert set(case["variants"]) == {"sft", "crow", "reference"}
        for v in case["variants"].values():
            assert _number(v["step_s"]) and v["step_s"] > 0 and _number(v["peak_mem_mib"])
        assert {"crow_over_sft_time", "reference_over_crow_time", "crow_over_sft_mem"} <= set(case["ratios"])
        # CROW and the naive reference compute the same loss on the same weights
        assert case["check"]["max_abs_loss_diff"] < 1e-4
        assert case["check"]["max_abs_grad_diff"] <= 1e-5 * max(1.0, case["check"]["max_abs_grad"])
    assert crow["seq_sweep"] and crow["depth_sweep"]

    ev = res["sections"]["eval"]["tiny_world_model"]
    assert ev["prompts"] > 0 and _number(ev["speedup"])
    for name in ("ulrl", "ft", "fp", "nad"):
        assert res["sections"]["classify"]["tiny"][name]["total_s"] > 0
    assert {"unlearn", "select", "relearn"} <= set(res["sections"]["classify"]["tiny"]["ulrl"]["phases_s"])
    relative = res["sections"]["classify"]["relative_to_ft"]["defenses"]
    assert {"ft", "anp", "i-bau", "rnp", "fst", "sau", "clp"} <= set(relative)
    assert all(_number(d["over_ft"]) and _number(d["projected_over_ft"]) for d in relative.values())
    assert _number(res["sections"]["pipeline"]["tiny"]["end_to_end_over_compute"])
    gpu = res["sections"]["gpu"]
    assert "skipped" in gpu or gpu["cases"]

    md = out_md.read_text()
    assert "## Targets" in md and "## 1. CROW step cost" in md and "python benchmarks/run.py --smoke" in md


def test_runner_rejects_unknown_section(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--only", "crwo"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown section" in proc.stderr and "crwo" in proc.stderr
