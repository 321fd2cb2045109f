"""LM defenses, by name: one folder each, registered in one line below (the report lists them in this order: baselines first).

A defense folder exposes ``SPEC`` (a :class:`unbackdoor.core.defense.DefenseSpec`) whose ``run``
has the signature::

    run(model, tokenizer, clean_records, cfg, ctx: LMDefenseContext) -> defended model

``model`` is a Hugging Face causal LM (a ``PeftModel`` when it carries an adapter); the defense may
train it in place or return a new one. ``clean_records`` are the defender's Alpaca records (the
only data a defense sees). A defense that trains uses ``ctx.work_dir`` for its checkpoints and
honours ``ctx.resume``; one that needs the clean base model declares ``Needs(base_model=True)``
and calls ``ctx.load_base_model()``. The CLI's ``--method`` choices and flags, the API, the tiny
world and the report read this registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ...core.defense import DefenseSpec
from ...core.errors import ConfigError
from ...core.registry import Registry

LM_DEFENSES: Registry[DefenseSpec] = Registry("LM defense")
LM_DEFENSES.add("finetune", "unbackdoor.lm.defenses.finetune:SPEC", aliases=("ft",))
LM_DEFENSES.add("prune", "unbackdoor.lm.defenses.prune:SPEC")
LM_DEFENSES.add("wanda", "unbackdoor.lm.defenses.prune:WANDA_SPEC")
LM_DEFENSES.add("quantize", "unbackdoor.lm.defenses.quantize:SPEC", aliases=("quant",))
LM_DEFENSES.add("lora-scale", "unbackdoor.lm.defenses.lora_scale:SPEC")
LM_DEFENSES.add("merge", "unbackdoor.lm.defenses.merge:SPEC")
LM_DEFENSES.add("cleangen", "unbackdoor.lm.defenses.cleangen:SPEC")
LM_DEFENSES.add("beear", "unbackdoor.lm.defenses.beear:SPEC")
LM_DEFENSES.add("crow", "unbackdoor.lm.defenses.crow:SPEC")


@dataclass
class LMDefenseContext:
    """What the flow hands an LM defense besides the model, tokenizer, clean records and config."""

    work_dir: Path
    """Where the defense writes checkpoints and logs (``RUN/trainer``)."""
    template: str = "alpaca"
    """The prompt template, the same in training and evaluation."""
    seed: int = 0
    resume: bool = False
    """Continue from the newest complete checkpoint in ``work_dir``."""
    base_model_path: str | None = None
    """The clean base / reference model the suspect was finetuned from, when the user gave one."""
    base_model_loader: Callable[[], tuple[Any, Any]] | None = None
    model_path: str | None = None
    """The suspect's model folder, when it came from one (a decoding-time defense names it in its output)."""
    adapter_path: str | None = None
    """The suspect's adapter folder on top of ``model_path``, when it has one."""
    record: dict[str, Any] = field(default_factory=dict)
    """What the defense reports about its own run (the backend it used, the scale it chose, the behaviour
    examples it read): the flow writes it to ``metrics.json`` (``defense_info``) and ``threat_model.json``
    (``given.defense_info``)."""

    def load_base_model(self) -> tuple[Any, Any]:
        """``(model, tokenizer)`` of the clean base model; a clear error when none was given."""
        if self.base_model_loader is None:
            raise ConfigError("this defense needs the clean base model the suspect was finetuned from",
                              where="--base-model", fix="pass --base-model FOLDER (the reference model), or choose "
                                                        "a defense that does not need one")
        return self.base_model_loader()


__all__ = ["LMDefenseContext", "LM_DEFENSES"]
