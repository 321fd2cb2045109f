"""CLP: channel Lipschitzness-based pruning (Zheng et al., ECCV 2022): data-free.

A backdoor makes a few channels very sensitive to their input. For each channel ``k`` of a
convolution followed by batch norm, the upper bound of its Lipschitz constant is the largest
singular value of ``W_k * |gamma_k / sigma_k|`` (the kernel reshaped to ``in x kh*kw``, scaled by the
BN that follows). Channels whose bound exceeds ``mean + u * std`` of their layer are pruned by
zeroing that BN's weight and bias. Convolutions are paired with the next batch norm in module
order (as BackdoorBench does), when their channel counts agree. No clean data is read.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ....core.config import check, option, to_dict
from ....core.defense import DefenseSpec, Needs
from ....core.errors import ModelError
from ....core.runs import Phases, RunDir, as_run_dir
from ..common import DefenseReport

log = logging.getLogger("unbackdoor")


@dataclass
class CLPConfig:
    """CLP settings (BackdoorBench CIFAR-10: u = 3)."""

    u: float = option(3.0, "prune channels whose Lipschitz bound exceeds mean + u x std of their layer (paper: 3)")

    def __post_init__(self) -> None:
        check(self.u == self.u and abs(self.u) != float("inf"), "u", self.u, "a finite number", type(self).__name__)


def channel_lipschitz(conv_weight: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per output channel: the largest singular value of its kernel scaled by ``|gamma / sigma|`` of ``bn``."""
    w = conv_weight.detach().float()
    scale = (bn.weight.detach().float() / (bn.running_var.detach().float() + bn.eps).sqrt()).abs()
    mats = w.reshape(w.shape[0], w.shape[1], -1) * scale.view(-1, 1, 1)
    return torch.linalg.matrix_norm(mats, ord=2)


def outlier_channels(bounds: torch.Tensor, u: float) -> list[int]:
    """Indices with ``bound > mean + u * std`` (std with Bessel's correction, as torch's default)."""
    return torch.nonzero(bounds > bounds.mean() + u * bounds.std()).flatten().tolist()


@torch.no_grad()
def run_clp(model: nn.Module, clean_data: Any = None, cfg: CLPConfig | None = None,
            run_dir: RunDir | str | None = None, *, num_classes: int | None = None, seed: int = 0,
            prepare: Any = None) -> tuple[nn.Module, DefenseReport]:
    """Prune a copy of ``model`` by channel Lipschitzness; ``clean_data`` is not used (CLP is data-free)."""
    cfg = cfg or CLPConfig()
    _check(model, cfg)
    phases = Phases(as_run_dir(run_dir))
    out = copy.deepcopy(model)
    pruned: dict[str, list[int]] = {}
    with phases("prune"):
        conv = None
        for name, m in out.named_modules():
            if isinstance(m, nn.Conv2d):
                conv = m
            elif isinstance(m, nn.BatchNorm2d) and conv is not None and conv.out_channels == m.num_features \
                    and m.track_running_stats and m.running_var is not None and m.affine:
                idx = outlier_channels(channel_lipschitz(conv.weight, m), cfg.u)
                if idx:
                    m.weight[idx] = 0.0
                    m.bias[idx] = 0.0
                    pruned[name] = idx
                conv = None
    n = sum(len(v) for v in pruned.values())
    log.info("CLP: pruned %d channels in %d batch-norm layers (u = %s)", n, len(pruned), cfg.u)
    return out, DefenseReport("clp", 0, phases.timings, {"pruned": pruned, "channels_pruned": n}, to_dict(cfg))


def _check(model: nn.Module, cfg: Any) -> None:
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise ModelError(f"CLP needs convolutions followed by batch norm; {type(model).__name__} has none",
                         where="clp", fix="use CLP on CNN classifiers (PreActResNet, VGG-BN ...)")


SPEC = DefenseSpec(
    name="clp", kind="classify", config=CLPConfig, run=run_clp, needs=Needs(trains=False, clean_data=False),
    summary="channel Lipschitzness-based pruning: data-free, no training (Zheng et al. 2022)",
    paper="Data-free Backdoor Removal based on Channel Lipschitzness (ECCV 2022)",
    check=_check,
)
