"""CROW (Internal Consistency Regularization, ICML 2025): finetune with adversarial layer consistency."""
from __future__ import annotations

from typing import Any, Sequence

from ....core.defense import DefenseSpec, Needs
from .config import CrowConfig
from .trainer import CrowTrainer, check_crow_model, train_crow

__all__ = ["SPEC", "CrowConfig", "CrowTrainer", "check_crow_model", "run_crow", "train_crow"]


def run_crow(model: Any, tokenizer: Any, clean: Sequence[dict], cfg: CrowConfig, ctx: Any) -> Any:
    """The registered entry point: :func:`train_crow` in the run's work folder."""
    return train_crow(model, tokenizer, clean, cfg, ctx.work_dir, template=ctx.template, resume=ctx.resume)


SPEC = DefenseSpec(
    name="crow", kind="lm", config=CrowConfig, run=run_crow, needs=Needs(trains=True),
    summary="finetune with adversarial consecutive-layer consistency (LM loss + alpha x L_adv)",
    paper="CROW: Eliminating Backdoors from Large Language Models via Internal Consistency Regularization (ICML 2025)",
    presets={
        # the released code's FGSM step is a no-op (an aliased gradient zeroed in place): its published
        # numbers correspond to epsilon 0 (SPEC section 6; docs/crow.md)
        "released": {"epsilon": 0.0},
    },
    budgets={"demo": {"alpha": 11.0, "epsilon": 0.1}, "smoke": {"alpha": 11.0, "epsilon": 0.1}},
    check=check_crow_model,
)
