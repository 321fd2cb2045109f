"""FST's loss and head handling, SAU's shared adversarial example and shared risk, each against a naive
per-sample reference on tiny tensors."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from unbackdoor.classify.defenses import CLASSIFY_DEFENSES
from unbackdoor.classify.defenses.fst import FSTConfig, fst_loss, rescale_to, run_fst
from unbackdoor.classify.defenses.sau import (SAUConfig, js_divergence, perturbation_loss, run_sau, shared_pgd,
                                              shared_risk_loss)
from unbackdoor.classify.models import preact_resnet_tiny


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v - max(row)) for v in row]
    return [v / sum(e) for v in e]


def _ce(row: list[float], label: int) -> float:
    return -math.log(_softmax(row)[label])


# ---- FST --------------------------------------------------------------------------------------------

def test_fst_loss_is_cross_entropy_plus_alpha_times_the_entrywise_inner_product():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(5, 3, generator=g), torch.tensor([0, 2, 1, 1, 0])
    w, w0 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    ce = sum(_ce(logits[i].tolist(), int(labels[i])) for i in range(5)) / 5
    inner = sum(float(w[i, j]) * float(w0[i, j]) for i in range(3) for j in range(4))
    assert float(fst_loss(logits, labels, w, w0, 0.2)) == pytest_approx(ce + 0.2 * inner)
    w.requires_grad_(True)
    (grad,) = torch.autograd.grad(fst_loss(logits, labels, w, w0, 0.2), [w])
    assert torch.allclose(grad, 0.2 * w0)  # the logits do not depend on w here: only the penalty's gradient


def pytest_approx(v: float):
    import pytest

    return pytest.approx(v, rel=1e-6, abs=1e-6)


def test_rescale_keeps_the_direction_and_sets_the_norm():
    w = torch.tensor([[3.0, 4.0]])
    rescale_to(w, 10.0)
    assert torch.allclose(w, torch.tensor([[6.0, 8.0]]))


def test_fst_reinitialises_the_head_keeps_its_norm_and_leaves_the_input_model(tiny_world_small):
    train, _ = tiny_world_small
    torch.manual_seed(0)
    model = preact_resnet_tiny(10, width=4)
    before = copy.deepcopy(model.state_dict())
    out, report = run_fst(model, train, FSTConfig(epochs=1, min_clean_per_class=1), num_classes=10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    w0, w = before["linear.weight"], out.linear.weight.detach()
    assert float(w.norm()) == pytest_approx(float(w0.norm()))
    assert abs(report.details["head_cosine_to_original"]) < 0.5  # a fresh head, pushed away, not the old one
    assert not torch.equal(out.conv1.weight, model.conv1.weight)  # every layer is tuned, not only the head


# ---- SAU --------------------------------------------------------------------------------------------

def _js_naive(a: list[float], b: list[float]) -> float:
    p, q = _softmax(a), _softmax(b)
    m = [(x + y) / 2 for x, y in zip(p, q)]
    return 0.5 * sum(x * math.log(x / z) for x, z in zip(p, m)) + 0.5 * sum(y * math.log(y / z) for y, z in zip(q, m))


def test_js_divergence_matches_the_definition_and_vanishes_for_equal_predictions():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    got = js_divergence(a, b)
    for i in range(4):
        assert float(got[i]) == pytest_approx(_js_naive(a[i].tolist(), b[i].tolist()))
    assert float(js_divergence(a, a).abs().max()) < 1e-6


def test_perturbation_loss_matches_a_per_sample_reference():
    g = torch.Generator().manual_seed(2)
    z, zr = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    own, own_ref = z.argmax(1).clone(), zr.argmax(1).clone()
    own[:3] = (own[:3] + 1) % 3  # the first three images are "fooled" for the defended model
    own_ref[1:4] = (own_ref[1:4] + 1) % 3
    loss, shared = perturbation_loss(z, zr, y, own, own_ref, beta_1=0.01, beta_2=1.0)
    adv = share = 0.0
    want_shared = []
    for i in range(6):
        zi, zri = z[i].tolist(), zr[i].tolist()
        fooled, fooled_ref = int(z[i].argmax()) != int(own[i]), int(zr[i].argmax()) != int(own_ref[i])
        is_shared = fooled and fooled_ref and int(z[i].argmax()) == int(zr[i].argmax())
        want_shared.append(is_shared)
        adv -= (0.0 if fooled else _ce(zi, int(y[i]))) + (0.0 if fooled_ref else _ce(zri, int(y[i])))
        share += 0.0 if is_shared else _js_naive(zi, zri)
    want = 0.01 * adv / 2 / 6 + 1.0 * share / 6
    assert float(loss) == pytest_approx(want)
    assert shared.tolist() == want_shared


def test_shared_pgd_fools_both_models_into_one_class_within_the_bound():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    reference = copy.deepcopy(model)
    x = torch.rand(32, 1, 2, 2)
    y = model(x).argmax(1).detach()
    cfg = SAUConfig(norm_bound=3.0, adv_lr=1.0, adv_steps=5, pgd_init="zero")
    delta = shared_pgd(model, reference, x, y, cfg)
    assert float(delta.abs().max()) <= 3.0
    with torch.no_grad():
        pred, pred_ref = model(x + delta).argmax(1), reference(x + delta).argmax(1)
    fooled = (pred != y) & (pred_ref != y) & (pred == pred_ref)
    assert float(fooled.float().mean()) > 0.8


def test_shared_risk_penalises_the_reference_class_on_images_that_fooled_the_reference():
    g = torch.Generator().manual_seed(3)
    z_adv, zr_adv, zr_clean = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    y = zr_adv.argmax(1).clone()
    y[0], y[2] = (y[0] + 1) % 4, (y[2] + 1) % 4  # the reference is wrong on images 0 and 2 ...
    zr_clean[0] = -zr_adv[0]  # on image 0 the perturbation changed the reference's prediction ...
    zr_clean[2] = zr_adv[2] * 10  # ... on image 2 it did not: not counted
    zr_clean[[1, 3, 4]] = -zr_adv[[1, 3, 4]]
    got = float(shared_risk_loss(z_adv, zr_adv, zr_clean, y))
    p = _softmax(z_adv[0].tolist())[int(zr_adv[0].argmax())]
    assert got == pytest_approx(-math.log(1 - p) / 5)
    assert float(shared_risk_loss(z_adv, zr_adv, zr_clean, zr_adv.argmax(1))) == 0.0  # reference never fooled


def test_sau_unlearns_a_copy_and_keeps_the_reference_frozen(tiny_world_small):
    train, _ = tiny_world_small
    torch.manual_seed(0)
    model = preact_resnet_tiny(10, width=4)
    before = copy.deepcopy(model.state_dict())
    out, report = run_sau(model, train, SAUConfig(rounds=1, adv_steps=2, min_clean_per_class=1), num_classes=10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(out.linear.weight, model.linear.weight)
    assert len(report.details["history"]) == 1 and CLASSIFY_DEFENSES.get("sau").needs.clean_data
