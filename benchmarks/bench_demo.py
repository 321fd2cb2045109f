"""Item 5: end-to-end wall time of ``unbackdoor demo`` in a fresh subprocess (target: 5 minutes)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Any

CLI = "from unbackdoor.cli import main; raise SystemExit(main())"


def run(size: str, timeout_s: float = 600.0) -> dict[str, Any]:
    """Runs the full demo (``--quick`` demo for the runner's quick/smoke sizes)."""
    quick = size != "full"
    with tempfile.TemporaryDirectory(prefix="ub-bench-demo-") as tmp:
        cmd = [sys.executable, "-c", CLI, "--quiet", "demo", "--out", os.path.join(tmp, "demo")]
        if quick:
            cmd.append("--quick")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
        except subprocess.TimeoutExpired:
            rc, tail = None, f"timed out after {timeout_s:.0f} s"
        wall = time.perf_counter() - t0
        timings = None
        path = os.path.join(tmp, "demo", "demo_timings.json")
        if os.path.isfile(path):
            import json

            with open(path) as f:
                timings = json.load(f)
    return {"command": "unbackdoor --quiet demo --out DIR" + (" --quick" if quick else ""), "quick": quick,
            "returncode": rc, "wall_s": round(wall, 1), "demo_timings_s": timings,
            "ok": rc == 0, "output_tail": tail if rc != 0 else tail[-600:]}
