"""LF (Zeng et al., ICCV 2021): a low-frequency universal trigger, the "smooth" adversarial perturbation.

The attacker trains a clean surrogate on the training set (``surrogate.py``) and searches one
additive perturbation ``v`` (the same for every image) that pushes the surrogate towards the target
class, smoothing ``v`` with a Gaussian low-pass filter after every step so that it has no
high-frequency content (the authors' ``gauss_smooth`` filter; their search is a targeted universal
DeepFool, here signed-gradient steps on the targeted cross-entropy over batches of training images)
and keeping it in an L-inf ball of ``lf_eps``. The search stops once ``lf_fool_rate`` of a batch of
non-target images is classified as the target (the authors stop at 20% with ``delta = 0.8``).
Poisoning adds ``v`` to the chosen images (clipped to [0, 1]) and relabels them, like BadNets.
The fitted ``v`` is kept in the config's ``state``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ...core.config import check_fraction, check_positive, option
from ..data import ImageData, to_float
from .base import Attack, FittedAttackConfig


@dataclass
class LFConfig(FittedAttackConfig):
    """LF settings (a smooth targeted universal perturbation fitted on a clean surrogate)."""

    name: str = option("lf", "attack name")
    lf_eps: float = option(0.1, "L-inf bound of the trigger, pixel scale (0.1)")
    lf_sigma: float = option(2.0, "standard deviation, in pixels, of the Gaussian low-pass filter applied after each step")
    lf_step: float = option(0.01, "signed-gradient step of the search (0.01)")
    lf_iterations: int = option(300, "at most this many search steps, one batch of 64 training images each")
    lf_fool_rate: float = option(0.2, "stop once this fraction of a batch of non-target images goes to the target "
                                      "(authors: 0.2, i.e. delta 0.8)")
    surrogate_epochs: int = option(10, "epochs of the clean surrogate the trigger is fitted on")

    attack_name: ClassVar[str | None] = "lf"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "lf_eps", "lf_sigma", "lf_step", "lf_iterations", "surrogate_epochs")
        check_fraction(self, "lf_fool_rate")


def gaussian_lowpass(v: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``v [N, C, H, W]`` (reflect padding): what makes the trigger low-frequency."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=v.dtype, device=v.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = v.shape[1]
    out = F.conv2d(F.pad(v, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def low_frequency_energy(v: torch.Tensor, fraction: float = 0.25) -> float:
    """Share of ``v``'s spectral energy at spatial frequencies below ``fraction`` of the Nyquist band."""
    spec = torch.fft.fft2(v.double()).abs() ** 2
    h, w = v.shape[-2:]
    fy = torch.fft.fftfreq(h, dtype=torch.float64).abs().view(-1, 1)
    fx = torch.fft.fftfreq(w, dtype=torch.float64).abs().view(1, -1)
    low = (torch.maximum(fy, fx) <= 0.5 * fraction).expand(h, w)
    return float(spec[..., low].sum() / spec.sum().clamp(min=1e-30))


class LF(Attack):
    """Adds the fitted low-frequency universal perturbation and relabels (all-to-one)."""

    name = "lf"
    Config = LFConfig
    fitted = True
    stateful = True

    def fit(self, data: ImageData) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from .surrogate import train_surrogate

        cfg = self.cfg
        model, info = train_surrogate(data, epochs=cfg.surrogate_epochs, seed=cfg.seed)
        g = torch.Generator().manual_seed(int(cfg.seed) + 31)
        pool = (data.labels != cfg.target).nonzero().flatten()
        v = torch.zeros(1, *data.images.shape[1:])
        rate, it = 0.0, 0
        for it in range(1, cfg.lf_iterations + 1):
            x = to_float(data.images[pool[torch.randint(0, len(pool), (64,), generator=g)]])
            v.requires_grad_(True)
            logits = model((x + v).clamp(0, 1))
            loss = F.cross_entropy(logits, torch.full((len(x),), cfg.target, dtype=torch.long))
            (grad,) = torch.autograd.grad(loss, [v])
            with torch.no_grad():
                v = gaussian_lowpass(v - cfg.lf_step * grad.sign(), cfg.lf_sigma).clamp(-cfg.lf_eps, cfg.lf_eps)
                rate = float((model((x + v).clamp(0, 1)).argmax(1) == cfg.target).float().mean())
            if rate >= cfg.lf_fool_rate:
                break
        v = v.detach()[0]
        return {"pattern": v}, {"surrogate": info, "search_steps": it, "surrogate_fool_rate": round(rate, 4),
                                "linf": round(float(v.abs().max()), 4),
                                "low_frequency_energy": round(low_frequency_energy(v), 4)}

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return (x + self.state()["pattern"].to(x.device, x.dtype)).clamp(0, 1)
