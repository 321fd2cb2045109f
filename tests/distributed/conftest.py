"""Launching real multi-process jobs from tests: free ports, CPU only, timeouts, readable failures."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CPU_CONFIG = ROOT / "configs" / "accelerate" / "cpu-2proc.yaml"


def job_env() -> dict[str, str]:
    """The environment of a launched job: CPU only (gloo), one thread per process, quiet, no hub access."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(k, None)  # a test run inside a launched job must not leak its own rank
    env.update({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "UNBACKDOOR_QUIET": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONWARNINGS": "ignore"})
    return env


def run_job(cmd: list[str], *, timeout: float, what: str) -> float:
    """Run ``cmd``; fail the test with the command and the end of its output if it fails or hangs."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-3000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-3000:]
        pytest.fail(f"{what} did not finish within {timeout:.0f} s (a hang in a collective?)\n"
                    f"command: {' '.join(cmd)}\n--- output tail ---\n{out}")
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stdout + "\n" + proc.stderr)[-4000:]
        pytest.fail(f"{what} exited with {proc.returncode} after {seconds:.0f} s\ncommand: {' '.join(cmd)}\n"
                    f"--- output tail ---\n{tail}")
    return seconds


def accelerate_cmd(script: Path, *args: str, num_processes: int = 2) -> list[str]:
    """``accelerate launch`` with the 2-process CPU config and a port that is free now."""
    launcher = [sys.executable, "-m", "accelerate.commands.accelerate_cli"]  # this interpreter's accelerate
    return [*launcher, "launch", "--config_file", str(CPU_CONFIG), "--num_processes", str(num_processes),
            "--main_process_port", str(free_port()), str(script), *args]


def torchrun_cmd(script: Path, *args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *args]


def free_port() -> int:
    """A TCP port free right now on localhost (for ``--main_process_port``)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
