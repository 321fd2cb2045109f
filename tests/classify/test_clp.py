"""CLP: the channel bound against a per-channel SVD, the outlier rule, what it prunes, that it reads no data."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from unbackdoor.classify.defenses import CLASSIFY_DEFENSES
from unbackdoor.classify.defenses.clp import CLPConfig, channel_lipschitz, outlier_channels, run_clp
from unbackdoor.classify.models import preact_resnet_tiny
from unbackdoor.core.errors import ModelError


def test_channel_bound_is_the_largest_singular_value_of_the_scaled_kernel():
    g = torch.Generator().manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)
    conv.weight.data = torch.randn(5, 3, 3, 3, generator=g)
    bn.weight.data = torch.randn(5, generator=g)
    bn.running_var = torch.rand(5, generator=g) + 0.5
    got = channel_lipschitz(conv.weight, bn)
    for k in range(5):
        scale = abs(float(bn.weight[k].detach())) / float((bn.running_var[k] + bn.eps).sqrt())
        want = torch.linalg.svdvals(conv.weight[k].detach().reshape(3, -1) * scale).max()
        assert float(got[k]) == pytest.approx(float(want), rel=1e-5)


def test_outlier_rule_uses_mean_plus_u_std():
    bounds = torch.tensor([1.0, 1.1, 0.9, 1.0, 5.0])
    assert outlier_channels(bounds, 1.5) == [4]
    assert outlier_channels(bounds, 3.0) == []  # 5.0 < mean + 3 std here


def test_a_planted_high_gain_channel_is_pruned_and_the_input_model_kept():
    torch.manual_seed(0)
    model = preact_resnet_tiny(4, width=8).eval()
    conv = model.layer2[0].conv1
    with torch.no_grad():
        conv.weight[3] *= 50.0  # one channel with a huge gain: what a trigger detector looks like
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, report = run_clp(model, None, CLPConfig(u=3.0))
    assert 3 in report.details["pruned"]["layer2.0.bn2"]
    assert float(out.layer2[0].bn2.weight[3]) == 0.0 and float(out.layer2[0].bn2.bias[3]) == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert report.clean_samples == 0


def test_clp_is_registered_data_free_and_refuses_models_without_batch_norm():
    spec = CLASSIFY_DEFENSES.get("clp")
    assert not spec.needs.clean_data and not spec.needs.trains
    with pytest.raises(ModelError, match="batch norm"):
        spec.check_model(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), CLPConfig())
