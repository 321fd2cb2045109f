"""FT: plain fine-tuning on the clean subset, the baseline every defense must beat (same budget as ULRL)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ....core.config import check_non_negative, check_positive, option, to_dict
from ....core.defense import DefenseSpec, Needs
from ....core.runs import Phases, RunDir, as_run_dir
from ...batching import Prepare, as_inputs_labels
from ..common import ENCODER_RECIPE, OPTIMIZER_HELP, DefenseReport, check_clean_data, finetune, head_of, num_classes_of


@dataclass
class FTConfig:
    """Fine-tuning on the clean subset (ULRL's relearning budget: 20 epochs, batch 128)."""

    lr: float = option(0.01, "SGD learning rate (BackdoorBench ft: 0.01)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "weight decay (BackdoorBench: 5e-4)")
    epochs: int = option(20, "epochs, cosine-annealed lr (ULRL's relearning budget)")
    batch_size: int = option(128, "minibatch size")
    optimizer: Literal["sgd", "adamw"] = option("sgd", OPTIMIZER_HELP)
    augment: bool = option(True, "random crop + flip on image batches")
    min_clean_per_class: int = option(5, "refuse clean subsets smaller than this many samples per class")
    head: str | None = option(None, "dotted path of the classifier head (default: found automatically)")

    def __post_init__(self) -> None:
        check_positive(self, "lr", "epochs", "batch_size")
        check_non_negative(self, "momentum", "weight_decay", "min_clean_per_class")



def run_ft(model: nn.Module, clean_data: Any, cfg: FTConfig | None = None, run_dir: RunDir | str | None = None, *,
           num_classes: int | None = None, seed: int = 0, prepare: Prepare | None = None) -> tuple[nn.Module, DefenseReport]:
    """Fine-tune a copy of ``model`` on the clean subset."""
    cfg = cfg or FTConfig()
    inputs, labels = as_inputs_labels(clean_data)
    k = num_classes_of(labels, num_classes)
    head_of(model, k, cfg.head)  # a clear error for models we cannot classify with
    check_clean_data(labels, k, cfg.min_clean_per_class, "FT")
    phases = Phases(as_run_dir(run_dir))
    out = copy.deepcopy(model)
    with phases("train"):
        logs = finetune(out, clean_data, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                         epochs=cfg.epochs, batch_size=cfg.batch_size, augment=cfg.augment, seed=seed, prepare=prepare,
                        optimizer=cfg.optimizer)
    return out, DefenseReport("ft", int(labels.shape[0]), phases.timings, {"train_log": logs}, to_dict(cfg))


SPEC = DefenseSpec(
    name="ft", kind="classify", config=FTConfig, run=run_ft, needs=Needs(trains=True),
    summary="plain fine-tuning on the clean subset (the baseline)",
    paper="BackdoorBench's 'ft' baseline",
    presets={"encoder": dict(ENCODER_RECIPE)},  # pretrained transformers (common.ENCODER_RECIPE)
    budgets={"demo": {"epochs": 10}, "smoke": {"epochs": 2}},
)
