"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): a trained generator makes each image's own trigger.

A mask generator ``M`` and a pattern generator ``G`` (small convolutional nets) map an image ``x``
to its trigger: ``x' = x + M(x) (G(x) - x)``. As in the paper, ``M`` is first trained alone to make
sparse (mean density ``ia_mask_density``, weight ``ia_lambda_norm``) and diverse masks; then ``G`` is
trained jointly with a classifier on the training set: per batch a ``rate`` share of backdoor
images (own trigger, target label), ``ia_cross_ratio`` times as many cross images (the trigger of
ANOTHER image, true label: a trigger must not transfer) and the rest clean, plus the diversity
loss ``|x1 - x2| / |G(x1) - G(x2)|`` (weight ``ia_lambda_div``). Defaults are BackdoorBench's
(lr 0.01, lambda_div 1, lambda_norm 100, mask density 0.032).

One documented departure: the paper poisons on the fly while it trains the victim jointly with
``G``; here the generators are fitted first (``ia_mask_epochs`` + ``ia_epochs``, a CPU budget, with
their own classifier) and the victim is trained on a statically poisoned set (backdoor and cross
samples drawn once), like WaNet and BPP here. The generators' weights are kept in ``state``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import check_fraction, check_non_negative, check_positive, option
from ...core.progress import progress
from ..data import ImageData, to_float
from ..models import build_model
from .base import Attack, FittedAttackConfig, label_preserving


@dataclass
class InputAwareConfig(FittedAttackConfig):
    """Input-aware settings (BackdoorBench's losses and rates; a CPU budget of generator epochs)."""

    name: str = option("inputaware", "attack name")
    ia_cross_ratio: float = option(1.0, "cross samples (another image's trigger, label kept) per backdoor sample (1: "
                                        "p_cross = p_attack)")
    ia_mask_density: float = option(0.032, "target mean of the masks (mask_density: 0.032)")
    ia_lambda_norm: float = option(100.0, "weight of the mask-density penalty (lambda_norm: 100)")
    ia_lambda_div: float = option(1.0, "weight of the diversity loss (lambda_div: 1)")
    ia_lr: float = option(0.01, "learning rate of generators (Adam) and classifier (SGD) (lr_G, lr_M, lr_C: 0.01)")
    ia_mask_epochs: int = option(5, "epochs training the mask generator alone (BackdoorBench: 25; CPU budget)")
    ia_epochs: int = option(10, "epochs training the pattern generator with its classifier (CPU budget)")
    ia_width: int = option(16, "channels of the generators' hidden layers")

    attack_name: ClassVar[str | None] = "inputaware"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative(self, "ia_cross_ratio", "ia_lambda_norm", "ia_lambda_div")
        check_positive(self, "ia_lr", "ia_mask_epochs", "ia_epochs", "ia_width")
        check_fraction(self, "ia_mask_density")


class Generator(nn.Module):
    """A small image-to-image net: ``out`` channels in (0, 1) at the input's resolution."""

    def __init__(self, channels: int, out: int, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, out, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x * 2 - 1))


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``mean(|x1 - x2| / |t1 - t2|)`` per pair (L2 over pixels): small when different inputs get different triggers."""
    dx = (x1 - x2).flatten(1).norm(dim=1)
    dt = (t1 - t2).flatten(1).norm(dim=1)
    return (dx / (dt + eps)).mean()


def triggered(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``x + mask (pattern - x)``."""
    return x + mask * (pattern - x)


class InputAware(Attack):
    """Each image gets its own generated trigger; cross samples carry another image's trigger with their label."""

    name = "inputaware"
    Config = InputAwareConfig
    fitted = True
    stateful = True

    def _nets(self, channels: int) -> tuple[Generator, Generator]:
        return Generator(channels, channels, self.cfg.ia_width), Generator(channels, 1, self.cfg.ia_width)

    def fit(self, data: ImageData) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        c = data.images.shape[1]
        gen_pattern, gen_mask = self._nets(c)
        x_all, y_all = to_float(data.images), data.labels
        g = torch.Generator().manual_seed(int(cfg.seed) + 71)
        bs = 128

        def batches():
            perm = torch.randperm(len(x_all), generator=g)
            for i in range(0, len(perm) - 1, bs):
                idx = perm[i:i + bs]
                yield x_all[idx], y_all[idx], x_all[perm[torch.randint(0, len(perm), (len(idx),), generator=g)]]

        def density(m: torch.Tensor) -> torch.Tensor:
            return cfg.ia_lambda_norm * F.relu(m.mean() - cfg.ia_mask_density)

        opt_m = torch.optim.Adam(gen_mask.parameters(), lr=cfg.ia_lr, betas=(0.5, 0.9))
        for _ in progress(range(cfg.ia_mask_epochs), desc="input-aware masks"):
            for x, _y, x2 in batches():
                m1, m2 = gen_mask(x), gen_mask(x2)
                loss = cfg.ia_lambda_div * diversity_loss(x, x2, m1, m2) + density(m1)
                opt_m.zero_grad(set_to_none=True)
                loss.backward()
                opt_m.step()
        for p in gen_mask.parameters():
            p.requires_grad_(False)
        classifier = build_model("preact_resnet_tiny", data.num_classes, width=8, in_channels=c,
                                 mean=x_all.mean(dim=(0, 2, 3)).tolist(),
                                 std=x_all.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist())
        opt_c = torch.optim.SGD(classifier.parameters(), lr=cfg.ia_lr, momentum=0.9, weight_decay=5e-4)
        opt_g = torch.optim.Adam(gen_pattern.parameters(), lr=cfg.ia_lr, betas=(0.5, 0.9))
        log = []
        for _ in progress(range(cfg.ia_epochs), desc="input-aware generator"):
            correct = bd_hits = n_bd_seen = seen = 0
            for x, y, x2 in batches():
                n = len(x)
                n_bd = max(1, round(cfg.rate * n))
                n_cross = min(n - n_bd, round(cfg.ia_cross_ratio * n_bd))
                p1, p2 = gen_pattern(x), gen_pattern(x2)
                m1, m2 = gen_mask(x), gen_mask(x2)
                x_bd = triggered(x[:n_bd], m1[:n_bd], p1[:n_bd])
                x_cross = triggered(x[n_bd:n_bd + n_cross], m2[n_bd:n_bd + n_cross], p2[n_bd:n_bd + n_cross])
                inputs = torch.cat([x_bd, x_cross, x[n_bd + n_cross:]])
                targets = torch.cat([torch.full((n_bd,), cfg.target, dtype=torch.long), y[n_bd:]])
                logits = classifier(inputs)
                loss = F.cross_entropy(logits, targets) + cfg.ia_lambda_div * diversity_loss(x, x2, p1, p2)
                opt_c.zero_grad(set_to_none=True)
                opt_g.zero_grad(set_to_none=True)
                loss.backward()
                opt_c.step()
                opt_g.step()
                pred = logits.detach().argmax(1)
                correct += int((pred[n_bd:] == targets[n_bd:]).sum())
                bd_hits += int((pred[:n_bd] == cfg.target).sum())
                n_bd_seen += n_bd
                seen += n - n_bd
            log.append({"clean_and_cross_acc": round(correct / seen, 4), "backdoor_hit_rate": round(bd_hits / n_bd_seen, 4)})
        state = {f"pattern.{k}": v for k, v in gen_pattern.state_dict().items()}
        state.update({f"mask.{k}": v for k, v in gen_mask.state_dict().items()})
        with torch.no_grad():
            mean_mask = float(gen_mask(x_all[:256]).mean())
        return state, {"generator_log": log, "mean_mask": round(mean_mask, 4),
                       "classifier": "preact_resnet_tiny width 8, trained with the pattern generator (discarded)"}

    def generators(self, channels: int) -> tuple[Generator, Generator]:
        """``(G, M)`` rebuilt from the fitted state (eval mode)."""
        cached = getattr(self, "_generators", None)
        if cached is not None:
            return cached
        st = self.state()
        gen_pattern, gen_mask = self._nets(channels)
        gen_pattern.load_state_dict({k[len("pattern."):]: v for k, v in st.items() if k.startswith("pattern.")})
        gen_mask.load_state_dict({k[len("mask."):]: v for k, v in st.items() if k.startswith("mask.")})
        self._generators = (gen_pattern.eval(), gen_mask.eval())
        return self._generators

    @torch.no_grad()
    def trigger_of(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` with the trigger generated from ``source`` (default: from ``x`` itself)."""
        gen_pattern, gen_mask = self.generators(x.shape[1])
        src = (x if source is None else source).to(torch.float32).cpu()
        out = triggered(x.cpu().float(), gen_mask(src), gen_pattern(src))
        return out.to(x.device, x.dtype)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.trigger_of(x).clamp(0, 1)

    def noise_samples(self, data, count, exclude, g):
        n_cross = round(count * self.cfg.ia_cross_ratio)

        def cross(x: torch.Tensor) -> torch.Tensor:
            donors = to_float(data.images[torch.randint(0, len(data), (len(x),), generator=g)])
            return self.trigger_of(x, donors).clamp(0, 1)
        return label_preserving(data, n_cross, exclude, g, cross, "input-aware cross")
