"""BEEAR (Zeng et al., EMNLP 2024): a defense aimed at triggered behaviour, not at a target string.

CROW removes a target string while triggered prompts can stay hijacked. BEEAR needs no trigger:
the defender gives examples of the desired and the unwanted behaviour (``--behaviour FILE``:
Alpaca records with ``output`` = desired and ``unwanted``), BEEAR finds the universal drift in a
middle layer's embedding space that elicits the unwanted behaviour, and trains the model to keep
the desired behaviour under that drift (with the clean records as performance anchor). The
run records the behaviour file and its size (``threat_model.json``, ``given.defense_info``).
See :mod:`.trainer` for the algorithm and docs/results-llm-defenses.md for its defaults.
"""
from __future__ import annotations

from typing import Any, Sequence

from ....core.defense import DefenseSpec, Needs
from .config import BeearConfig
from .trainer import BeearTrainer, read_behaviour, train_beear

__all__ = ["BeearConfig", "BeearTrainer", "SPEC", "read_behaviour", "run_beear", "train_beear"]


def run_beear(model: Any, tokenizer: Any, clean: Sequence[dict], cfg: BeearConfig, ctx: Any) -> Any:
    """The registered entry point: :func:`train_beear` in the run's work folder; records what it was given."""
    trained, info = train_beear(model, tokenizer, clean, cfg, ctx.work_dir, template=ctx.template, resume=ctx.resume)
    ctx.record.update(info)
    return trained


def _check(model: Any, cfg: BeearConfig) -> None:
    """Refuse before any compute: no behaviour file, or a layer outside the model."""
    cfg.require_behaviour()
    read_behaviour(cfg.behaviour)
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if n is not None:
        cfg.resolve_layer(int(n))


SPEC = DefenseSpec(
    name="beear", kind="lm", config=BeearConfig, run=run_beear,
    needs=Needs(trains=True, clean_data=True, behaviour_examples=True),
    summary="BEEAR: entrap the backdoor as a universal drift in a middle layer, train the desired behaviour under it",
    paper="BEEAR: Embedding-based Adversarial Removal of Safety Backdoors in Instruction-tuned Language Models "
          "(EMNLP 2024)",
    budgets={"smoke": {"inner_steps": 2}},
    check=_check,
)
