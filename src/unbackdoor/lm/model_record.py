"""``unbackdoor.json``: what a saved model records about the prompts it was trained on.

The same model measured with another prompt template gives another ASR (alpaca vs chat on one
model: 0.067 vs 0.750), and a tokenizer's chat template or special-token settings change the
prompt just as much. Every model :func:`unbackdoor.lm.models.save_causal_lm` writes carries
this record next to its weights, and :func:`check_template` warns when an evaluation or a
defense is about to show the model prompts built differently from the ones it was trained on.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .. import __version__
from .data import template_record

log = logging.getLogger("unbackdoor")

MODEL_RECORD = "unbackdoor.json"
RECORD_FORMAT = 1


def write_model_record(folder: str | Path, tokenizer: Any, template: str | None,
                       generation: dict[str, Any] | None = None) -> Path:
    """Write ``folder/unbackdoor.json`` (inside a folder being built: not atomic on its own).

    ``template`` is the prompt template the model was trained with (None: not known, e.g. a
    model saved without training; then nothing is compared later).
    """
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "written_by": f"unbackdoor {__version__}",
        "template": template_record(template, tokenizer) if template is not None and tokenizer is not None else None,
    }
    if generation is not None:
        record["generation_config"] = generation
    path = Path(folder) / MODEL_RECORD
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def read_model_record(model_dir: str | Path) -> dict[str, Any] | None:
    """The record of a model folder; for an adapter folder without one, its base model's. None if absent.

    A damaged record is reported in the log and treated as absent (it only ever adds warnings).
    """
    folder = Path(model_dir)
    candidates = [folder / MODEL_RECORD]
    adapter_cfg = folder / "adapter_config.json"
    if adapter_cfg.is_file():
        try:
            base = json.loads(adapter_cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (ValueError, OSError, AttributeError):
            base = None
        if isinstance(base, str) and base:
            base_dir = Path(base) if Path(base).is_absolute() else folder / base
            candidates.append(base_dir / MODEL_RECORD)
    for path in candidates:
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            log.warning("ignoring the unreadable model record %s (%s)", path, e)
            return None
        return data if isinstance(data, dict) else None
    return None


def check_template(model_dir: str | Path, template: str, tokenizer: Any) -> list[str]:
    """Warnings (also logged) when prompts built with ``template`` and ``tokenizer`` differ from training.

    Compares the template name, the chat template text (by hash) and the ids of a probe
    prompt with what the model folder recorded when it was saved. An empty list: same prompts,
    or nothing recorded (a model from elsewhere).
    """
    record = read_model_record(model_dir)
    trained = (record or {}).get("template")
    if not isinstance(trained, dict):
        return []
    now = template_record(template, tokenizer)
    warnings: list[str] = []
    if trained.get("name") != now["name"]:
        warnings.append(f"the model in {model_dir} was trained with the '{trained.get('name')}' prompt template "
                        f"but is now prompted with '{now['name']}': the measured ASR and utility can change "
                        f"completely (pass --template {trained.get('name')} to measure it as it was trained)")
    elif now["name"] == "chat" and trained.get("chat_template_sha256") != now.get("chat_template_sha256"):
        warnings.append(f"the tokenizer's chat template differs from the one the model in {model_dir} was trained "
                        "with: prompts are built differently from training")
    elif trained.get("prompt_sha256") and trained.get("prompt_sha256") != now.get("prompt_sha256"):
        warnings.append(f"the tokenizer turns the '{now['name']}' prompt into other tokens than when the model in "
                        f"{model_dir} was trained (special tokens or tokenizer changed: "
                        f"{trained.get('special_tokens')} then, {now['special_tokens']} now)")
    for w in warnings:
        log.warning("%s", w)
    return warnings
