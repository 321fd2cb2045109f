"""Decoding-time defenses: a model-like object that generates differently but keeps the suspect's weights.

A decoding-time defense (CleanGen) changes *how* the suspect's text is produced, not its
weights. It is returned to the flow as a :class:`DecodingDefense`: an ``nn.Module`` whose
``generate`` runs the defense's decoding rule and whose ``forward`` is the suspect's, so every
measurement of :mod:`unbackdoor.lm.evaluate` works unchanged (generations go through the
defense; target loss, perplexity and the layer profile are the suspect's own, since the
weights did not change). Saved, it is a small folder: ``decoding_defense.json`` naming the
suspect and reference model folders and the settings, plus the tokenizer;
:func:`unbackdoor.lm.models.load_causal_lm` (and so ``unbackdoor lm evaluate --model FOLDER``)
loads it back as the same object. Kinds are registered in :data:`LM_DECODERS`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from ..core.config import from_dict, to_dict
from ..core.errors import ModelError
from ..core.paths import MARKER_KEY
from ..core.registry import Registry
from ..core.runs import atomic_write_json

LM_DECODERS: Registry[Any] = Registry("decoding-time defense")
LM_DECODERS.add("cleangen", "unbackdoor.lm.defenses.cleangen.decoding:CleanGenModel")


class DecodingDefense(nn.Module):
    """The suspect and a reference model behind one ``generate``; ``forward`` is the suspect's.

    Subclasses set :attr:`kind` and implement :meth:`generate` (same keyword arguments as
    ``transformers``' ``generate`` for greedy decoding; returns prompt + new token ids).
    """

    kind: ClassVar[str] = ""
    is_decoding_defense: ClassVar[bool] = True

    Config: ClassVar[type] = object
    """The settings dataclass of this kind (saved in ``decoding_defense.json``)."""

    def __init__(self, suspect: Any, reference: Any, cfg: Any, *, sources: Mapping[str, Any] | None = None):
        super().__init__()
        self.suspect = suspect
        self.reference = reference
        self.cfg = cfg
        self.sources = dict(sources or {})
        self.stats: dict[str, float] = {}

    @property
    def config(self) -> Any:
        return self.suspect.config

    @property
    def generation_config(self) -> Any:
        return getattr(self.suspect, "generation_config", None)

    def get_input_embeddings(self) -> Any:
        return self.suspect.get_input_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.suspect(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def save_pretrained(self, folder: str | Path) -> None:
        """``decoding_defense.json``: the kind, both model folders (absolute) and the settings."""
        for role in ("suspect", "reference"):
            if not self.sources.get(role):
                raise ModelError(f"the {role} model of this {self.kind} defense came from no folder, so the defended "
                                 "model cannot be saved as a folder naming it", where=f"{self.kind} save",
                                 fix="load the suspect and the base model from folders (lm defend --model "
                                     "... --base-model ...)")
        atomic_write_json(Path(folder) / "decoding_defense.json", {
            MARKER_KEY: "lm defend", "kind": self.kind, "settings": to_dict(self.cfg),
            "suspect": self.sources["suspect"], "reference": self.sources["reference"],
            "note": "a decoding-time defense: generation runs the rule below over the two models; the weights are "
                    "the suspect's, unchanged"})


def _role(spec: Any, role: str, path: Path) -> dict[str, Any]:
    if isinstance(spec, str):
        spec = {"model": spec}
    if not isinstance(spec, dict) or not spec.get("model"):
        raise ModelError(f"decoding_defense.json names no {role} model folder", where=str(path),
                         fix='write {"' + role + '": {"model": FOLDER, "adapter": null}}')
    return {"model": str(spec["model"]), "adapter": spec.get("adapter")}


def load_decoding_defense(folder: str | Path, *, trust_remote_code: bool = False,
                          dtype: torch.dtype | str | None = None) -> tuple[Any, Any]:
    """``(defense model, tokenizer)`` from a folder written by :meth:`DecodingDefense.save_pretrained`.

    Both named models load through :func:`unbackdoor.lm.models.load_causal_lm` (safe loading, no
    repository code unless asked); the tokenizer is the one saved beside the file.
    """
    from .models import load_causal_lm, load_tokenizer

    folder = Path(folder)
    path = folder / "decoding_defense.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path.name}: {e}", where=str(path),
                         fix="the folder is damaged: run the defense again") from None
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in LM_DECODERS:
        raise ModelError(f"unknown decoding-time defense {kind!r}", where=str(path),
                         fix=f"one of: {', '.join(LM_DECODERS.names())}")
    cls = LM_DECODERS.get(kind)
    suspect_src, reference_src = _role(data.get("suspect"), "suspect", path), _role(data.get("reference"), "reference", path)
    suspect, tok = load_causal_lm(suspect_src["model"], adapter=suspect_src["adapter"],
                                  trust_remote_code=trust_remote_code, dtype=dtype, trainable_adapter=False)
    reference, _ = load_causal_lm(reference_src["model"], adapter=reference_src["adapter"],
                                  trust_remote_code=trust_remote_code, dtype=dtype, trainable_adapter=False)
    if (folder / "tokenizer_config.json").is_file():
        tok = load_tokenizer(folder, trust_remote_code)
    cfg = from_dict(cls.Config, dict(data.get("settings") or {}), source=str(path))
    model = cls(suspect.eval(), reference.eval(), cfg, sources={"suspect": suspect_src, "reference": reference_src})
    return model.eval(), tok


def decoding_defense_inputs(folder: str | Path) -> list[str]:
    """The model folders a decoding-defense folder names (inputs an output must not overwrite)."""
    try:
        data = json.loads((Path(folder) / "decoding_defense.json").read_text())
    except (OSError, ValueError):
        return []
    out = []
    for role in ("suspect", "reference"):
        spec = data.get(role)
        spec = {"model": spec} if isinstance(spec, str) else spec if isinstance(spec, dict) else {}
        out += [str(v) for k, v in spec.items() if k in ("model", "adapter") and v]
    return out


__all__ = ["DecodingDefense", "LM_DECODERS", "decoding_defense_inputs", "load_decoding_defense"]
