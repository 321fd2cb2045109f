"""SIG (Barni et al. 2019): a clean-label sinusoidal signal added to target-class images."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...core.config import check_non_negative, check_positive, option
from .base import Attack, AttackConfig


@dataclass
class SIGConfig(AttackConfig):
    """SIG settings (BackdoorBench: delta 40, f 6)."""

    name: str = option("sig", "attack name")
    sig_delta: float = option(40.0, "amplitude of the sinusoid on the 0-255 scale (40)")
    sig_f: float = option(6.0, "number of periods across the image width (6)")

    attack_name: ClassVar[str | None] = "sig"
    clean_label: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative(self, "sig_delta")
        check_positive(self, "sig_f")


class SIG(Attack):
    """Clean-label sinusoidal signal: ``x + delta/255 * sin(2 pi j f / W)`` per column ``j`` (Barni et al. 2019)."""

    name = "sig"
    Config = SIGConfig

    def signal(self, w: int) -> torch.Tensor:
        j = torch.arange(w, dtype=torch.float64)
        return (self.cfg.sig_delta / 255.0 * torch.sin(2 * math.pi * j * self.cfg.sig_f / w)).float()

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return (x + self.signal(x.shape[-1]).to(x.device, x.dtype)).clamp(0, 1)
