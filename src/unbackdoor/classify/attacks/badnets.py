"""BadNets (Gu et al. 2017): a small square patch in the bottom-right corner."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...core.config import check_fraction, check_non_negative, check_positive, option
from ...core.errors import ConfigError
from .base import Attack, AttackConfig


@dataclass
class BadNetsConfig(AttackConfig):
    """BadNets settings (BackdoorBench: a 3x3 white patch, bottom-right)."""

    name: str = option("badnets", "attack name")
    patch_size: int = option(3, "side of the square patch in pixels (3)")
    patch_value: float = option(1.0, "patch intensity in [0, 1] (1 = white)")
    patch_margin: int = option(0, "distance of the patch from the bottom-right corner, in pixels")

    attack_name: ClassVar[str | None] = "badnets"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction(self, "patch_value")
        check_non_negative(self, "patch_margin")
        check_positive(self, "patch_size")


class BadNets(Attack):
    """A ``patch_size`` square of intensity ``patch_value`` in the bottom-right corner (Gu et al. 2017)."""

    name = "badnets"
    Config = BadNetsConfig

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        p, m = self.cfg.patch_size, self.cfg.patch_margin
        h, w = x.shape[-2:]
        if p + m > min(h, w):
            raise ConfigError(f"a {p}px patch with margin {m} does not fit a {h}x{w} image", where="BadNetsConfig.patch_size",
                              fix="use a smaller patch or margin")
        out = x.clone()
        out[..., h - m - p:h - m, w - m - p:w - m] = self.cfg.patch_value
        return out
