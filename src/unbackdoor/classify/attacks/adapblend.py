"""Adap-Blend (Qi et al., ICLR 2023): a blended trigger split into pieces, half of them masked while poisoning,
with label-keeping "cover" samples: an attack built to stay close to the clean data in latent space.

While poisoning, every payload image (relabelled to the target) and every cover image (label kept;
``adap_cover_ratio`` per payload sample: the conservatism ratio) is blended at ``adap_train_alpha``
with the trigger restricted to a random half of its ``adap_pieces`` grid pieces. At test time the
whole trigger is blended at ``adap_test_alpha``. Defaults are the authors' toolbox's (16 pieces, mask
rate 0.5, alpha 0.15 / 0.2, as many cover as payload samples). The trigger image is Blended's
mosaic (``blended.blend_pattern``): the toolbox's Hello Kitty cannot be shipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...core.config import check, check_fraction, check_non_negative, option
from .base import Attack, AttackConfig, label_preserving
from .blended import blend_pattern


@dataclass
class AdapBlendConfig(AttackConfig):
    """Adap-Blend settings (authors' toolbox: 16 pieces, mask rate 0.5, alpha 0.15 train / 0.2 test)."""

    name: str = option("adapblend", "attack name")
    adap_pieces: int = option(16, "the trigger is cut into this many square pieces (a square number; 16 = 4 x 4)")
    adap_mask_rate: float = option(0.5, "fraction of the pieces masked out in each poisoned training image (0.5)")
    adap_train_alpha: float = option(0.15, "blend weight of the trigger in poisoned training images (0.15)")
    adap_test_alpha: float = option(0.2, "blend weight of the whole trigger at test time (0.2)")
    adap_cover_ratio: float = option(1.0, "cover samples (trigger pieces, label kept) per payload sample: the "
                                          "conservatism ratio (1: cover rate = poison rate)")
    pattern_seed: int | None = option(None, "seed of the trigger image (None: use 'seed')")

    attack_name: ClassVar[str | None] = "adapblend"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.adap_pieces >= 1 and math.isqrt(self.adap_pieces) ** 2 == self.adap_pieces, "adap_pieces",
              self.adap_pieces, "a square number (4, 9, 16, ...)", type(self).__name__)
        check_fraction(self, "adap_mask_rate", "adap_train_alpha", "adap_test_alpha")
        check_non_negative(self, "adap_cover_ratio")


def piece_masks(n: int, pieces: int, masked: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """``[n, 1, h, w]`` masks: a ``sqrt(pieces)``-square grid with ``masked`` random pieces set to 0 per image."""
    k = math.isqrt(pieces)
    keep = torch.ones(n, pieces)
    for i in range(n):
        keep[i, torch.randperm(pieces, generator=g)[:masked]] = 0.0
    grid = keep.view(n, 1, k, k)
    rows = torch.div(torch.arange(h) * k, h, rounding_mode="floor")  # piece row of every pixel row
    cols = torch.div(torch.arange(w) * k, w, rounding_mode="floor")
    return grid[:, :, rows][:, :, :, cols]


class AdapBlend(Attack):
    """Blended trigger, masked piecewise while poisoning, whole at test time, with cover samples."""

    name = "adapblend"
    Config = AdapBlendConfig

    def pattern(self, shape: tuple[int, int, int]) -> torch.Tensor:
        seed = self.cfg.seed if self.cfg.pattern_seed is None else self.cfg.pattern_seed
        return blend_pattern(shape, seed)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        a = self.cfg.adap_test_alpha
        return (1 - a) * x + a * self.pattern(tuple(x.shape[1:])).to(x.device, x.dtype)

    def partial(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The training-time trigger: pieces masked at random per image, blended at the training alpha."""
        cfg = self.cfg
        masks = piece_masks(len(x), cfg.adap_pieces, round(cfg.adap_mask_rate * cfg.adap_pieces), *x.shape[-2:], g)
        t = self.pattern(tuple(x.shape[1:])).to(x.device, x.dtype)
        return x + cfg.adap_train_alpha * masks.to(x.device, x.dtype) * (t - x)

    def poison_images(self, x, labels, g):
        return self.partial(x, g)

    def noise_samples(self, data, count, exclude, g):
        n_cover = round(count * self.cfg.adap_cover_ratio)
        return label_preserving(data, n_cover, exclude, g, lambda x: self.partial(x, g), "Adap-Blend cover")
