"""Loading untrusted models without running their code.

A backdoored checkpoint may also carry a pickle payload. We read safetensors by preference,
any pickle-based file only through ``torch.load(weights_only=True)`` (which refuses every
object that is not a tensor or a plain container), and never enable ``trust_remote_code``
unless the user asked for it. Outputs never go into the input model's folder.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from .errors import UnbackdoorError, UnsafeFileError
from .runs import atomic_write_bytes

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")


def _resolve_weights(path: Path) -> Path:
    if path.is_dir():
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        raise UnbackdoorError(f"no weights file in folder {path}", where=str(path),
                              fix=f"put one of {', '.join(WEIGHT_NAMES)} there, or pass the file itself")
    if not path.is_file():
        raise UnbackdoorError(f"model file not found: {path}", where=str(path), fix="check the path")
    return path


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or a pickle file read with ``weights_only=True``."""
    path = _resolve_weights(Path(path))
    if path.stat().st_size == 0:
        raise UnbackdoorError(f"model file is empty: {path}", where=str(path),
                              fix="the file was truncated or never written; regenerate or re-download it")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own (version-dependent) error types
            raise UnbackdoorError(f"cannot read safetensors file: {e}", where=str(path),
                                  fix="the file is truncated or not safetensors; regenerate it") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(
            f"refused to load {path.name}: it contains Python objects that could run code on load ({str(e).splitlines()[0]})",
            where=str(path),
            fix="convert the checkpoint to safetensors in a sandbox you trust, or pass a plain state_dict saved with torch.save",
        ) from None
    except (EOFError, RuntimeError, OSError) as e:
        raise UnbackdoorError(f"cannot read model file: {e}", where=str(path),
                              fix="the file is truncated or not a PyTorch checkpoint; regenerate it") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UnbackdoorError(f"{path.name} does not hold a state_dict (name -> tensor)", where=str(path),
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
        raise UnbackdoorError(f"weights do not fit the model: {str(e).splitlines()[0]}", where=str(path),
                              fix="check that the architecture and number of classes match the checkpoint") from None
    return model


def hf_pretrained_kwargs(path: str | Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` that never run repository code by default."""
    path = Path(path)
    kw: dict[str, Any] = {"trust_remote_code": bool(trust_remote_code)}
    if path.is_dir() and any(path.glob("*.safetensors")):
        kw["use_safetensors"] = True
    return kw


def check_output_path(output: str | Path, *inputs: str | Path | None) -> Path:
    """Refuse to write into (or over) an input model's folder."""
    out = Path(output).resolve()
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).resolve()
        if out == src or src in out.parents:
            raise UnbackdoorError(f"output {output} is inside the input {inp}", where=str(output),
                                  fix="choose an output folder outside the input model's folder; inputs are never modified")
    return out
