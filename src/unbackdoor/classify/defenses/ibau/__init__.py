"""I-BAU: implicit backdoor adversarial unlearning (Zeng et al., ICLR 2022).

A minimax problem: the inner player finds one universal perturbation ``delta`` (the same for every
image) that changes the model's predictions most; the outer player trains the model to classify
clean images patched with ``delta`` correctly. The outer gradient accounts for how ``delta*``
moves with the weights (the implicit hypergradient), computed by the fixed-point method: with the
inner solver written as the map ``Phi(delta, theta) = delta - eta grad_delta L_in(delta, theta)``,

    dL_out/dtheta = grad_theta L_out + (dPhi/dtheta)^T v,   v = (dPhi/ddelta)^T v + grad_delta L_out,

``v`` found by ``K`` fixed-point iterations (:func:`fixed_point_hypergradient`). Per round, as
released: ``delta`` is fitted by one pass of SGD (lr 10) maximising the cross-entropy against the
model's own predictions with an ``0.001 ||delta||^2`` penalty; then each clean batch gives one Adam
step on its outer loss (CE with ``delta`` added to 1% of the batch) with the hypergradient whose
inner loss is taken on the first batch. The model stays in eval mode (batch-norm statistics frozen).
Defaults are the authors' (Adam lr 1e-3, batch 100, 5 rounds, K 5; pixels in [0, 1] as here);
BackdoorBench uses lr 1e-4 and batch 256 on normalised inputs (preset ``backdoorbench``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ....core.config import check, check_fraction, check_non_negative, check_positive, option, to_dict
from ....core.defense import DefenseSpec, Needs
from ....core.progress import progress
from ....core.runs import Phases, RunDir, as_run_dir
from ....core.seeds import generator
from ...batching import Prepare, model_device
from ...models import forward_logits
from ..common import DefenseReport, checked_labels, image_batches, image_tensor, trainable_copy

log = logging.getLogger("unbackdoor")


@dataclass
class IBAUConfig:
    """I-BAU settings (the authors' release; BackdoorBench differs in lr and batch: preset ``backdoorbench``)."""

    rounds: int = option(5, "unlearning rounds: fit delta, then one outer step per batch (n_rounds: 5)")
    K: int = option(5, "fixed-point iterations of the implicit hypergradient (K: 5)")
    lr: float = option(0.001, "learning rate of the outer optimiser (authors: 0.001; BackdoorBench: 1e-4)")
    optimizer: Literal["adam", "sgd"] = option("adam", "outer optimiser (authors: Adam)")
    batch_size: int = option(100, "clean images per batch (authors: 100; BackdoorBench: 256)")
    inner_lr: float = option(0.1, "step of the gradient-descent map Phi that defines delta* (0.1)")
    delta_lr: float = option(10.0, "SGD learning rate that fits delta each round (10)")
    delta_reg: float = option(0.001, "weight of ||delta||^2 in the inner loss (0.001)")
    portion: float = option(0.01, "fraction of each batch patched with delta in the outer loss (0.01; at least 1 image)")
    tol: float = option(1e-10, "stop the fixed-point iteration once successive v differ by less than this")
    min_clean_per_class: int = option(5, "refuse clean subsets smaller than this many samples per class")

    def __post_init__(self) -> None:
        check_positive(self, "rounds", "K", "lr", "batch_size", "inner_lr", "delta_lr")
        check_non_negative(self, "delta_reg", "tol", "min_clean_per_class")
        check_fraction(self, "portion")
        check(self.optimizer in ("adam", "sgd"), "optimizer", self.optimizer, "'adam' or 'sgd'", type(self).__name__)


# ---- the implicit hypergradient (pure: works for any inner / outer problem) ---------------------------

def _grads_or_zeros(out: torch.Tensor, wrt: Sequence[torch.Tensor], **kw: Any) -> list[torch.Tensor]:
    grads = torch.autograd.grad(out, list(wrt), allow_unused=True, **kw)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]


def fixed_point_hypergradient(inner: Sequence[torch.Tensor], outer: Sequence[torch.Tensor], K: int,
                              fp_map: Callable[[list[torch.Tensor], Sequence[torch.Tensor]], list[torch.Tensor]],
                              outer_loss: Callable[[list[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor],
                              tol: float = 1e-10) -> list[torch.Tensor]:
    """``d outer_loss(w*(theta), theta) / d theta`` at ``w = inner`` (assumed a fixed point of ``fp_map``).

    ``inner``: the inner variables ``w``; ``outer``: the outer variables ``theta`` (require grad).
    ``fp_map(w, theta)`` is the inner solver's update (a fixed point at the inner optimum). ``v``
    is iterated ``K`` times (or until it moves by less than ``tol``) from 0: ``v <- J_w^T v + g_w``.
    """
    w = [t.detach().requires_grad_(True) for t in inner]
    loss = outer_loss(w, outer)
    g_w = _grads_or_zeros(loss, w, retain_graph=True)
    g_theta = _grads_or_zeros(loss, outer)
    mapped = fp_map(w, outer)
    v = [torch.zeros_like(t) for t in w]
    for _ in range(K):
        prev = torch.cat([t.reshape(-1) for t in v])
        v = [a + b for a, b in zip(torch.autograd.grad(mapped, w, grad_outputs=v, retain_graph=True), g_w)]
        if float(torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in v]) - prev)) < tol:
            break
    indirect = _grads_or_zeros(mapped, outer, grad_outputs=v)
    return [a + b for a, b in zip(indirect, g_theta)]


def gradient_descent_map(inner_loss: Callable[[list[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor],
                         step: float) -> Callable[[list[torch.Tensor], Sequence[torch.Tensor]], list[torch.Tensor]]:
    """``Phi(w, theta) = w - step * grad_w inner_loss(w, theta)``, differentiable in both (create_graph)."""
    def fp_map(w: list[torch.Tensor], theta: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        grads = torch.autograd.grad(inner_loss(w, theta), w, create_graph=True)
        return [a - step * g for a, g in zip(w, grads)]
    return fp_map


# ---- the defense -------------------------------------------------------------------------------------

def fit_delta(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: IBAUConfig) -> torch.Tensor:
    """One pass of SGD on a universal ``delta [1, C, H, W]`` maximising CE against the model's own labels."""
    x0 = batches[0][0]
    delta = torch.zeros((1, *x0.shape[1:]), device=x0.device, requires_grad=True)
    opt = torch.optim.SGD([delta], lr=cfg.delta_lr)
    for x, _ in batches:
        with torch.no_grad():
            own = forward_logits(model, x).argmax(1)
        loss = -F.cross_entropy(forward_logits(model, x + delta), own) + cfg.delta_reg * delta.pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return delta.detach()


def run_ibau(model: nn.Module, clean_data: Any, cfg: IBAUConfig | None = None, run_dir: RunDir | str | None = None,
             *, num_classes: int | None = None, seed: int = 0, prepare: Prepare | None = None
             ) -> tuple[nn.Module, DefenseReport]:
    """I-BAU on a copy of ``model`` with the clean subset (image inputs)."""
    cfg = cfg or IBAUConfig()
    image_tensor(clean_data, "I-BAU")
    labels, _ = checked_labels(model, clean_data, num_classes, cfg.min_clean_per_class, "I-BAU")
    phases = Phases(as_run_dir(run_dir))
    out = trainable_copy(model)
    out.eval()  # as released: the whole defense runs with frozen batch-norm statistics
    params = list(out.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam" else torch.optim.SGD(params, lr=cfg.lr)
    # one shuffled pass of the clean subset, no augmentation (the authors' fixed list of batches)
    batches = image_batches(clean_data, cfg.batch_size, seed, prepare, False, model_device(out))(0)
    x_in, y_in = batches[0]
    gen = generator(seed + 3)

    def inner_loss(w: list[torch.Tensor], _theta: Sequence[torch.Tensor]) -> torch.Tensor:
        return -F.cross_entropy(forward_logits(out, x_in + w[0]), y_in) + cfg.delta_reg * w[0].pow(2).sum()

    fp_map = gradient_descent_map(inner_loss, cfg.inner_lr)
    history = []
    with phases("unlearn"):
        for rnd in progress(range(cfg.rounds), desc="I-BAU rounds"):
            delta = fit_delta(out, batches, cfg)
            for x, y in batches:
                n_patch = max(1, int(x.shape[0] * cfg.portion))
                patched = torch.randperm(x.shape[0], generator=gen)[:n_patch].to(x.device)

                def outer_loss(w: list[torch.Tensor], _theta: Sequence[torch.Tensor], x=x, y=y,
                               patched=patched) -> torch.Tensor:
                    patch = torch.zeros_like(x)
                    patch[patched] = w[0].expand(len(patched), -1, -1, -1)
                    return F.cross_entropy(forward_logits(out, x + patch), y)

                opt.zero_grad(set_to_none=True)
                grads = fixed_point_hypergradient([delta], params, cfg.K, fp_map, outer_loss, cfg.tol)
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
            history.append({"round": rnd + 1, "delta_l2": float(delta.norm()), "delta_linf": float(delta.abs().max())})
    return out, DefenseReport("i-bau", int(labels.shape[0]), phases.timings, {"history": history}, to_dict(cfg))


SPEC = DefenseSpec(
    name="i-bau", kind="classify", config=IBAUConfig, run=run_ibau, needs=Needs(trains=True),
    summary="implicit backdoor adversarial unlearning: universal perturbation, implicit hypergradient (Zeng et al. 2022)",
    paper="Adversarial Unlearning of Backdoors via Implicit Hypergradient (ICLR 2022)",
    presets={"backdoorbench": {"lr": 1e-4, "batch_size": 256}},
    budgets={"demo": {"rounds": 3}, "smoke": {"rounds": 1}},
)
