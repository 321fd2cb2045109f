"""Loading untrusted models and data without running their code.

A backdoored checkpoint may also carry a pickle payload. We read safetensors by preference,
any pickle-based checkpoint only through ``torch.load(weights_only=True)`` (which refuses every
object that is not a tensor or a plain container), plain data pickles (CIFAR batches) only
through :func:`load_data_pickle` (containers, numbers, strings and numpy arrays, nothing
else), and never enable ``trust_remote_code`` unless the user asked for it. Outputs never go
into the input model's folder.
"""
from __future__ import annotations

import io
import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, DataError, ModelError, UnsafeFileError
from .runs import atomic_write_bytes

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")

_UNSAFE_FIX = ("convert the checkpoint to safetensors in a sandbox you trust, or save a plain "
               "state_dict with torch.save(model.state_dict(), path)")


def _resolve_weights(path: Path) -> Path:
    if path.is_dir():
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        raise ModelError(f"no weights file in folder {path}", where=str(path),
                         fix=f"put one of {', '.join(WEIGHT_NAMES)} there, or pass the file itself")
    if not path.is_file():
        raise ModelError(f"model file not found: {path}", where=str(path), fix="check the path")
    return path


_TENSOR_GLOBAL_PREFIXES = ("torch.", "torch._utils.", "collections.OrderedDict", "_codecs.encode", "numpy.")


def _pickle_streams(path: Path) -> list[bytes]:
    """The pickle byte streams of a checkpoint: ``*/data.pkl`` of a zip checkpoint, else the file."""
    import zipfile

    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                return [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            return []
    return [path.read_bytes()]


def _pickle_globals(raw: bytes) -> list[str] | None:
    """Every global (``module.name``) a pickle stream would import, read statically; None if unreadable."""
    import pickletools

    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(raw):
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
            if op.name == "STOP":
                break
    except Exception:  # noqa: BLE001 - truncated or not a pickle
        return None
    return found


def _unsafe_globals(path: Path) -> list[str] | None:
    """Globals a checkpoint names beyond tensors and containers; None when the file cannot be parsed."""
    streams = _pickle_streams(path)
    if not streams:
        return None
    bad: list[str] = []
    for raw in streams:
        names = _pickle_globals(raw)
        if names is None:
            return None
        bad.extend(n for n in names if not n.startswith(_TENSOR_GLOBAL_PREFIXES) and n not in bad)
    return bad


def _weights_only_refusal(e: BaseException, path: Path) -> str | None:
    """Why torch's ``weights_only`` unpickler refused ``path``, when it refused code; None for damage.

    torch refuses both payloads and unsupported pickle features with the same error, so the
    file is also read statically (``pickletools``, nothing is executed): a global beyond
    tensors and containers, or a refusal we cannot explain, counts as unsafe; a stream that
    does not even parse is damage.
    """
    if not isinstance(e, pickle.UnpicklingError) or "weights only load failed" not in str(e).lower():
        return None
    m = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
    detail = m.group(1).strip() if m else "refused by torch.load(weights_only=True)"
    bad = _unsafe_globals(path)
    if bad:
        return "it imports " + ", ".join(bad[:5])
    if bad is None and not re.search(r"global|reduce|class|build|newobj|persistent", detail, re.IGNORECASE):
        return None  # does not parse as a pickle: damaged, not an attack
    return detail


def load_pickled_tensors(path: str | Path, *, mmap: bool = False, allow: tuple[Any, ...] = ()) -> Any:
    """``torch.load(weights_only=True)`` of an untrusted pickle; every failure a clear ``UnbackdoorError``.

    A payload is an ``UnsafeFileError`` naming what the file imports (its code never runs, and
    the message never repeats torch's advice to retry with ``weights_only=False``); damage is a
    ``ModelError``. ``mmap`` maps a zip-format checkpoint instead of reading it (a cheap pre-scan
    of a large shard); ``allow`` are extra globals torch may rebuild (numpy's, for RNG states).
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise ModelError(f"model file is {'empty' if path.is_file() else 'missing'}: {path}", where=str(path),
                         fix="the file was truncated or never written; regenerate or re-download it")
    import zipfile

    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(allow)):
            warnings.simplefilter("ignore", UserWarning)  # torch warns about pickle protocols it then refuses
            return torch.load(str(path), map_location="cpu", weights_only=True,
                              mmap=bool(mmap and zipfile.is_zipfile(path)))
    except Exception as e:  # noqa: BLE001 - every failure of an untrusted file becomes a clear error
        refused = _weights_only_refusal(e, path)
        if refused is not None:
            raise UnsafeFileError(
                f"refused to load {path.name}: it contains Python objects that could run code on load"
                + (f" ({_no_retry_advice(refused)[:200]})" if refused else ""),
                where=str(path), fix=_UNSAFE_FIX,
            ) from None
        m = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        if m:
            e = pickle.UnpicklingError(m.group(1))
        first = _no_retry_advice((str(e).splitlines() or [type(e).__name__])[0])[:200]
        raise ModelError(f"cannot read model file {path.name}: {type(e).__name__}: {first}", where=str(path),
                         fix="the file is truncated or not a PyTorch checkpoint; regenerate it") from None


def _no_retry_advice(text: str) -> str:
    """torch's messages suggest ``weights_only=False``, i.e. running the file's code: never repeat that."""
    return re.split(r"(?i)re-?running .torch\.load|weights_only.{0,20}false", text)[0].rstrip(" .(")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or a pickle file read with ``weights_only=True``.

    Every failure is an ``UnbackdoorError``: a pickle that holds anything but tensors and
    plain containers is an ``UnsafeFileError`` (and its code never runs); a missing, empty,
    truncated or foreign file is a ``ModelError`` naming the file. Safetensors are memory-mapped:
    overwrite a loaded file only by renaming a new one over it (``save_state_dict`` does), never
    in place, or the tensors still mapped from it become invalid.
    """
    path = _resolve_weights(Path(path))
    if path.stat().st_size == 0:
        raise ModelError(f"model file is empty: {path}", where=str(path),
                         fix="the file was truncated or never written; regenerate or re-download it")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own (version-dependent) error types
            raise ModelError(f"cannot read safetensors file: {e}", where=str(path),
                             fix="the file is truncated or not safetensors; regenerate it") from None
    obj = load_pickled_tensors(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path.name} does not hold a state_dict (name -> tensor)", where=str(path),
                         fix="save the model with torch.save(model.state_dict(), path) or safetensors")
    return obj


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as safetensors, atomically (temp name, then rename)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_into(model: torch.nn.Module, path: str | Path, *, strict: bool = True) -> torch.nn.Module:
    """Load weights safely into an existing module, with a clear error on mismatch."""
    state = load_state_dict(path)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise ModelError(f"weights do not fit the model: {str(e).splitlines()[0]}", where=str(path),
                         fix="check that the architecture and number of classes match the checkpoint") from None
    return model


# ---- plain data pickles (CIFAR-style batches) ------------------------------------------

# The only globals a data pickle may name: numpy's array reconstruction and dtypes.
_DATA_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol < 3 (CIFAR batches are protocol 2)
    ("builtins", "bytearray"),
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DATA_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a data file")


def load_data_pickle(path: str | Path, *, encoding: str = "bytes") -> Any:
    """Unpickle a data file (dicts, lists, numbers, strings, numpy arrays) without running code.

    Anything else a pickle may name (functions, classes, ``os.system``) is refused with an
    ``UnsafeFileError`` before it is called; a missing, empty or damaged file is a ``DataError``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}", where=str(path), fix="check the path or the dataset folder")
    raw = path.read_bytes()
    if not raw:
        raise DataError(f"data file is empty: {path}", where=str(path), fix="regenerate or re-download the file")
    try:
        return _DataUnpickler(io.BytesIO(raw), encoding=encoding).load()
    except pickle.UnpicklingError as e:
        if "is not allowed in a data file" in str(e):
            raise UnsafeFileError(f"refused to load {path.name}: {e}; a data file may hold only arrays and "
                                  "plain containers, this one could run code on load", where=str(path),
                                  fix="use the original dataset files, or convert the data to .npz in a sandbox you trust") from None
        raise DataError(f"cannot read data file {path.name}: {e}", where=str(path),
                        fix="the file is truncated or not a pickle; regenerate or re-download it") from None
    except Exception as e:  # noqa: BLE001 - truncated/garbage pickles raise many types
        raise DataError(f"cannot read data file {path.name}: {type(e).__name__}: {str(e)[:200]}", where=str(path),
                        fix="the file is truncated or not a pickle; regenerate or re-download it") from None


# ---- Hugging Face folders --------------------------------------------------------------

def _confinement_root(folder: Path) -> Path:
    """Where a folder's files may live: the folder itself, or for a Hugging Face cache snapshot
    (``models--org--name/snapshots/<rev>/``, whose files link to ``../../blobs/``) the repo's cache folder."""
    real = folder.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def confined(path: str | Path, folder: str | Path, *, named_by: str | None = None) -> Path:
    """``path`` with symlinks resolved, refused unless it lies inside ``folder`` (see :func:`_confinement_root`).

    An index naming ``../outside.bin`` or ``/etc/x``, or a symlink leading out of the folder,
    would make a loader open a file nobody checked: an ``UnsafeFileError``.
    """
    folder = Path(folder)
    root = _confinement_root(folder)
    target = Path(path) if Path(path).is_absolute() else folder / path
    real = target.resolve()
    if real != root and root not in real.parents:
        what = f"{named_by} names {path}" if named_by else f"{target.name} is a link to {real}"
        raise UnsafeFileError(f"{what}, which lies outside the model folder", where=str(folder / (named_by or target.name)),
                              fix="every file a model folder uses must be inside it: copy the file in and "
                                  "name it by a plain relative path (no '..', no absolute path, no outward link)")
    return real


def index_files(index: str | Path) -> list[Path]:
    """The shard files a ``*.index.json`` names (``weight_map`` values), each confined to the index's folder."""
    index = Path(index)
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ModelError(f"shard index is not valid JSON: {str(e)[:200]}", where=str(index),
                         fix="the model folder is damaged; regenerate the index with save_pretrained") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v.strip() for v in weight_map.values()):
        raise ModelError("shard index has no weight_map of tensor name -> file name", where=str(index),
                         fix="the model folder is damaged; regenerate the index with save_pretrained")
    shards = []
    for name in sorted(set(weight_map.values())):
        real = confined(name, index.parent, named_by=index.name)
        if not real.is_file():
            raise ModelError(f"{index.name} names {name}, which is missing", where=str(index.parent / name),
                             fix="copy every shard the index names into the model folder")
        shards.append(real)
    return shards


_PICKLE_WEIGHT_GLOBS = ("pytorch_model*.bin", "adapter_model*.bin")


def check_model_folder(path: str | Path) -> list[Path]:
    """Check every file loading a Hugging Face model (or PEFT adapter) folder would open; return the weights.

    Every file in the folder must resolve inside it (symlinks included), every shard a
    ``*.index.json`` names too. When the folder holds safetensors, only those are read;
    otherwise every pickled weights file (``pytorch_model*.bin``, ``adapter_model*.bin`` and the
    shards of a pickle index) is opened here with ``torch.load(weights_only=True)`` (memory-mapped),
    so a payload is an ``UnsafeFileError`` before ``transformers`` or ``peft`` sees the file.
    """
    folder = Path(path)
    if not folder.is_dir():
        return []
    for entry in folder.iterdir():
        if entry.is_symlink() or entry.is_file():
            confined(entry, folder)
    sharded = {idx: index_files(idx) for idx in sorted(folder.glob("*.index.json"))}
    named = {p for shards in sharded.values() for p in shards}
    singles = {p.resolve() for p in folder.glob("*.safetensors")}
    if singles or any(p.suffix == ".safetensors" for p in named):
        return sorted(singles | {p for p in named if p.suffix == ".safetensors"})
    pickles = {p.resolve() for pattern in _PICKLE_WEIGHT_GLOBS for p in folder.glob(pattern)} | named
    for weights in sorted(pickles):
        scan_pickle(weights)
    return sorted(pickles)


def scan_pickle(path: str | Path, *, allow: tuple[Any, ...] = ()) -> None:
    """Refuse a pickle-based file that carries code, without keeping what it holds (memory-mapped when possible)."""
    load_pickled_tensors(path, mmap=True, allow=allow)


def hf_pretrained_kwargs(path: str | Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` that never run repository code by default.

    The folder is checked first (:func:`check_model_folder`: every file inside it, shards named
    by an index included, pickles scanned), so a payload or an escaping path is refused here with
    an ``UnsafeFileError`` instead of surfacing as a raw unpickling error from deep inside
    ``transformers``. A folder with safetensors weights is read from those only.
    """
    path = Path(path)
    kw: dict[str, Any] = {"trust_remote_code": bool(trust_remote_code)}
    if path.is_dir():
        check_model_folder(path)
        if any(path.glob("*.safetensors")):
            kw["use_safetensors"] = True
    return kw


# ---- checkpoints a run resumes from -------------------------------------------------------

NEVER_LOADED = ("training_args.bin",)
"""Checkpoint files neither unbackdoor nor the Hugging Face Trainer opens on resume.

``training_args.bin`` is a pickle of a ``TrainingArguments`` object (it imports transformers
classes, so ``weights_only`` would refuse it and a hostile one could carry code): resume rebuilds
the arguments from the run's own config and never unpickles it. It is only confined."""

_CHECKPOINT_JSON = (".json",)


def _numpy_rng_globals() -> tuple[Any, ...]:
    """What a Trainer ``rng_state*.pth`` may rebuild besides tensors: numpy's RNG state arrays."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return (core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)))


def check_checkpoint_dir(path: str | Path) -> list[Path]:
    """Pre-scan a checkpoint folder before resuming from it; return the files checked.

    For Hugging Face Trainer ``checkpoint-N`` folders (``rng_state*.pth``, ``optimizer.pt``,
    ``scheduler.pt``, ``scaler.pt``, weights, ``trainer_state.json``) and the classifier's
    ``checkpoint_dir/last`` (safetensors + ``state.json``): every file must resolve inside the
    folder; JSON files must parse; every pickle is opened with ``weights_only=True`` exactly as
    the Trainer will (RNG states with numpy's arrays allowed), so a payload is an
    ``UnsafeFileError`` naming the file instead of torch's advice to retry with
    ``weights_only=False``. ``training_args.bin`` is never opened (:data:`NEVER_LOADED`).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ModelError(f"checkpoint folder not found: {folder}", where=str(folder),
                         fix="resume from a folder a previous run wrote, or start without resume")
    checked = []
    for entry in sorted(folder.rglob("*")):
        if entry.is_dir() and not entry.is_symlink():
            continue
        real = confined(entry, folder)
        checked.append(real)
        if entry.name in NEVER_LOADED:
            continue
        if entry.suffix in _CHECKPOINT_JSON:
            try:
                json.loads(real.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                raise ModelError(f"checkpoint file {entry.name} is not valid JSON: {str(e)[:200]}", where=str(entry),
                                 fix="the checkpoint is damaged; resume from an earlier one or start afresh") from None
        elif entry.suffix in PICKLE_SUFFIXES:
            scan_pickle(real, allow=_numpy_rng_globals() if entry.name.startswith("rng_state") else ())
    return checked


def remote_code_files(path: str | Path) -> list[str]:
    """What in a model folder would run on load with ``trust_remote_code=True``: ``auto_map`` and ``*.py``."""
    path = Path(path)
    found: list[str] = []
    if not path.is_dir():
        return found
    for name in ("config.json", "tokenizer_config.json"):
        f = path / name
        if f.is_file():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (ValueError, OSError):
                continue
            if isinstance(data, dict) and data.get("auto_map"):
                found.append(f"{name}: auto_map")
    found.extend(sorted(p.name for p in path.glob("*.py")))
    return found


def check_output_path(output: str | Path, *inputs: str | Path | None) -> Path:
    """Refuse to write into (or over) an input model's folder; symlinks are resolved first."""
    out = Path(output).resolve()
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).resolve()
        if out == src or src in out.parents:
            raise ConfigError(f"output {output} is inside the input {inp}", where=str(output),
                                  fix="choose an output folder outside the input model's folder; inputs are never modified")
    return out
