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
import errno
import functools
import json
import logging
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from .errors import UnbackdoorError, os_error

_OUTPUT_ERRNOS = frozenset({"ENOSPC", "EDQUOT", "EROFS"})
"""Errors inside an ``atomic_dir`` block that concern the output being written."""

log = logging.getLogger("unbackdoor")


# ---- atomic primitives -------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process umask, read once (reading it means setting it, which is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@functools.lru_cache(maxsize=1)
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


def _owner_tag() -> str:
    """``pid<N>-<host>``: who writes a temporary file, so only a dead writer's leftovers are removed."""
    return f"pid{os.getpid()}-{_host()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours (EPERM)
        return True
    return True


def _temp_owner(final_name: str, name: str) -> int | None:
    """The writer's pid in one of our temporary names for ``final_name``, else None.

    Names: ``.<final>.pid<N>-<host>.<random>.tmp`` (files), ``.<final>.tmp-pid<N>-<host>.<hex>``
    and ``.<final>.old-pid<N>-<host>.<hex>`` (folders). Names written on another host (a shared
    file system) are never judged from here: None.
    """
    prefix = f".{final_name}."
    if not name.startswith(prefix):
        return None
    m = re.match(r"(?:tmp-|old-)?pid(\d+)(?:-([A-Za-z0-9_-]+))?\.", name[len(prefix):])
    if not m or (m.group(2) is not None and m.group(2) != _host()):
        return None
    return int(m.group(1))


def clean_stale_temps(final: str | Path) -> list[Path]:
    """Remove what killed writers of ``final`` left behind; restore ``final`` if a swap was cut short.

    Temporary names carry their writer's pid, so only leftovers of dead processes are removed.
    If ``final`` is missing but a complete previous version was moved aside
    (``.<final>.old-pid...``) by a writer killed between its two renames, it is put back.
    Returns the paths removed or restored.
    """
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return []
    touched: list[Path] = []
    for p in sorted(parent.glob(f".{_glob_escape(final.name)}.*")):
        owner = _temp_owner(final.name, p.name)
        if owner is None or _pid_alive(owner):
            continue
        if ".old-" in p.name and not final.exists() and p.is_dir():
            os.replace(p, final)
            log.warning("restored %s from %s (a writer was killed mid-swap)", final, p.name)
            touched.append(final)
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        touched.append(p)
    return touched


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary sibling, fsync, then rename over ``path``: whole or not at all."""
    path = Path(path)
    if path.is_dir():
        raise UnbackdoorError(f"cannot write file {path}: a folder of that name exists", where=str(path),
                              fix="choose another output path, or remove the folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner_tag()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # read-only, a file where a folder belongs, no permission...
        raise os_error(e, path) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give outputs the usual permissions
        os.replace(tmp, path)
    except BaseException as e:  # a full disk included: the previous file stays as it was
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise os_error(e, path) from e
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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange)
    return rc == 0


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename.

    A crash inside the block leaves ``final`` untouched (old complete output, or none). An
    existing ``final`` is swapped atomically where the OS allows it (Linux); elsewhere it is
    moved aside first, and :func:`clean_stale_temps` (run on the next write) puts it back if
    the process died between the two renames. Leftovers of killed writers are removed then too.
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise UnbackdoorError(f"cannot write folder {final}: a file of that name exists", where=str(final),
                              fix="choose another output path, or remove the file")
    tag = f"{_owner_tag()}.{uuid.uuid4().hex[:8]}"
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(final)
        tmp.mkdir()
    except OSError as e:
        raise os_error(e, final) from e
    try:
        try:
            yield tmp
        except OSError as e:
            if errno.errorcode.get(e.errno or 0) in _OUTPUT_ERRNOS:  # the output's disk, not an input's problem
                raise os_error(e, final) from e
            raise
        try:
            replace_dir(tmp, final, tag)
        except OSError as e:
            raise os_error(e, final) from e
    except BaseException:  # the previous output stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, final: Path, tag: str | None = None) -> None:
    """Put the complete folder ``new`` at ``final`` in one step; the previous ``final`` is discarded.

    Linux swaps the two in one ``renameat2`` call; elsewhere the old folder is first moved aside to
    a name :func:`clean_stale_temps` restores if the process dies between the two renames.
    """
    tag = tag or f"{_owner_tag()}.{uuid.uuid4().hex[:8]}"
    _fsync_tree(new)
    if final.exists() and _exchange(new, final):
        # new now holds the previous output; final the new one
        _fsync_dir(final.parent)
        shutil.rmtree(new, ignore_errors=True)
        return
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{tag}"
        os.replace(final, old)
    os.replace(new, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def find_lone_surrogate(obj: Any) -> tuple[list[Any], str] | None:
    """The path (keys / indices) and text of the first string holding a lone UTF-16 surrogate, or None.

    JSON may spell one (``"\\ud800"``) although it is no character: Python reads it, then every
    UTF-8 writer (our outputs, tokenizers) fails on it later. Iterative: the data may be deep.
    """
    stack: list[tuple[list[Any], Any]] = [([], obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if any("\ud800" <= c <= "\udfff" for c in value):
                return path, value
        elif isinstance(value, dict):
            for k, v in value.items():
                stack.append((path + [k], k))
                stack.append((path + [k], v))
        elif isinstance(value, list):
            stack.extend((path + [i], v) for i, v in enumerate(value))
    return None


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` for untrusted text: malformed, too deeply nested or a lone surrogate is a ``DataError``."""
    from .errors import DataError

    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}", where=f"{where}, line {e.lineno}",
                        fix="the file is damaged or of another format; fix or regenerate it") from None
    except RecursionError:
        raise DataError("the JSON is nested too deeply to read (thousands of levels)", where=where,
                        fix="flatten the data: records are a list of objects holding strings") from None
    bad = find_lone_surrogate(data)
    if bad is not None:
        path, value = bad
        at = "".join(f"[{k!r}]" for k in path) or "the top level"
        code = next(c for c in value if "\ud800" <= c <= "\udfff")
        raise DataError(f"the string at {at} holds a lone surrogate \\u{ord(code):04x}, which is not a character "
                        "(UTF-8 cannot store it)", where=f"{where}, {at}",
                        fix="replace the \\uXXXX escape by the character meant (a pair of surrogates, or the "
                            "character itself), or remove it")
    return data


def read_json(path: str | Path) -> Any:
    """A JSON file, every failure (missing, not UTF-8, malformed, too deep, lone surrogate) a clear error."""
    path = Path(path)
    if not path.is_file():
        raise UnbackdoorError(f"file not found: {path}", where=str(path), fix="check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UnbackdoorError(f"not UTF-8 text ({e.reason} at byte {e.start})", where=str(path),
                              fix="the file is damaged or of another format; regenerate it") from None
    return parse_json(text, str(path))


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


def relative_to_checkout(record: Any, root: str | Path, home: str | Path | None = None) -> Any:
    """``record`` (JSON-able) with every path under ``root`` written relative to it, and (with ``home``)
    every other path under ``home`` written as ``~/...`` (a model cache, say).

    For results that are committed to a repository: they must not carry one machine's paths.
    """
    text = json.dumps(record, default=str).replace(json.dumps(str(Path(root).resolve()) + os.sep)[1:-1], "")
    if home is not None:
        text = text.replace(json.dumps(str(Path(home).resolve()) + os.sep)[1:-1], "~/")
    return json.loads(text)


# ---- the run folder ----------------------------------------------------------------------

class RunDir:
    """A run's folder: config, environment, metrics, timings, log, data indices, outputs."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if create:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # --out names a file, a read-only place...
                raise os_error(e, self.path) from e
        self.timings: dict[str, float] = {}
        timings_file = self.path / "timings.json"
        if timings_file.is_file():
            with contextlib.suppress(Exception):
                self.timings = dict(read_json(timings_file))
        self._handler: logging.Handler | None = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def start(self, config: Any, seed: int | None, kind: str, *, command: str | None = None,
              **extra: Any) -> "RunDir":
        """Record the resolved config (and ``extra`` top-level fields) and the environment; attach the log."""
        from .config import to_dict
        from .paths import MARKER_KEY
        import dataclasses

        cfg = to_dict(config) if dataclasses.is_dataclass(config) else config
        header: dict[str, Any] = {"kind": kind}
        if command is not None:
            header[MARKER_KEY] = command
        atomic_write_json(self.path / "config.json", {**header, **extra, "config": cfg})
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


def as_run_dir(run_dir: "RunDir | str | Path | None") -> "RunDir | None":
    """A RunDir from a path (or None, or a RunDir as it is): what the Python API accepts for ``run_dir``."""
    if run_dir is None or isinstance(run_dir, RunDir):
        return run_dir
    return RunDir(run_dir)


class Phases:
    """Seconds per named phase, into a :class:`RunDir` when there is one (``timings.json``), else a dict.

    Defenses time their phases the same way whether a run folder exists (CLI, API) or not (tests,
    a user's own loop): ``phases = Phases(run_dir); with phases("unlearn"): ...``.
    """

    def __init__(self, run_dir: RunDir | None = None):
        self.run_dir = run_dir
        self._own: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.run_dir is not None:
            with self.run_dir.phase(name):
                yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._own[name] = round(time.perf_counter() - t0, 4)

    @property
    def timings(self) -> dict[str, float]:
        return dict(self.run_dir.timings) if self.run_dir is not None else dict(self._own)


# ---- a run folder written whole ------------------------------------------------------------

HARMLESS_KEYS = frozenset({
    "logging_steps", "logging_first_step", "logging_dir", "logging_strategy", "save_steps", "save_strategy",
    "save_total_limit", "report_to", "disable_tqdm", "run_name", "output_dir", "dataloader_num_workers",
    "dataloader_pin_memory", "log_level", "log_level_replica", "log_on_each_node", "n_examples", "log_every",
    "eval", "evaluation", "test", "triggered", "max_new_tokens", "batch_size_eval", "checkpoint_every",
})
"""Settings that do not change a training trajectory: ``--resume`` may change them."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if str(k) in HARMLESS_KEYS:
            continue
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def changed_settings(old: Any, new: Any) -> list[str]:
    """``key: old -> new`` for every trajectory-relevant setting that differs (nested keys dotted)."""
    a, b = _flatten(json.loads(to_json(old))), _flatten(json.loads(to_json(new)))
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def _lock(stage: Path) -> None:
    lock = stage / ".lock"
    if lock.is_file():
        with contextlib.suppress(ValueError, OSError):
            owner = int(lock.read_text().split()[0])
            if owner != os.getpid() and _pid_alive(owner):
                raise UnbackdoorError(f"another process (pid {owner}) is writing this run", where=str(stage),
                                      fix="wait for it to finish, or choose another --out")
    lock.write_text(f"{os.getpid()} {_host()}\n")


@contextlib.contextmanager
def staged_run(out: str | Path, *, fingerprint: Any, resume: bool = False) -> Iterator[RunDir]:
    """A run folder whose files change together: work happens in ``.<out>.partial`` beside ``out``.

    On success the finished folder replaces ``out`` in one swap (a re-run killed half-way leaves the
    previous complete run, never a mix of two). A killed run leaves its ``.partial`` folder, which
    ``resume=True`` continues from (trainer checkpoints live in it) only when ``fingerprint`` (the
    trajectory-relevant settings) is unchanged; otherwise the changed keys are named. Without
    ``resume`` an unfinished earlier attempt is discarded. Under ``accelerate launch`` every process
    enters; the main process prepares and swaps, the others wait for it.
    """
    from . import distributed

    out = Path(out)
    stage = out.parent / f".{out.name}.partial"
    stamp = stage / "fingerprint.json"
    if distributed.is_main_process():
        out.parent.mkdir(parents=True, exist_ok=True)
        if stage.exists():
            if resume and stamp.is_file():
                changed = changed_settings(read_json(stamp), fingerprint)
                if changed:
                    raise UnbackdoorError(
                        f"--resume with changed settings: {'; '.join(changed[:8])}"
                        + (f" (+{len(changed) - 8} more)" if len(changed) > 8 else ""),
                        where=str(stage), fix="restore those settings to continue, or rerun without --resume "
                                              "to start afresh")
                log.info("resuming the unfinished run in %s", stage)
            else:
                if resume:
                    log.warning("--resume: %s holds no fingerprint; starting afresh", stage)
                else:
                    log.info("discarding an unfinished earlier run in %s (pass --resume to continue it)", stage)
                shutil.rmtree(stage)
        elif resume:
            log.info("--resume: no unfinished run of %s; starting afresh", out)
        stage.mkdir(parents=True, exist_ok=True)
        _lock(stage)
        atomic_write_json(stamp, fingerprint)
    distributed.barrier()
    run = RunDir(stage)
    try:
        yield run
    finally:
        run.close()
    distributed.barrier()
    if distributed.is_main_process():
        with contextlib.suppress(OSError):
            (stage / ".lock").unlink()
        replace_dir(stage, out)
        log.info("run complete: %s", out)
    distributed.barrier()
    run.path = out


# ---- checkpoints written by others (Hugging Face Trainer) --------------------------------

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(folder: str | Path, marker: str = "trainer_state.json") -> Path | None:
    """The newest ``checkpoint-N`` folder that was written to the end, or None.

    The Hugging Face Trainer writes ``checkpoint-N`` in place (not atomically) and
    ``trainer_state.json`` last, so a run killed while saving leaves a newer folder without it (or
    with a truncated one). ``transformers.trainer_utils.get_last_checkpoint`` would pick that
    half-written folder; this skips it, with a warning. A ``trainer_state.json`` must also record
    the folder's own step. Resume from what this returns.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for p in folder.iterdir():
        m = _CHECKPOINT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    for step, p in sorted(found, reverse=True):
        try:
            state = json.loads((p / marker).read_text(encoding="utf-8"))
            if marker != "trainer_state.json" or int(state["global_step"]) == step:
                return p
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            pass
        log.warning("skipping incomplete checkpoint %s (killed while saving?)", p)
    return None
