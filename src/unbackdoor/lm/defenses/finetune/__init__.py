"""Plain finetuning on the defender's clean data: the baseline CROW must beat (same data and budget).

Two settings, named so a table says which is which (SPEC section 6, the learning-rate confound):

- ``finetune`` (the default, also named ``official``): the CROW paper's baseline, learning rate
  2e-4 = 0.2 x CROW's 1e-3, CROW's step count. On a tiny world: 0.2 x the world's CROW rate.
- ``finetune-crow-lr`` (preset ``crow-lr``): CROW's own learning rate and step count, the control
  that tells what CROW's consistency term adds over finetuning at the same rate. On the official
  data finetuning at 1e-3 matched or beat CROW while 2e-4 left the backdoor in.

Both follow CROW's settings where the run is made (:class:`unbackdoor.core.defense.Linked`): its
paper defaults for ``unbackdoor lm defend``, the world's (and any ``defense.crow.*`` override) on
a tiny world.
"""
from __future__ import annotations

from typing import Any, Sequence

from ....core.defense import DefenseSpec, Linked, Needs
from ...training import FinetuneConfig, train_sft

__all__ = ["CROW_STEP_FIELDS", "OFFICIAL_LR_RATIO", "SPEC", "FinetuneConfig", "run_finetune"]

OFFICIAL_LR_RATIO = 0.2
"""The paper's finetuning learning rate over CROW's: 2e-4 / 1e-3."""

CROW_STEP_FIELDS = ("num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                    "lr_scheduler_type", "warmup_steps", "finetune", "lora", "continue_adapter")
"""The settings that fix the optimizer steps, the schedule and what is trained (LoRA or full): taken from CROW's."""


def run_finetune(model: Any, tokenizer: Any, clean: Sequence[dict], cfg: FinetuneConfig, ctx: Any) -> Any:
    """The registered entry point: :func:`unbackdoor.lm.training.train_sft` in the run's work folder."""
    return train_sft(model, tokenizer, clean, cfg, ctx.work_dir, template=ctx.template, resume=ctx.resume)


_CROW_STEPS = {f: Linked("crow", f) for f in CROW_STEP_FIELDS}
_OFFICIAL = {"learning_rate": Linked("crow", "learning_rate", OFFICIAL_LR_RATIO), **_CROW_STEPS}

SPEC = DefenseSpec(
    name="finetune", kind="lm", config=FinetuneConfig, run=run_finetune, needs=Needs(trains=True),
    summary="plain finetuning on the clean records (the baseline, lr 0.2 x CROW's; preset crow-lr: CROW's lr "
            "and steps, the equal-lr control)",
    paper="the CROW paper's finetuning baseline (lr 2e-4, CROW's budget)",
    presets={
        "official": _OFFICIAL,  # the same as the default: named for tables and scripts
        "crow-lr": {"learning_rate": Linked("crow", "learning_rate"), **_CROW_STEPS},
    },
    # the tiny worlds give every training defense the same lr: keep the official ratio to CROW's there
    budgets={"demo": _OFFICIAL, "smoke": _OFFICIAL},
)
