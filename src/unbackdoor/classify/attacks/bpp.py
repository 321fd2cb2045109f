"""BPP (Wang et al. 2022): colour-depth squeezing with dithering, with negative samples."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...core.config import check, check_non_negative, option
from ..data import to_float
from .base import Attack, AttackConfig, label_preserving


@dataclass
class BPPConfig(AttackConfig):
    """BPP settings (BackdoorBench: 8 levels, dithering, negative ratio 0.1; poisoned statically here)."""

    name: str = option("bpp", "attack name")
    bpp_squeeze: int = option(8, "colour levels per channel after squeezing (8)")
    bpp_dither: bool = option(True, "Floyd-Steinberg error diffusion when squeezing")
    bpp_neg_ratio: float = option(0.1, "negative samples (clean + another image's squeeze residual, labels "
                                       "unchanged) per backdoor sample (0.1)")

    attack_name: ClassVar[str | None] = "bpp"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative(self, "bpp_neg_ratio")
        check(self.bpp_squeeze >= 2, "bpp_squeeze", self.bpp_squeeze, ">= 2", type(self).__name__)


def floyd_steinberg_quantize(x: torch.Tensor, levels: int, dither: bool = True) -> torch.Tensor:
    """Squeeze ``x`` (float ``[N, C, H, W]`` in ``[0, 1]``) to ``levels`` values per channel.

    With ``dither``, the rounding error of each pixel is diffused to its right and lower
    neighbours with the Floyd-Steinberg weights 7/16, 3/16, 5/16, 1/16 (as BPP's
    ``floydDitherspeed``); vectorised over images and channels, sequential over pixels.
    """
    q = levels - 1
    if not dither:
        return torch.round(x * q) / q
    img = x.clone().to(torch.float64)
    n, c, h, w = img.shape
    for yy in range(h):
        for xx in range(w):
            old = img[:, :, yy, xx]
            new = torch.round(old * q).clamp(0, q) / q
            err = old - new
            img[:, :, yy, xx] = new
            if xx + 1 < w:
                img[:, :, yy, xx + 1] += err * (7 / 16)
            if yy + 1 < h:
                if xx > 0:
                    img[:, :, yy + 1, xx - 1] += err * (3 / 16)
                img[:, :, yy + 1, xx] += err * (5 / 16)
                if xx + 1 < w:
                    img[:, :, yy + 1, xx + 1] += err * (1 / 16)
    return img.to(x.dtype)


class BPP(Attack):
    """Image quantisation (Wang et al. 2022): squeeze colour depth to ``bpp_squeeze`` levels, with dithering.

    Negative samples: a clean image plus the squeeze residual of another random image, label kept.
    """

    name = "bpp"
    Config = BPPConfig

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return floyd_steinberg_quantize(x, self.cfg.bpp_squeeze, self.cfg.bpp_dither)

    def noise_samples(self, data, count, exclude, g):
        n_neg = round(count * self.cfg.bpp_neg_ratio)

        def negative(x: torch.Tensor) -> torch.Tensor:
            donors = to_float(data.images[torch.randint(0, len(data), (len(x),), generator=g)])
            return (x + self.apply(donors) - donors).clamp(0, 1)
        return label_preserving(data, n_neg, exclude, g, negative, "BPP negative")
