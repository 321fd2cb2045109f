"""The pruning math, as pure functions of tensors: importance scores and keep-masks.

Magnitude pruning scores a weight by ``|W_ij|``; Wanda (Sun et al., ICLR 2024) by
``|W_ij| * ||X_j||_2``, the weight times the L2 norm of its input feature over every clean
token, and compares weights within each output row. Unstructured masks drop the
``floor(sparsity * n)`` lowest scores of each group (a matrix, or a row); N:M masks drop the
``n`` lowest of every ``m`` consecutive weights of a row (2:4 is the semi-structured pattern
sparse tensor cores run), so their sparsity is ``n / m`` whatever ``sparsity`` says.
"""
from __future__ import annotations

import torch


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * sqrt(sum_t x_tj^2)``: Wanda's importance (``input_sq_sum`` has one entry per input feature)."""
    if input_sq_sum.shape != weight.shape[1:]:
        raise ValueError(f"input norms have shape {tuple(input_sq_sum.shape)}, the weight {tuple(weight.shape)}")
    return weight.detach().abs().float() * input_sq_sum.float().clamp(min=0).sqrt().unsqueeze(0)


def parse_structure(structure: str) -> tuple[int, int] | None:
    """``'unstructured'`` -> None; ``'2:4'`` -> ``(2, 4)`` (drop 2 of every 4)."""
    if structure == "unstructured":
        return None
    try:
        n, m = (int(v) for v in structure.split(":"))
    except ValueError:
        raise ValueError(f"structure {structure!r} is neither 'unstructured' nor 'N:M'") from None
    if not 0 < n < m:
        raise ValueError(f"structure {structure!r}: need 0 < N < M")
    return n, m


def keep_mask(scores: torch.Tensor, sparsity: float, scope: str = "row", structure: str = "unstructured"
              ) -> torch.Tensor:
    """A boolean keep-mask dropping the lowest ``scores`` (ties: the lower index goes first).

    Unstructured: ``floor(sparsity * n)`` per group, the group being the whole matrix
    (``scope='matrix'``) or each output row (``'row'``). ``structure='N:M'``: the ``N`` lowest of
    every ``M`` consecutive entries of each row (``sparsity`` and ``scope`` do not apply).
    """
    nm = parse_structure(structure)
    if nm is not None:
        n, m = nm
        rows, cols = scores.shape[0], scores[0].numel()
        if cols % m:
            raise ValueError(f"{cols} input features are not a multiple of M = {m}")
        groups = scores.detach().float().reshape(rows, cols // m, m)
        drop = torch.argsort(groups, dim=-1, stable=True)[..., :n]
        keep = torch.ones_like(groups, dtype=torch.bool)
        keep.scatter_(-1, drop, False)
        return keep.reshape(scores.shape)
    flat = scores.detach().float()
    groups = flat.reshape(1, -1) if scope == "matrix" else flat.reshape(flat.shape[0], -1)
    k = int(sparsity * groups.shape[1])
    keep = torch.ones_like(groups, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, torch.argsort(groups, dim=1, stable=True)[:, :k], False)
    return keep.reshape(scores.shape)


def prune_mask(weight: torch.Tensor, sparsity: float, scope: str = "matrix", structure: str = "unstructured"
               ) -> torch.Tensor:
    """Magnitude pruning's keep-mask: :func:`keep_mask` of ``|weight|``."""
    return keep_mask(weight.detach().abs(), sparsity, scope, structure)


__all__ = ["keep_mask", "parse_structure", "prune_mask", "wanda_scores"]
