"""ULRL's settings: every constant of the paper is a field; named recipes are presets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ....core.config import check, check_fraction, check_non_negative, check_positive, option
from ....core.errors import ConfigError


@dataclass
class ULRLConfig:
    """ULRL settings; defaults are the paper's CIFAR-10 recipe (``variant='paper'``)."""

    variant: str = option("paper", "name of the recipe these values come from (paper, kept, cifar100, ...); recorded only")
    batch_size: int = option(128, "minibatch size for unlearning and relearning (paper: 128)")
    min_clean_per_class: int = option(5, "refuse clean subsets smaller than this many samples per class")
    # unlearning
    unlearn_lr: float = option(0.01, "SGD learning rate of the unlearning (gradient ascent) phase (paper: 0.01)")
    unlearn_momentum: float = option(0.9, "SGD momentum while unlearning (paper: 0.9)")
    unlearn_weight_decay: float = option(5e-4, "weight decay while unlearning (paper: 5e-4)")
    unlearn_milestones: tuple[int, ...] = option((10, 20), "epochs at which the unlearning lr is multiplied by gamma (paper: 10, 20)")
    unlearn_gamma: float = option(0.1, "MultiStepLR factor while unlearning (paper: 0.1)")
    unlearn_clip: float = option(20.0, "gradient-norm clip while unlearning (paper: 20)")
    unlearn_max_epochs: int = option(20, "at most this many unlearning epochs (paper: 20)")
    unlearn_stop_acc: float = option(0.2, "stop unlearning once an epoch's running clean accuracy is <= this (paper: 0.2)")
    unlearn_stop_rule: Literal["auto", "absolute", "chance"] = option(
        "absolute", "absolute: stop at unlearn_stop_acc (paper); chance: at 1/K + unlearn_stop_margin x (1 - 1/K), the "
                "paper's 0.2 at K = 10 carried to K classes; auto: the larger of the two (the paper's rule wherever "
                "0.2 is above chance, the chance-relative one on 2-5 classes, where 0.2 is unreachable)")
    unlearn_stop_margin: float = option(
        0.1111, "chance-relative stop: the fraction of the way from chance (1/K) to perfect accuracy (1/9 = 0.1111 "
                "gives the paper's 0.2 at K = 10; 0.556 at K = 2)")
    optimizer: Literal["sgd", "adamw"] = option(
        "sgd", "optimizer of both phases: sgd (the paper's) or adamw (pretrained encoders: preset 'encoder')")
    # neuron selection
    z_threshold: float = option(3.5, "a head row is suspicious if its robust z-score exceeds this and its score exceeds the median (paper: 3.5)")
    max_neurons: int = option(2, "keep at most this many suspicious rows, largest z first (paper: 2)")
    neurons: Literal["auto", "head", "feeding"] = option(
        "head", "which neurons are scored: head (the paper's: one row per class), feeding (the neurons of the layer "
                "that feeds the head, scored by how far their incoming weights moved while unlearning: Lin et al. "
                "2024's neuron weight change), auto: head with >= head_min_classes classes, else feeding (with 2 "
                "classes the two head rows move by mirror-image amounts and the MAD rule can never flag one)")
    head_min_classes: int = option(10, "auto: score the head rows from this many classes up (the paper's setting: 10+)")
    feeding_max_fraction: float = option(
        0.05, "feeding neurons: keep at most max(max_neurons, this fraction of the layer) suspicious neurons")
    augment: bool = option(True, "random crop (pad 4) + horizontal flip of image batches while unlearning and relearning (BackdoorBench's training transform)")
    head: str | None = option(None, "dotted path of the classifier head (default: the last nn.Linear with one output per class)")
    # relearning
    relearn_lr: float = option(0.005, "SGD learning rate of relearning (paper: 0.005 CIFAR-10; 0.001 CIFAR-100/GTSRB)")
    relearn_momentum: float = option(0.9, "SGD momentum while relearning (paper: 0.9)")
    relearn_weight_decay: float = option(0.0, "weight decay while relearning (paper: none)")
    relearn_epochs: int = option(20, "relearning epochs, cosine-annealed lr (paper: 20)")
    relearn_clip: float | None = option(None, "gradient-norm clip while relearning (paper: none)")
    alpha: float = option(0.7, "weight of the cosine penalty between re-initialised and original rows (paper: 0.7 CIFAR-10; 0.001 CIFAR-100/GTSRB)")
    penalty: Literal["signed", "positive"] = option(
        "signed", "signed: alpha * sum cos (paper; pushes rows towards cos -1); positive: alpha * sum max(cos, 0) (stop at orthogonal)")
    reinit_class_weight: float = option(
        1.0, "cross-entropy weight of the classes whose rows were re-initialised, while relearning (paper: 1); "
             "a fresh row competes with trained ones, so > 1 helps it relearn its class")

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_positive(self, "batch_size", "unlearn_lr", "unlearn_max_epochs", "relearn_lr", "relearn_epochs",
                       "unlearn_clip", "z_threshold", "max_neurons", "reinit_class_weight")
        check_non_negative(self, "unlearn_momentum", "unlearn_weight_decay", "relearn_momentum",
                           "relearn_weight_decay", "alpha", "min_clean_per_class", "unlearn_gamma")
        check_fraction(self, "unlearn_stop_acc", "unlearn_stop_margin", "feeding_max_fraction")
        check(self.head_min_classes >= 2, "head_min_classes", self.head_min_classes, ">= 2", name)
        check(self.unlearn_stop_rule in ("auto", "absolute", "chance"), "unlearn_stop_rule", self.unlearn_stop_rule,
              "'auto', 'absolute' or 'chance'", name)
        check(self.neurons in ("auto", "head", "feeding"), "neurons", self.neurons, "'auto', 'head' or 'feeding'", name)
        check(self.optimizer in ("sgd", "adamw"), "optimizer", self.optimizer, "'sgd' or 'adamw'", name)
        check(self.relearn_clip is None or self.relearn_clip > 0, "relearn_clip", self.relearn_clip, "> 0 or null", name)
        check(all(m > 0 for m in self.unlearn_milestones) and list(self.unlearn_milestones) == sorted(self.unlearn_milestones),
              "unlearn_milestones", self.unlearn_milestones, "increasing positive epochs", name)
        check(self.penalty in ("signed", "positive"), "penalty", self.penalty, "'signed' or 'positive'", name)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ULRLConfig":
        """A named recipe (see :data:`PRESETS`), with any field overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown ULRL preset '{name}'", where="ULRLConfig.preset",
                              fix=f"use one of: {', '.join(PRESETS)}")
        return cls(**{"variant": name, **PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # the paper's CIFAR-10 recipe, faithful (can delete the target class on small models: SPEC section 3)
    "paper": {},
    "cifar10": {},
    # the paper's recipe for CIFAR-100, GTSRB and Tiny-ImageNet
    "cifar100": {"relearn_lr": 0.001, "alpha": 0.001},
    "gtsrb": {"relearn_lr": 0.001, "alpha": 0.001},
    "tiny-imagenet": {"relearn_lr": 0.001, "alpha": 0.001},
    # our refinement (docs/ulrl.md): push the re-initialised rows to orthogonal, not to cos -1, and give
    # the fresh rows enough signal to relearn their class (a larger relearning lr, class weight 1.5);
    # chosen on the 15-epoch tiny world's seeds 0-2, confirmed on its seeds 3-4 and on every model of
    # the present 25-epoch world (docs/results-classify.md)
    "kept": {"penalty": "positive", "relearn_lr": 0.02, "reinit_class_weight": 1.5},
    # the penalty change alone (the first refinement): ASR <= 0.15, but loses 5-53 recall points
    "orthogonal": {"penalty": "positive"},
    # few-class tasks (2-5 classes, docs/ulrl.md): the paper's recipe with a chance-relative stop rule and,
    # below 10 classes, the neurons feeding the head scored instead of the head rows
    "few-class": {"neurons": "auto", "unlearn_stop_rule": "auto"},
    # pretrained transformer encoders (SPEC section 5: the CIFAR SGD recipe does nothing or collapses them):
    # AdamW at finetuning learning rates, small batches, no image augmentation, the few-class rules
    "encoder": {"optimizer": "adamw", "batch_size": 16, "augment": False, "unlearn_lr": 5e-5,
                "unlearn_weight_decay": 0.0, "relearn_lr": 5e-5, "relearn_weight_decay": 0.01, "relearn_epochs": 10,
                "penalty": "positive", "neurons": "auto", "unlearn_stop_rule": "auto"},
}


def stop_accuracy(cfg: ULRLConfig, num_classes: int) -> float:
    """The unlearning stop threshold for ``num_classes`` classes under ``cfg.unlearn_stop_rule`` (pure).

    absolute: ``unlearn_stop_acc``; chance: ``1/K + margin * (1 - 1/K)``, which is 0.2 at K = 10 with
    the default margin 1/9, and 0.556 / 0.333 / 0.289 at K = 2 / 4 / 5 (above chance, reachable by a
    model that collapsed onto one class of a class-balanced clean set; on an imbalanced one a model
    collapsed onto the majority class can sit above it: the MiniLM measurement in docs/results-byo.md);
    auto: the larger of the two.
    """
    chance = 1.0 / max(int(num_classes), 1)
    relative = chance + cfg.unlearn_stop_margin * (1.0 - chance)
    if cfg.unlearn_stop_rule == "absolute":
        return cfg.unlearn_stop_acc
    if cfg.unlearn_stop_rule == "chance":
        return relative
    return max(cfg.unlearn_stop_acc, relative)


def scored_layer(cfg: ULRLConfig, num_classes: int) -> str:
    """``head`` or ``feeding``: which neurons ULRL scores for a ``num_classes``-class model."""
    if cfg.neurons != "auto":
        return cfg.neurons
    return "head" if num_classes >= cfg.head_min_classes else "feeding"
