"""Shared helpers of the benchmark runner: timing, peak memory, machine description.

Timing: medians of repeated runs after warm-up (``time.perf_counter``). Memory on CPU: the
peak resident-set size reached while a function runs, minus the RSS just before it, sampled
every millisecond from ``/proc/self/statm`` by a background thread. glibc keeps freed memory
in its heap unless allocations are mmap-ed, so memory is measured in a child process started
with a fixed ``MALLOC_MMAP_THRESHOLD_`` (:data:`MALLOC_ENV`): there tensors above 128 KiB are
returned to the OS when freed and RSS follows the live tensors closely. That setting makes
every large allocation a page fault (3x slower steps, measured), so timings are never taken
in that process. On CUDA the peak is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""
from __future__ import annotations

import gc
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def memory_env() -> dict[str, str]:
    """The environment of the memory-measuring child process."""
    return {**os.environ, **MALLOC_ENV}


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident-set size of this process (Linux: /proc/self/statm; elsewhere: ru_maxrss)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Context manager: ``peak`` = max RSS seen while inside minus the RSS on entry (bytes)."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.base = rss_bytes()
        self._max = self.base
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._max = max(self._max, rss_bytes())
        self._stop.set()
        self._thread.join()
        self.peak = self._max - self.base


def device_peak(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak memory (bytes above the level on entry) while ``fn`` runs, on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    with PeakRSS() as m:
        fn()
    return int(m.peak)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds of each repeat (after warm-up) and their median."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples)) if self.samples else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"median_s": round(self.median, 6), "samples_s": [round(s, 6) for s in self.samples],
                "repeats": len(self.samples)}


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3,
            device: torch.device = torch.device("cpu")) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` timed times; return the samples."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = Timing()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        t.samples.append(time.perf_counter() - t0)
    return t


def ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or "unknown"


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return None


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - a missing package is simply not reported
        return None


def _git_commit(root: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(root: str) -> dict[str, Any]:
    """What ran the benchmarks: CPU, cores, threads, memory, GPU, package versions, commit."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mem_total_bytes": _mem_total(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": _git_commit(root),
        "versions": {n: _version(n) for n in ("unbackdoor", "torch", "transformers", "peft", "accelerate",
                                               "numpy", "tokenizers", "safetensors")},
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
    }
    return info


def say(msg: str) -> None:
    """One progress line on stderr (the runner's only output besides the files it writes)."""
    print(f"[bench]   {msg}", file=sys.stderr, flush=True)


def mib(n: float) -> float:
    return round(n / 2**20, 2)
