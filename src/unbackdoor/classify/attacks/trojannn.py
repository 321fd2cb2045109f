"""TrojanNN (Liu et al., NDSS 2018): a trigger optimised to excite chosen neurons of a pre-trained model.

The attacker has a pre-trained clean model (here a surrogate trained on the clean training set,
``surrogate.py``, recorded). It picks the ``trojan_neurons`` internal neurons most strongly connected
to the output (the largest columns of the head weight, i.e. units of the features entering the
head: BackdoorBench's ``selected_layer_param_name: linear.weight``) and optimises the pixels of a
fixed trigger region (a ``trojan_size`` square in the bottom-right corner: BackdoorBench pastes an
apple-shaped mask) so that those neurons reach ``trojan_target_value`` (100) on the mean training
image (MSE, ``trojan_iterations`` = 1000 Adam steps). Poisoning pastes the pattern into its region
and relabels, like BadNets; the pattern is kept in the config's ``state``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...core.config import check_positive, option
from ...core.errors import ConfigError
from ..data import ImageData, to_float
from ..models import find_head
from .base import Attack, FittedAttackConfig


@dataclass
class TrojanNNConfig(FittedAttackConfig):
    """TrojanNN settings (BackdoorBench: 2 neurons, target value 100, 1000 mask-update iterations)."""

    name: str = option("trojannn", "attack name")
    trojan_neurons: int = option(2, "neurons of the features entering the head to excite (num_neuron: 2)")
    trojan_target_value: float = option(100.0, "activation the chosen neurons are driven to (neuron_target_values: 100)")
    trojan_iterations: int = option(1000, "Adam steps on the trigger pixels (mask_update_iters: 1000)")
    trojan_lr: float = option(0.1, "Adam learning rate of the trigger pixels")
    trojan_size: int = option(8, "side of the square trigger region, bottom-right corner, in pixels")
    surrogate_epochs: int = option(10, "epochs of the clean pre-trained model the trigger is optimised on")

    attack_name: ClassVar[str | None] = "trojannn"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "trojan_neurons", "trojan_iterations", "trojan_lr", "trojan_size", "surrogate_epochs")


def region_mask(shape: tuple[int, int, int], size: int) -> torch.Tensor:
    """``[1, H, W]`` with ones in the bottom-right ``size x size`` square."""
    _, h, w = shape
    if size > min(h, w):
        raise ConfigError(f"a {size}px trigger region does not fit a {h}x{w} image", where="TrojanNNConfig.trojan_size",
                          fix="use a smaller trojan_size")
    m = torch.zeros(1, h, w)
    m[:, h - size:, w - size:] = 1.0
    return m


def head_features(model: torch.nn.Module, head: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The features entering ``head`` (the layer whose neurons TrojanNN excites), differentiably."""
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        model(x)
    finally:
        hook.remove()
    return seen[0]


class TrojanNN(Attack):
    """Pastes the fitted neuron-exciting pattern into its region and relabels (all-to-one)."""

    name = "trojannn"
    Config = TrojanNNConfig
    fitted = True
    stateful = True

    def fit(self, data: ImageData) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from .surrogate import train_surrogate

        cfg = self.cfg
        model, info = train_surrogate(data, epochs=cfg.surrogate_epochs, seed=cfg.seed)
        _, head = find_head(model, data.num_classes)
        neurons = head.weight.detach().abs().sum(0).argsort(descending=True)[:cfg.trojan_neurons]
        mask = region_mask(tuple(data.images.shape[1:]), cfg.trojan_size)
        base = to_float(data.images).mean(0, keepdim=True)
        g = torch.Generator().manual_seed(int(cfg.seed) + 53)
        logit = torch.randn(base.shape, generator=g).requires_grad_(True)  # pattern = sigmoid(logit) in (0, 1)
        opt = torch.optim.Adam([logit], lr=cfg.trojan_lr)
        for _ in range(cfg.trojan_iterations):
            x = base * (1 - mask) + torch.sigmoid(logit) * mask
            act = head_features(model, head, x)[0, neurons]
            loss = ((act - cfg.trojan_target_value) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        pattern = (torch.sigmoid(logit.detach()) * mask)[0]
        with torch.no_grad():
            before = head_features(model, head, base)[0, neurons]
            after = head_features(model, head, base * (1 - mask) + pattern * mask)[0, neurons]
        return {"pattern": pattern, "mask": mask}, {
            "surrogate": info, "neurons": neurons.tolist(), "activation_before": [round(float(v), 3) for v in before],
            "activation_after": [round(float(v), 3) for v in after], "final_loss": round(float(loss.detach()), 4)}

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        st = self.state()
        mask, pattern = st["mask"].to(x.device, x.dtype), st["pattern"].to(x.device, x.dtype)
        return x * (1 - mask) + pattern * mask
