"""A model card (``README.md``, huggingface_hub's :class:`~huggingface_hub.ModelCard`) for every saved model.

A defended model shared on a hub should explain itself: which defense ran with which settings,
on what clean data and prompt template, what it measured before and after, with which version
of this toolkit, from which base model, and that its input was an untrusted model. peft's
``save_pretrained`` leaves an empty template README in adapter folders; this replaces it.

    write_model_card(run / "model", {"defense": "crow", "kind": "lm", "base_model": "...", ...})
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError
from .runs import atomic_write_text

# info keys: what each says on the card
FIELDS: dict[str, str] = {
    "defense": "the defense that produced the model (required): crow, finetune, ulrl, ft, ...",
    "kind": "'lm' (a causal language model) or 'classify' (an image classifier)",
    "variant": "the preset the defense ran with (e.g. 'kept'), if any",
    "settings": "the defense's resolved settings: {name: value}",
    "base_model": "the model the defense started from (a hub id or a local path)",
    "adapter": "True when the folder holds a LoRA adapter (to load on top of base_model), False for full weights",
    "clean_data": "the clean data the defense saw: {'source': path or name, 'count': n}",
    "template": "the prompt template of training and evaluation (lm): alpaca, chat, ...",
    "attack": "the attack the model is known to carry, when known (tiny worlds, benchmarks)",
    "task": "the attack's task, when known (lm)",
    "seed": "the seed of the defense run",
    "metrics": "{'before': {metric: value}, 'after': {metric: value}} measured by the toolkit",
    "notes": "free text appended to the card",
}

WARNING = ("**Produced from an untrusted model.** The input to this defense was a model suspected to carry a "
           "backdoor. The defense lowers the attack success measured on the triggers tested below; it does not "
           "prove the model free of backdoors (other triggers, adaptive attacks). Evaluate it on your own data and "
           "triggers before use, and load it with the same care as any model from an untrusted source "
           "(safetensors, no remote code).")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _check(info: Mapping[str, Any]) -> None:
    unknown = sorted(set(info) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown model-card field(s): {', '.join(unknown)}", where="write_model_card(info=...)",
                          fix=f"use the fields {', '.join(FIELDS)}")
    if not isinstance(info.get("defense"), str) or not info["defense"]:
        raise ConfigError("the model card needs the defense's name", where="write_model_card(info['defense'])",
                          fix="pass info={'defense': 'crow', ...}")
    for key in ("settings", "clean_data", "metrics"):
        if key in info and info[key] is not None and not isinstance(info[key], Mapping):
            raise ConfigError(f"model-card field '{key}' is a {type(info[key]).__name__}, expected a mapping",
                              where=f"write_model_card(info['{key}'])", fix=f"pass {key} as a dict")


def _value(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def _cell(v: Any) -> str:
    return _value(v).replace("|", "\\|").replace("\n", " ")


def _metrics_table(metrics: Mapping[str, Any]) -> list[str]:
    before = metrics.get("before") or {}
    after = metrics.get("after") or {}
    keys = [k for k in dict.fromkeys([*before, *after])
            if isinstance(before.get(k, after.get(k)), (int, float)) and not isinstance(before.get(k), bool)]
    if not keys:
        return ["No metrics were recorded."]
    rows = ["| metric | before the defense | after the defense |", "|---|---:|---:|"]
    for k in keys:
        rows.append(f"| {k} | {_cell(before.get(k, 'n/a'))} | {_cell(after.get(k, 'n/a'))} |")
    return rows


def model_card_text(info: Mapping[str, Any]) -> str:
    """The card's Markdown (YAML metadata block first): what :func:`write_model_card` writes."""
    from huggingface_hub import ModelCard, ModelCardData

    from .. import __version__

    _check(info)
    defense = info["defense"]
    kind = info.get("kind")
    adapter = bool(info.get("adapter"))
    base = info.get("base_model")
    tags = ["unbackdoor", "backdoor-defense", str(defense)] + (["lora", "peft"] if adapter else [])
    meta: dict[str, Any] = {"tags": tags,
                            "library_name": "peft" if adapter else ("transformers" if kind == "lm" else None),
                            "pipeline_tag": "text-generation" if kind == "lm" else None}
    # hub metadata only takes hub ids; a local path stays in the text
    if isinstance(base, str) and _HUB_ID.match(base) and not Path(base).exists():
        meta["base_model"] = base
    data = ModelCardData(**{k: v for k, v in meta.items() if v is not None})

    what = "LoRA adapter" if adapter else "model"
    variant = f" (preset `{info['variant']}`)" if info.get("variant") else ""
    lines = [f"# Defended {what}: {defense}{variant}", "",
             f"This {what} was produced by **unbackdoor {__version__}** running the **{defense}** defense"
             f"{variant} on a model suspected to carry a backdoor.", "", "> " + WARNING, "", "## What was done", ""]
    facts = [("defense", f"`{defense}`" + variant),
             ("base model", f"`{base}`" if base else "not recorded"),
             ("saved as", "a LoRA adapter: load it on top of the base model" if adapter else "full weights")]
    clean = info.get("clean_data") or {}
    if clean:
        count = clean.get("count")
        facts.append(("clean data", f"{count if count is not None else 'an unknown number of'} samples from "
                                    f"`{clean.get('source', 'an unnamed source')}`"))
    else:
        facts.append(("clean data", "not recorded"))
    for key, label in (("template", "prompt template"), ("attack", "known attack"), ("task", "attack task"),
                       ("seed", "seed")):
        if info.get(key) is not None:
            facts.append((label, f"`{info[key]}`"))
    facts.append(("toolkit", f"unbackdoor {__version__}"))
    lines += [f"- **{k}**: {v}" for k, v in facts]
    settings = info.get("settings") or {}
    lines += ["", "## Settings", ""]
    if settings:
        lines += ["| setting | value |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in settings.items()]
    else:
        lines.append("No settings were recorded.")
    lines += ["", "## Measured before and after the defense", ""]
    lines += _metrics_table(info.get("metrics") or {})
    lines += ["", "Metrics as defined in unbackdoor's docs: ASR = attack success rate on triggered inputs (lower is "
                  "better); utilities and accuracies on clean inputs (higher is better)."]
    if info.get("notes"):
        lines += ["", "## Notes", "", str(info["notes"])]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    return str(card)


def write_model_card(folder: str | Path, info: Mapping[str, Any]) -> Path:
    """Write ``folder/README.md`` (replacing peft's empty template); return its path. See :data:`FIELDS`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"no model folder at {folder}", where=str(folder),
                          fix="save the model first (save_pretrained), then write its card")
    return atomic_write_text(folder / "README.md", model_card_text(info))
