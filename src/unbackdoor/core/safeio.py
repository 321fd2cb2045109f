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
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then refuses anyway
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure of an untrusted file becomes a clear error
        refused = _weights_only_refusal(e, path)
        if refused is not None:
            raise UnsafeFileError(
                f"refused to load {path.name}: it contains Python objects that could run code on load"
                + (f" ({refused[:200]})" if refused else ""),
                where=str(path), fix=_UNSAFE_FIX,
            ) from None
        m = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        if m:
            e = pickle.UnpicklingError(m.group(1))
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"cannot read model file {path.name}: {type(e).__name__}: {first}", where=str(path),
                         fix="the file is truncated or not a PyTorch checkpoint; regenerate it") from None
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

def hf_pretrained_kwargs(path: str | Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` that never run repository code by default.

    A folder with safetensors weights is read from those only. A folder with only pickled
    weights (``pytorch_model*.bin``) is scanned first with :func:`load_state_dict`, so a
    payload is refused here with an ``UnsafeFileError`` instead of surfacing as a raw
    unpickling error from deep inside ``transformers``.
    """
    path = Path(path)
    kw: dict[str, Any] = {"trust_remote_code": bool(trust_remote_code)}
    if path.is_dir():
        if any(path.glob("*.safetensors")):
            kw["use_safetensors"] = True
        else:
            for weights in sorted(path.glob("pytorch_model*.bin")):
                load_state_dict(weights)
    return kw


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
