"""Decoding settings are ours, never the model folder's.

A model folder can carry a ``generation_config.json`` (or generation fields in
``config.json``) that changes what ``generate`` produces: ``suppress_tokens`` on the first
tokens of the backdoor's target took keyword ASR from 1.00 to 0.05 on a backdoored model.
A model under test must not steer its own measurement, so evaluation decodes with a
configuration built here from a fresh ``GenerationConfig()`` (greedy, our length, EOS and pad
from the tokenizer), and the folder's own configuration is set aside for the duration of the
call: transformers would otherwise fill every field we leave unset from it. What the folder
asked for is listed (:func:`ignored_generation_settings`) so a run can warn and record it, and
saved models get a clean ``generation_config.json`` (:func:`write_clean_generation_config`).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

from transformers import GenerationConfig

GENERATION_CONFIG = "generation_config.json"

# Fields that cannot change which tokens greedy decoding with our settings produces: metadata,
# token ids we set ourselves (EOS is compared separately), caching and compilation knobs, and
# max_length (our max_new_tokens takes precedence). Every other field a folder sets to a value
# other than transformers' default is reported, so a field added by a later transformers
# version is reported too rather than silently trusted.
_NEUTRAL_FIELDS = frozenset({
    "transformers_version", "_from_model_config", "_commit_hash", "bos_token_id", "pad_token_id",
    "decoder_start_token_id", "use_cache", "cache_implementation", "cache_config", "compile_config",
    "disable_compile", "max_length", "output_attentions", "output_hidden_states", "low_memory",
    "prefill_chunk_size", "continuous_batching_config",
})


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return sorted(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def generation_config(tokenizer: Any, *, max_new_tokens: int, min_new_tokens: int = 0,
                      pad_token_id: int | None = None) -> GenerationConfig:
    """Greedy decoding of ``max_new_tokens`` tokens, EOS and pad from the tokenizer; nothing else set.

    Every other field keeps transformers' default (no penalty, no suppressed or forced token,
    no sampling). ``min_new_tokens`` > 0 keeps EOS away until that many tokens exist.
    """
    pad = pad_token_id if pad_token_id is not None else (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    kw: dict[str, Any] = {"do_sample": False, "num_beams": 1, "max_new_tokens": int(max_new_tokens),
                          "use_cache": True, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad,
                          "bos_token_id": tokenizer.bos_token_id}
    if min_new_tokens > 0:
        kw["min_new_tokens"] = int(min_new_tokens)
    return GenerationConfig(**kw)


def describe(config: GenerationConfig) -> dict[str, Any]:
    """What a run records about its decoding: the fields we set; every other field is transformers' default."""
    d = config.to_diff_dict()
    d.pop("transformers_version", None)
    d["do_sample"], d["num_beams"] = bool(config.do_sample), int(config.num_beams or 1)
    d["other_fields"] = "transformers defaults (the model folder's generation settings are ignored)"
    return d


def _hf_models(model: Any) -> list[Any]:
    """Every module of ``model`` (itself included) holding its own ``generation_config``."""
    mods = list(model.modules()) if hasattr(model, "modules") else [model]
    return [m for m in mods if isinstance(getattr(m, "__dict__", {}).get("generation_config"), GenerationConfig)]


def model_generation_settings(model: Any) -> dict[str, Any]:
    """The generation fields the model carries (from its folder's generation_config.json / config.json)."""
    found: dict[str, Any] = {}
    for m in _hf_models(model):
        found.update({k: v for k, v in m.generation_config.to_dict().items() if v is not None})
        legacy = getattr(getattr(m, "config", None), "_get_generation_parameters", None)
        if callable(legacy):
            found.update({f"config.{k}": v for k, v in legacy().items()})
    return found


def ignored_generation_settings(model: Any, tokenizer: Any) -> list[str]:
    """``field=value`` for every decoding-altering setting the model folder carries (and we ignore)."""
    try:
        defaults = GenerationConfig()._get_default_generation_params()
    except AttributeError:  # pragma: no cover - other transformers versions
        defaults = {}
    out = []
    for key, value in sorted(model_generation_settings(model).items()):
        name = key.split(".", 1)[-1]
        if name in _NEUTRAL_FIELDS or value is None or defaults.get(name, object()) == value:
            continue
        if name == "eos_token_id" and _ids(value) == _ids(tokenizer.eos_token_id):
            continue
        if isinstance(value, (list, dict)) and not value:
            continue
        text = json.dumps(value, default=str)
        out.append(f"{key}={text if len(text) <= 80 else text[:77] + '...'}")
    return out


@contextlib.contextmanager
def own_decoding(model: Any) -> Iterator[None]:
    """Set the model's own generation configuration(s) aside while we generate; restored afterwards.

    ``generate(generation_config=ours)`` still fills every field left unset in ``ours`` from
    ``model.generation_config``; with a blank one there, only our fields and transformers'
    defaults remain.
    """
    held = [(m, m.generation_config) for m in _hf_models(model)]
    try:
        for m, _ in held:
            m.generation_config = GenerationConfig()
        yield
    finally:
        for m, original in held:
            m.generation_config = original


def write_clean_generation_config(folder: str | Path, tokenizer: Any, model: Any = None) -> Path | None:
    """Replace a saved folder's ``generation_config.json`` by one holding only token ids.

    A defended model must not carry the settings that hid its backdoor (suppressed or forced
    tokens, penalties, sampling). Written only where ``save_pretrained`` wrote one (full models;
    an adapter folder has none).
    """
    target = Path(folder) / GENERATION_CONFIG
    if not target.is_file():
        return None
    cfg = getattr(model, "config", None)
    pick = (lambda name: getattr(tokenizer, name, None) if tokenizer is not None else getattr(cfg, name, None))
    clean = GenerationConfig(bos_token_id=pick("bos_token_id"), eos_token_id=pick("eos_token_id"),
                             pad_token_id=pick("pad_token_id"))
    clean.save_pretrained(str(target.parent))
    return target
