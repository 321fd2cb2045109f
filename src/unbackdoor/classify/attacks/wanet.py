"""WaNet (Nguyen & Tran 2021): an imperceptible fixed warp, with noise-mode samples."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...core.config import check_non_negative, check_positive, option
from .base import Attack, AttackConfig, label_preserving


@dataclass
class WaNetConfig(AttackConfig):
    """WaNet settings (BackdoorBench: k 4, s 0.5, cross ratio 2).

    BackdoorBench warps on the fly in each batch; here the same fractions of backdoor and
    noise-mode samples are drawn once from the seed (static poisoning: a slightly weaker attack
    with fewer distinct noise warps, documented in docs/ulrl.md).
    """

    name: str = option("wanet", "attack name")
    wanet_k: int = option(4, "side of the random control grid of the warp (4)")
    wanet_s: float = option(0.5, "warp strength (0.5)")
    wanet_grid_rescale: float = option(1.0, "rescaling of the warped grid (1)")
    wanet_cross_ratio: float = option(2.0, "noise-mode samples per backdoor sample, labels unchanged (2)")
    warp_seed: int | None = option(None, "seed of the warp field (None: use 'seed')")

    attack_name: ClassVar[str | None] = "wanet"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative(self, "wanet_cross_ratio")
        check_positive(self, "wanet_k", "wanet_s", "wanet_grid_rescale")


class WaNet(Attack):
    """Imperceptible warping (Nguyen & Tran 2021): a fixed smooth random displacement field.

    ``k x k`` random control points, normalised to mean magnitude 1, upsampled bicubically,
    scaled by ``s / H``; noise-mode samples add a fresh random field of magnitude ``1 / H``.
    """

    name = "wanet"
    Config = WaNetConfig

    def grid(self, h: int, w: int) -> torch.Tensor:
        """The backdoor sampling grid ``[1, H, W, 2]`` (``grid_sample`` convention, clamped to [-1, 1])."""
        cfg = self.cfg
        seed = cfg.seed if cfg.warp_seed is None else cfg.warp_seed
        g = torch.Generator().manual_seed(int(seed) + 4_242)
        ins = torch.rand(1, 2, cfg.wanet_k, cfg.wanet_k, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()
        noise_grid = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.linspace(-1, 1, h), torch.linspace(-1, 1, w)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        identity = torch.stack((gx, gy), 2)[None]
        return ((identity + cfg.wanet_s * noise_grid / h) * cfg.wanet_grid_rescale).clamp(-1, 1)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        grid = self.grid(*x.shape[-2:]).to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, align_corners=True).clamp(0, 1)

    def apply_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise mode: the backdoor warp plus a random per-image field, so the model must learn the exact warp."""
        n, _, h, w = x.shape
        grid = self.grid(h, w).expand(n, -1, -1, -1)
        grid = (grid + (torch.rand(n, h, w, 2, generator=generator) * 2 - 1) / h).clamp(-1, 1)
        return F.grid_sample(x, grid.to(x.device, x.dtype), align_corners=True).clamp(0, 1)

    def noise_samples(self, data, count, exclude, g):
        n_cross = round(count * self.cfg.wanet_cross_ratio)
        return label_preserving(data, n_cross, exclude, g, lambda x: self.apply_noise(x, g), "WaNet noise-mode")
