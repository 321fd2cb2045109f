"""CROW's settings: the Trainer's (an SFTConfig) plus alpha, epsilon and the layer range (SPEC section 2)."""
from __future__ import annotations

from dataclasses import dataclass

from ....core.config import check, check_non_negative, check_positive, option
from ...models import LoraSettings
from ...training import SFTConfig


@dataclass
class CrowConfig(SFTConfig):
    """CROW defaults from the paper and its official configs (SPEC section 2)."""

    learning_rate: float = option(1e-3, "peak learning rate (paper: 1e-3, cosine, warm-up 0.1)")
    num_train_epochs: float = option(5.0, "epochs over the clean set (paper: 5; ~60 steps for 100 samples)")
    per_device_train_batch_size: int = option(2, "micro-batch size (paper: 2)")
    gradient_accumulation_steps: int = option(4, "gradient accumulation (paper: 4)")
    lora: LoraSettings = option(factory=LoraSettings, help="LoRA settings (paper: r 8, alpha 16, dropout 0, all linear)")
    alpha: float = option(5.5, "weight of the adversarial consistency loss (paper: 5.5; 11 for targeted refusal)")
    epsilon: float = option(0.1, "FGSM step on the input embeddings (paper: 0.1; 0 = no perturbation)")
    layer_start: int = option(1, "first hidden state compared (hs[0] is the embedding output; official: 1)")
    layer_end: int = option(-1, "hidden states hs[layer_start:layer_end] are compared pairwise; negative counts "
                                "from the end (official: -1, i.e. hs[1:-2] vs hs[2:-1], no final-norm pair)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative(self, "alpha", "epsilon")
        check_positive(self, "learning_rate")
        check(self.layer_start >= 0, "layer_start", self.layer_start, ">= 0", type(self).__name__)
        if self.layer_end >= 0:
            check(self.layer_end >= self.layer_start + 2, "layer_end", self.layer_end,
                  f">= layer_start + 2 = {self.layer_start + 2} (at least one pair of states), or negative",
                  type(self).__name__)
