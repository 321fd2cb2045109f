"""How much memory a piece of work needed: the peak above the level on entry, recorded with each run.

On CUDA it is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On the CPU it is
the peak resident-set size (``/proc/self/statm``, sampled every 10 ms by a background thread) minus
the RSS on entry; glibc's ``malloc_trim(0)`` first returns freed heap pages to the OS, so memory a
previous run freed but the allocator kept does not hide this run's growth. A CPU peak is therefore
an estimate (allocations shorter than the sampling interval can be missed, glibc may keep a few
MiB), good for comparing methods run the same way, not an exact high-water mark.
"""
from __future__ import annotations

import ctypes
import gc
import os
import threading
from typing import Any

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """The resident-set size of this process (Linux ``/proc/self/statm``; elsewhere the peak ``ru_maxrss``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_device(model: Any) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


class PeakMemory:
    """``with PeakMemory(device) as m: ...``; then ``m.peak_bytes`` and ``m.method`` (how it was measured)."""

    def __init__(self, device: torch.device | str | None = None, interval: float = 0.01):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.interval = interval
        self.peak_bytes = 0
        self.method = ""
        self._stop = threading.Event()
        self._max = 0
        self._base = 0

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, rss_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated above the level on entry"
            return self
        gc.collect()
        _malloc_trim()
        self._base = self._max = rss_bytes()
        self.method = "peak RSS above the level on entry (sampled every 10 ms, after malloc_trim)"
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
            return
        self._max = max(self._max, rss_bytes())
        self._stop.set()
        self._thread.join()
        self.peak_bytes = int(self._max - self._base)

    @property
    def peak_mib(self) -> float:
        return round(self.peak_bytes / 2**20, 1)
