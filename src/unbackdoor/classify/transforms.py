"""Batch transforms in plain torch: random crop with padding, horizontal flip, normalisation.

Conventions
-----------
* A transform maps a float batch ``[N, C, H, W]`` (values in ``[0, 1]`` before normalisation)
  to a float batch of the same shape, on the batch's device, in one vectorised call (no
  per-image Python loop).
* Randomness comes only from the ``torch.Generator`` passed in (a CPU generator; random numbers
  are drawn on the CPU and moved to the batch's device), so the same seed gives the same
  augmented batch on any device and a resumed run sees the same augmentations.
* Triggers are applied to ``[0, 1]`` images *before* augmentation and normalisation, as in
  BackdoorBench.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError

__all__ = [
    "BatchTransform", "RandomCrop", "RandomHorizontalFlip", "Normalize", "Compose", "standard_augmentation",
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "GTSRB_MEAN", "GTSRB_STD",
    "TINY_WORLD_MEAN", "TINY_WORLD_STD", "NORMALIZATION",
]

# BackdoorBench's statistics (CIFAR-10 std as in its code, not the per-pixel 0.2023/0.1994/0.2010).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
GTSRB_MEAN = (0.0, 0.0, 0.0)  # BackdoorBench does not normalise GTSRB
GTSRB_STD = (1.0, 1.0, 1.0)
# measured on make_tiny_world(seed, n_train=10000) for seeds 0 and 1: mean 0.50, std 0.29 in every channel
TINY_WORLD_MEAN = (0.5, 0.5, 0.5)
TINY_WORLD_STD = (0.29, 0.29, 0.29)
FASHION_MNIST_MEAN = (0.2860,)  # measured on the 60k training images
FASHION_MNIST_STD = (0.3530,)

NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "gtsrb": (GTSRB_MEAN, GTSRB_STD),
    "tinyworld": (TINY_WORLD_MEAN, TINY_WORLD_STD),
    "fashion-mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD),
}


class BatchTransform(Protocol):
    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...


def _check_batch(x: torch.Tensor, who: str) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise ConfigError(f"{who} expects a float batch [N, C, H, W], got {tuple(x.shape)} {x.dtype}",
                          where=who, fix="convert images with x.float() / 255 and keep the batch dimension")


class RandomCrop:
    """Zero-pad by ``padding`` on each side, then crop back to the original size at a random offset per image."""

    def __init__(self, padding: int = 4):
        if padding < 0:
            raise ConfigError(f"RandomCrop padding = {padding} must be >= 0", where="RandomCrop", fix="use e.g. 4")
        self.padding = int(padding)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x, "RandomCrop")
        p = self.padding
        if p == 0:
            return x
        n, c, h, w = x.shape
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [N,1,H,1]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [N,1,1,W]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[batch, chans, rows, cols]

    def __repr__(self) -> str:
        return f"RandomCrop(padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror each image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        if not 0 <= p <= 1:
            raise ConfigError(f"RandomHorizontalFlip p = {p} must be in [0, 1]", where="RandomHorizontalFlip",
                              fix="use e.g. 0.5")
        self.p = float(p)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x, "RandomHorizontalFlip")
        flip = (torch.rand(x.shape[0], generator=generator) < self.p).to(x.device)
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize:
    """``(x - mean) / std`` per channel (for user models that expect normalised inputs)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std) or any(float(s) <= 0 for s in std):
            raise ConfigError(f"Normalize needs one mean and one positive std per channel, got mean={tuple(mean)}, "
                              f"std={tuple(std)}", where="Normalize", fix="e.g. CIFAR10_MEAN, CIFAR10_STD")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x, "Normalize")
        if x.shape[1] != self.mean.shape[1]:
            raise ConfigError(f"Normalize has {self.mean.shape[1]} channels of statistics but the batch has "
                              f"{x.shape[1]} channels", where="Normalize", fix="give one mean/std per image channel")
        return (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class Compose:
    """Apply transforms in order, sharing one generator (so the whole pipeline is seeded once)."""

    def __init__(self, transforms: Sequence[BatchTransform | None]):
        self.transforms = [t for t in transforms if t is not None]

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


def standard_augmentation(padding: int = 4, flip: bool = True) -> Compose:
    """BackdoorBench's CIFAR training augmentation: random crop (padding 4) and horizontal flip."""
    return Compose([RandomCrop(padding), RandomHorizontalFlip(0.5) if flip else None])
