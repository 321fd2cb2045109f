"""I-BAU: the implicit hypergradient against the closed form of a quadratic inner problem; the defense's contract."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from unbackdoor.classify.defenses import CLASSIFY_DEFENSES
from unbackdoor.classify.defenses.ibau import (IBAUConfig, fit_delta, fixed_point_hypergradient,
                                               gradient_descent_map, run_ibau)
from unbackdoor.classify.models import preact_resnet_tiny
from unbackdoor.core.errors import DataError


def _quadratic_problem(seed: int = 0):
    """inner g(w, t) = 0.5 w'Hw - w'Bt (so w*(t) = H^-1 B t); outer f(w, t) = c'w + 0.5 |t|^2."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    h = a @ a.T + 4 * torch.eye(4, dtype=torch.float64)
    b = torch.randn(4, 3, generator=g, dtype=torch.float64)
    c = torch.randn(4, generator=g, dtype=torch.float64)
    theta = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    inner = lambda w, t: 0.5 * w[0] @ h @ w[0] - w[0] @ b @ t[0]  # noqa: E731
    outer = lambda w, t: c @ w[0] + 0.5 * (t[0] ** 2).sum()  # noqa: E731
    w_star = torch.linalg.solve(h, b @ theta.detach())
    exact = b.T @ torch.linalg.solve(h, c) + theta.detach()  # dF/dt = B'H^-1 c + t
    return h, inner, outer, theta, w_star, exact


def test_hypergradient_matches_the_closed_form_of_a_quadratic_inner_problem():
    h, inner, outer, theta, w_star, exact = _quadratic_problem()
    step = 1.0 / float(torch.linalg.eigvalsh(h).max())  # a contraction: |I - step H| < 1
    grad = fixed_point_hypergradient([w_star], [theta], 500, gradient_descent_map(inner, step), outer, tol=1e-14)
    assert torch.allclose(grad[0], exact, atol=1e-9)


def test_hypergradient_with_few_iterations_is_the_truncated_neumann_series():
    h, inner, outer, theta, w_star, exact = _quadratic_problem(1)
    step, k = 0.05, 3
    grad = fixed_point_hypergradient([w_star], [theta], k, gradient_descent_map(inner, step), outer, tol=0.0)
    c = torch.autograd.functional.jacobian(lambda w: outer([w], [theta.detach()]), w_star)
    b = torch.autograd.functional.jacobian(lambda t: torch.autograd.functional.jacobian(
        lambda w: inner([w], [t]), w_star, create_graph=True), theta.detach())  # d/dt grad_w g = -B
    jw = torch.eye(4, dtype=torch.float64) - step * h  # dPhi/dw
    v, term = torch.zeros(4, dtype=torch.float64), c.clone()
    for _ in range(k):  # v_k = sum_{j<k} (J_w^T)^j c
        v = v + term
        term = jw.T @ term
    want = (-step * b).T @ v + theta.detach()  # (dPhi/dt)^T v + grad_t f
    assert torch.allclose(grad[0], want, atol=1e-10)
    assert not torch.allclose(grad[0], exact, atol=1e-3)  # three iterations are not the limit


def test_delta_is_one_universal_pattern_that_raises_the_loss_on_the_models_own_labels():
    torch.manual_seed(0)
    model = preact_resnet_tiny(4, width=4).eval()
    x = torch.rand(16, 3, 16, 16)
    batches = [(x[:8], torch.zeros(8, dtype=torch.long)), (x[8:], torch.zeros(8, dtype=torch.long))]
    delta = fit_delta(model, batches, IBAUConfig(delta_lr=1.0))
    assert delta.shape == (1, 3, 16, 16) and float(delta.abs().sum()) > 0
    with torch.no_grad():
        own = model(x).argmax(1)
        ce = nn.functional.cross_entropy
        assert float(ce(model(x + delta), own)) > float(ce(model(x), own))


def test_ibau_changes_a_copy_only_and_refuses_token_inputs(tiny_world_small):
    train, _ = tiny_world_small
    torch.manual_seed(0)
    model = preact_resnet_tiny(10, width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, report = run_ibau(model, train, IBAUConfig(rounds=1, K=2, batch_size=100, min_clean_per_class=1),
                           num_classes=10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items())
    assert report.clean_samples == 200 and len(report.details["history"]) == 1
    tokens = {"input_ids": torch.zeros(20, 5, dtype=torch.long)}, torch.arange(20) % 2
    with pytest.raises(DataError, match="perturbs input images"):
        run_ibau(nn.Linear(5, 2), tokens, IBAUConfig(min_clean_per_class=1), num_classes=2)
    assert CLASSIFY_DEFENSES.get("ibau").name == "i-bau"
