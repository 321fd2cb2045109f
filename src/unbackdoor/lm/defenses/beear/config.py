"""BEEAR's settings: the Trainer's (an SFTConfig) plus the entrapment layer, inner loop and the behaviour file."""
from __future__ import annotations

from dataclasses import dataclass

from ....core.config import check, check_non_negative, check_positive, option
from ....core.errors import ConfigError
from ...training import SFTConfig

PAPER_LAYER_FRACTION = 9 / 32
"""The paper perturbs the output of decoder layer 9 of Llama-2-7B's 32; other depths scale this fraction."""


@dataclass
class BeearConfig(SFTConfig):
    """BEEAR (Zeng et al., EMNLP 2024): bi-level entrapment in a middle layer's embedding space, then removal.

    The outer level is ordinary LoRA finetuning (the toolkit's SFT settings, so the tiny world gives it
    CROW's budget); the inner level and the behaviour examples are BEEAR's own.
    """

    behaviour: str = option("", "JSON/JSONL of behaviour examples: Alpaca records whose 'output' is the desired "
                                "answer and whose 'unwanted' is the unwanted one (same prompt); required")
    layer: int | None = option(None, "decoder block whose output the perturbation is added to (None: round(9/32 x "
                                     "layers), the paper's layer 9 of Llama-2-7B's 32)")
    inner_steps: int = option(5, "entrapment steps per outer step (normalised-gradient steps on the perturbation)")
    inner_step_size: float = option(0.1, "L2 length of one entrapment step, relative to the mean hidden-state norm "
                                         "at the layer (so the perturbation's size is scale-free)")
    contrast: float = option(1.0, "entrapment loss = CE(unwanted) - contrast x CE(desired) under the perturbation")
    anchor_weight: float = option(1.0, "weight of the performance-anchoring LM loss on the clean records (no "
                                       "perturbation) beside the desired-behaviour loss under it")

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_positive(self, "inner_steps", "inner_step_size")
        check_non_negative(self, "contrast", "anchor_weight")
        if self.layer is not None:
            check(self.layer >= 0, "layer", self.layer, ">= 0", name)

    def require_behaviour(self) -> str:
        if not str(self.behaviour).strip():
            raise ConfigError("BEEAR needs examples of the desired and the unwanted behaviour", where="--behaviour",
                              fix="pass --behaviour FILE: Alpaca records with 'output' (desired) and 'unwanted' "
                                  "(e.g. the same prompts answered helpfully and with the unwanted behaviour)")
        return str(self.behaviour)

    def resolve_layer(self, num_layers: int) -> int:
        layer = round(PAPER_LAYER_FRACTION * num_layers) if self.layer is None else self.layer
        if not 0 <= layer < num_layers:
            raise ConfigError(f"BEEAR layer {layer} is outside the model's {num_layers} decoder blocks",
                              where="--layer", fix=f"use 0..{num_layers - 1}, or leave it out")
        return layer


__all__ = ["BeearConfig", "PAPER_LAYER_FRACTION"]
