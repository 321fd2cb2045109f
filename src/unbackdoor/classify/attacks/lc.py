"""LC (Turner et al., 2019): label-consistent poisoning, adversarially perturbed target images plus corner patterns.

Clean-label: only target-class images are poisoned and every label is kept. Each chosen image is
first made hard to classify by PGD on a clean surrogate (L-inf ``lc_eps`` = 8/255, maximising the
surrogate's loss on its true label), so the model must rely on the trigger to get it right; then a
3x3 black-and-white checkerboard is stamped in each of the four corners (BackdoorBench's
``fourCornerTrigger``, full amplitude: ``reduced_amplitude`` 1). At test time the trigger is the
four corner patterns alone. The surrogate is trained on the clean training set (``surrogate.py``)
and recorded; nothing fitted is needed at test time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ...core.config import check_fraction, check_non_negative, check_positive, option
from ..data import ImageData
from .base import Attack, AttackConfig


@dataclass
class LCConfig(AttackConfig):
    """LC settings (PGD eps 8/255 on a clean surrogate; four-corner 3x3 checkerboards at full amplitude)."""

    name: str = option("lc", "attack name")
    lc_eps: float = option(8 / 255, "L-inf bound of the adversarial perturbation of poisoned images (8/255)")
    lc_steps: int = option(10, "PGD steps (10)")
    lc_step_size: float = option(2 / 255, "PGD step (2/255)")
    lc_amplitude: float = option(1.0, "contrast of the corner checkerboards: 1 = black and white (reduced_amplitude: 1)")
    lc_patch: int = option(3, "side of each corner checkerboard in pixels (3)")
    surrogate_epochs: int = option(10, "epochs of the clean surrogate the perturbations are computed on")

    attack_name: ClassVar[str | None] = "lc"
    clean_label: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative(self, "lc_eps", "lc_step_size")
        check_positive(self, "lc_steps", "lc_patch", "surrogate_epochs")
        check_fraction(self, "lc_amplitude")


def checkerboard(size: int) -> torch.Tensor:
    """A ``size x size`` 0/1 checkerboard whose bottom-right cell is 1."""
    i = torch.arange(size)
    return ((i.view(-1, 1) + i.view(1, -1) + 2 * size - 1) % 2).float()


def four_corners(x: torch.Tensor, size: int, amplitude: float) -> torch.Tensor:
    """``x`` with a checkerboard stamped in each corner (mirrored so each corner's outer cell is white)."""
    out = x.clone()
    board = 0.5 + amplitude * (checkerboard(size).to(x) - 0.5)
    h, w = x.shape[-2:]
    out[..., h - size:, w - size:] = board
    out[..., h - size:, :size] = board.flip(-1)
    out[..., :size, w - size:] = board.flip(-2)
    out[..., :size, :size] = board.flip(-1).flip(-2)
    return out


def pgd_away_from_label(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float,
                        steps: int, batch: int = 128) -> torch.Tensor:
    """L-inf PGD maximising ``CE(model(x'), y)`` from ``x`` (untargeted), images kept in [0, 1]."""
    out = []
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        adv = xb.clone()
        for _ in range(steps):
            adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(adv), yb), [adv])
            with torch.no_grad():
                adv = torch.min(torch.max(adv + step * grad.sign(), xb - eps), xb + eps).clamp(0, 1)
        out.append(adv.detach())
    return torch.cat(out) if out else x.clone()


class LC(Attack):
    """Label-consistent: PGD-hardened target-class images with four corner checkerboards, labels kept."""

    name = "lc"
    Config = LCConfig
    fitted = True

    def fit(self, data: ImageData) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from .surrogate import train_surrogate

        self._surrogate, info = train_surrogate(data, epochs=self.cfg.surrogate_epochs, seed=self.cfg.seed)
        return {}, {"surrogate": info}

    def poison_images(self, x, labels, g):
        cfg = self.cfg
        hard = pgd_away_from_label(self._surrogate, x, labels, cfg.lc_eps, cfg.lc_step_size, cfg.lc_steps)
        return four_corners(hard, cfg.lc_patch, cfg.lc_amplitude)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return four_corners(x, self.cfg.lc_patch, self.cfg.lc_amplitude)
