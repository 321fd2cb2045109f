"""Plain finetuning on the defender's clean data: the baseline CROW must beat (same data and budget)."""
from __future__ import annotations

from typing import Any, Sequence

from ....core.defense import DefenseSpec, Needs
from ...training import FinetuneConfig, train_sft

__all__ = ["SPEC", "FinetuneConfig", "run_finetune"]


def run_finetune(model: Any, tokenizer: Any, clean: Sequence[dict], cfg: FinetuneConfig, ctx: Any) -> Any:
    """The registered entry point: :func:`unbackdoor.lm.training.train_sft` in the run's work folder."""
    return train_sft(model, tokenizer, clean, cfg, ctx.work_dir, template=ctx.template, resume=ctx.resume)


SPEC = DefenseSpec(
    name="finetune", kind="lm", config=FinetuneConfig, run=run_finetune, needs=Needs(trains=True),
    summary="plain finetuning on the clean records (the baseline; compare at CROW's learning rate too)",
    paper="the CROW paper's finetuning baseline (lr 2e-4)",
)
