"""Run folders and atomic writes: every result lands whole or not at all.

A run folder holds ``config.json`` (resolved), ``env.json`` (versions, device, seed),
``metrics.json``, ``timings.json`` (seconds per phase), ``log.txt``, the clean-data
indices the defense saw, and the output model. Files are written to a temporary name in
the same folder and renamed into place (``os.replace`` is atomic on POSIX), so a run
killed at any moment leaves the previous complete file or none.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from .errors import UnbackdoorError

log = logging.getLogger("unbackdoor")


# ---- atomic primitives -------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=True) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, to_json(obj))


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename.

    A crash inside the block leaves ``final`` untouched (old complete output, or none).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UnbackdoorError(f"file not found: {path}", where=str(path), fix="check the path")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UnbackdoorError(f"not valid JSON: {e}", where=str(path),
                              fix="the file is damaged or of another format; regenerate it") from None


# ---- environment -----------------------------------------------------------------------

def environment(seed: int | None = None) -> dict[str, Any]:
    """Versions, device and seed: what is needed to reproduce a run."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("unbackdoor", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "versions": versions,
        "seed": seed,
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }
    try:
        import torch

        env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        env["torch_threads"] = torch.get_num_threads()
    except Exception:  # pragma: no cover - torch is a hard dependency
        env["device"] = "unknown"
    env["cpu_count"] = os.cpu_count()
    return env


# ---- the run folder ----------------------------------------------------------------------

class RunDir:
    """A run's folder: config, environment, metrics, timings, log, data indices, outputs."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        timings_file = self.path / "timings.json"
        if timings_file.is_file():
            with contextlib.suppress(Exception):
                self.timings = dict(read_json(timings_file))
        self._handler: logging.Handler | None = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def start(self, config: Any, seed: int | None, kind: str) -> "RunDir":
        """Record the resolved config and the environment; attach the log file."""
        from .config import to_dict
        import dataclasses

        cfg = to_dict(config) if dataclasses.is_dataclass(config) else config
        atomic_write_json(self.path / "config.json", {"kind": kind, "config": cfg})
        atomic_write_json(self.path / "env.json", environment(seed))
        self.attach_log()
        return self

    def attach_log(self) -> None:
        if self._handler is None:
            h = logging.FileHandler(self.path / "log.txt", encoding="utf-8")
            h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger("unbackdoor").addHandler(h)
            logging.getLogger("unbackdoor").setLevel(logging.INFO)
            self._handler = h

    def close(self) -> None:
        if self._handler is not None:
            logging.getLogger("unbackdoor").removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase; timings.json is rewritten atomically after each one."""
        t0 = time.perf_counter()
        log.info("phase %s: start", name)
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 4)
            atomic_write_json(self.path / "timings.json", self.timings)
            log.info("phase %s: %.2fs", name, self.timings[name])

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        return read_json(self.path / name)

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        return self.write_json("metrics.json", metrics)

    def write_indices(self, indices: Any, name: str = "clean_indices.json") -> Path:
        """The indices of the clean data the defense saw (a defense sees only these)."""
        return self.write_json(name, {"indices": [int(i) for i in indices]})
