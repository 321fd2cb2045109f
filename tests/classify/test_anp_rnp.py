"""ANP and RNP: the masked batch norm, ANP's perturbation and mask update and RNP's two phases against
naive functional references on tiny tensors, and what each prunes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unbackdoor.classify.defenses import CLASSIFY_DEFENSES
from unbackdoor.classify.defenses.anp import ANPConfig, anp_iteration, run_anp
from unbackdoor.classify.defenses.neuron_mask import (attach_masks, channels_at_or_below, mask_parameters,
                                                     prune_channels, set_perturbed)
from unbackdoor.classify.defenses.rnp import RNPConfig, recover_masks, run_rnp
from unbackdoor.classify.defenses.common import unlearn
from unbackdoor.core.errors import ModelError


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net


def _naive_forward(net: nn.Module, x: torch.Tensor, mask: torch.Tensor, dw: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """The same MLP written out: batch statistics (biased variance), gamma (m + dw), beta (1 + db)."""
    h = x @ net[0].weight.T + net[0].bias
    mean, var = h.mean(0), h.var(0, unbiased=False)
    bn = net[1]
    h = (h - mean) / torch.sqrt(var + bn.eps) * (bn.weight * (mask + dw)) + bn.bias * (1 + db)
    return torch.relu(h) @ net[3].weight.T + net[3].bias


def _data(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)


def test_masked_batch_norm_equals_the_plain_one_at_mask_one_and_scales_gamma_only():
    net = _mlp()
    x, _ = _data()
    ref = copy.deepcopy(net).train()(x)
    work = copy.deepcopy(net).train()
    wrappers = attach_masks(work)
    assert list(wrappers) == ["1"] and all(not p.requires_grad for p in work[1].bn.parameters())
    assert torch.allclose(work(x), ref, atol=1e-6)
    with torch.no_grad():
        wrappers["1"].mask.copy_(torch.tensor([1.0, 0.0, 0.5, 1.0]))
        wrappers["1"].noise_weight.fill_(0.3)
    got = work(x)  # noise is ignored while not perturbed
    want = _naive_forward(net, x, torch.tensor([1.0, 0.0, 0.5, 1.0]), torch.zeros(4), torch.zeros(4))
    assert torch.allclose(got, want, atol=1e-5)


def test_anp_iteration_matches_a_naive_reference():
    net, (x, y) = _mlp(), _data()
    cfg = ANPConfig(eps=0.4, steps=1, alpha=0.2, mask_lr=0.2, momentum=0.9)
    work = copy.deepcopy(net).train()
    wrappers = attach_masks(work)
    opt = torch.optim.SGD(mask_parameters(wrappers), lr=cfg.mask_lr, momentum=cfg.momentum)
    anp_iteration(work, wrappers, x, y, cfg, opt, torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)  # the same draws: weight noise, then bias noise
    dw = ((torch.rand(4, generator=g) * 2 - 1) * cfg.eps).requires_grad_(True)
    db = ((torch.rand(4, generator=g) * 2 - 1) * cfg.eps).requires_grad_(True)
    mask = torch.ones(4, requires_grad=True)
    gw, gb = torch.autograd.grad(F.cross_entropy(_naive_forward(net, x, mask, dw, db), y), [dw, db])
    dw1, db1 = (dw + cfg.eps * gw.sign()).detach(), (db + cfg.eps * gb.sign()).detach()  # one ascent step of eps
    loss = cfg.alpha * F.cross_entropy(_naive_forward(net, x, mask, torch.zeros(4), torch.zeros(4)), y) \
        + (1 - cfg.alpha) * F.cross_entropy(_naive_forward(net, x, mask, dw1, db1), y)
    (gm,) = torch.autograd.grad(loss, [mask])
    mask1 = (mask - cfg.mask_lr * gm).clamp(0, 1)  # SGD's first momentum step is a plain step

    w = wrappers["1"]
    assert torch.allclose(w.noise_weight, dw1, atol=1e-5) and torch.allclose(w.noise_bias, db1, atol=1e-5)
    assert torch.allclose(w.mask, mask1, atol=1e-5)


def test_anp_perturbation_raises_the_loss_and_stays_within_the_bound_when_projected():
    net, (x, y) = _mlp(), _data()
    cfg = ANPConfig(eps=0.2, steps=3, project_noise=True)
    work = copy.deepcopy(net).train()
    wrappers = attach_masks(work)
    opt = torch.optim.SGD(mask_parameters(wrappers), lr=0.0)
    with torch.no_grad():
        clean = float(F.cross_entropy(work(x), y))
    anp_iteration(work, wrappers, x, y, cfg, opt, torch.Generator().manual_seed(0))
    w = wrappers["1"]
    assert float(w.noise_weight.detach().abs().max()) <= 0.2 + 1e-7
    assert float(w.noise_bias.detach().abs().max()) <= 0.2 + 1e-7
    set_perturbed(wrappers, True)
    with torch.no_grad():
        assert float(F.cross_entropy(work(x), y)) > clean


def test_pruning_zeroes_gamma_of_channels_at_or_below_the_threshold_in_a_copy_of_the_original():
    net = _mlp()
    masks = {"1": torch.tensor([0.9, 0.2, 0.05, 0.21])}
    chosen = channels_at_or_below(masks, 0.2)
    assert chosen == {"1": [1, 2]}
    out = copy.deepcopy(net)
    assert prune_channels(out, chosen) == 2
    assert out[1].weight[1] == 0 and out[1].weight[2] == 0 and out[1].weight[0] == net[1].weight[0]
    assert torch.equal(out[1].bias, net[1].bias)  # the bias stays, as in the released code
    with pytest.raises(ModelError, match="not a batch norm"):
        prune_channels(out, {"0": [0]})


def test_anp_runs_end_to_end_on_a_copy_and_refuses_models_without_batch_norm(tiny_world_small):
    from unbackdoor.classify.models import preact_resnet_tiny

    train, _ = tiny_world_small
    torch.manual_seed(0)
    model = preact_resnet_tiny(10, width=4)
    before = copy.deepcopy(model.state_dict())
    out, report = run_anp(model, train, ANPConfig(iterations=3, batch_size=16, threshold=0.99,
                                                  min_clean_per_class=1), num_classes=10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    pruned = report.details["pruned"]
    assert report.details["channels_pruned"] == sum(len(v) for v in pruned.values()) > 0
    for name, idx in pruned.items():
        assert float(out.get_submodule(name).weight.detach()[idx].abs().sum()) == 0.0
    with pytest.raises(ModelError, match="batch-norm"):
        CLASSIFY_DEFENSES.get("anp").check_model(nn.Linear(3, 2), ANPConfig())


# ---- RNP ------------------------------------------------------------------------------------------

def _separable(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 3, generator=g) * 0.3 + (y[:, None].float() * 2 - 1) * torch.tensor([1.5, -1.0, 0.5])
    return x, y


def _trained_mlp() -> nn.Module:
    net = _mlp()
    x, y = _separable()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(30):  # accurate but not saturated (a saturated softmax has no gradient to ascend)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def test_rnp_phase_one_unlearns_until_clean_accuracy_is_at_most_the_threshold():
    net, data = _trained_mlp(), _separable()
    with torch.no_grad():
        assert float((net(data[0]).argmax(1) == data[1]).float().mean()) > 0.95
    log = unlearn(net, data, lr=0.05, momentum=0.9, weight_decay=0.0, milestones=(10, 20), gamma=0.1, clip=20.0,
                  max_epochs=50, stop_acc=0.55, batch_size=16, augment=False, seed=0, prepare=None)
    # two classes: a collapsed model scores 0.5, so the threshold here is 0.55 (RNP's 0.2 assumes 10 classes)
    assert log[-1]["acc"] <= 0.55 and all(e["acc"] > 0.55 for e in log[:-1])  # stops at the first epoch below
    assert log[-1]["loss"] > log[0]["loss"]  # cross-entropy went UP


def test_rnp_phase_two_recovery_step_matches_a_naive_reference_and_leaves_weights_frozen():
    net, (x, y) = _mlp(), _data(8)
    cfg = RNPConfig(alpha=0.2, recover_lr=0.2, recover_epochs=1, batch_size=8, augment=False)
    frozen = copy.deepcopy(net.state_dict())
    masks, log = recover_masks(net, (x, y), cfg, seed=0)
    mask = torch.ones(4, requires_grad=True)  # one batch = the whole set: one SGD step from mask 1
    (gm,) = torch.autograd.grad(cfg.alpha * F.cross_entropy(_naive_forward(net, x, mask, torch.zeros(4),
                                                                             torch.zeros(4)), y), [mask])
    assert torch.allclose(masks["1"], (mask - cfg.recover_lr * gm).clamp(0, 1), atol=1e-5)
    assert all(torch.equal(frozen[k], v) for k, v in net.state_dict().items())  # recovery works on a copy
    assert len(log) == 1


def test_rnp_prunes_the_original_model_not_the_unlearned_one(tiny_world_small):
    from unbackdoor.classify.models import preact_resnet_tiny

    train, _ = tiny_world_small
    torch.manual_seed(0)
    model = preact_resnet_tiny(10, width=4)
    out, report = run_rnp(model, train, RNPConfig(unlearn_max_epochs=1, recover_epochs=1, threshold=0.999,
                                                  min_clean_per_class=1), num_classes=10)
    pruned = report.details["pruned"]
    assert report.details["channels_pruned"] > 0
    original, result = model.state_dict(), out.state_dict()
    for key, value in result.items():  # every tensor is the original's except the pruned gammas
        layer, _, field = key.rpartition(".")
        want = original[key].clone()
        if field == "weight" and layer in pruned:
            want[pruned[layer]] = 0.0
        assert torch.equal(value, want), key
