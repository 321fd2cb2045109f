"""FT, FP and NAD: they leave the input alone, FP's pruning search is exact, NAD's attention maps."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from unbackdoor.classify.defenses.fp import FPConfig, head_inputs, prune_order, prune_until, run_fp
from unbackdoor.classify.defenses.ft import FTConfig, run_ft
from unbackdoor.classify.defenses.nad import NADConfig, attention_loss, attention_map, run_nad
from unbackdoor.classify.data import ImageData
from unbackdoor.classify.models import preact_resnet_tiny
from unbackdoor.core.errors import ConfigError, DataError, ModelError

torch.set_num_threads(1)


def _images(n: int = 40, classes: int = 4, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    images[:, labels % 3, :8] = 255  # a little class signal
    return ImageData(images, labels, classes)


def _model(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return preact_resnet_tiny(classes, width=4)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, b[k]) for k, v in a.items())


def test_ft_trains_a_copy_and_leaves_the_input_untouched():
    model, data = _model(), _images()
    before = _state(model)
    out, report = run_ft(model, data, FTConfig(epochs=1, batch_size=16, min_clean_per_class=2), num_classes=4)
    assert _same(before, model.state_dict())
    assert not _same(before, out.state_dict())
    assert report.method == "ft" and report.clean_samples == 40 and "train" in report.timings


def test_prune_order_is_least_active_first_with_stable_ties():
    assert prune_order(torch.tensor([0.5, 0.1, 0.5, 0.0])) == [3, 1, 0, 2]


def test_prune_until_stops_before_accuracy_falls_below_the_ratio():
    # 3 channels: channel 2 (most active) decides everything; channels 0, 1 are weak and unused
    feats = torch.tensor([[0.1, 0.2, 5.0], [0.1, 0.2, 1.0]] * 10)
    labels = torch.tensor([0, 1] * 10)
    w = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    pruned, trace = prune_until(feats, labels, w, torch.tensor([-3.0, 0.0]), acc_ratio=0.9, max_prune_ratio=1.0)
    assert pruned == [0, 1]  # pruning channel 2 would drop accuracy to 0.5
    assert trace[-1]["pruned"] == 3 and trace[-1]["acc"] == 0.5


def test_fp_bakes_the_pruning_mask_into_the_head():
    model, data = _model(), _images()
    out, report = run_fp(model, data, FPConfig(epochs=0, acc_ratio=0.5, min_clean_per_class=2), num_classes=4)
    pruned = report.details["pruned"]
    assert pruned, "a random network loses little accuracy when its least active channels go"
    assert torch.all(out.linear.weight[:, pruned] == 0)
    kept = [i for i in range(out.linear.in_features) if i not in pruned]
    assert torch.equal(out.linear.weight[:, kept], model.linear.weight[:, kept])


def test_head_inputs_are_the_features_the_head_sees():
    model, data = _model(), _images()
    feats = head_inputs(model, model.linear, data.images)
    with torch.no_grad():
        expect = model.eval().features(data.images.float() / 255)
    assert torch.allclose(feats, expect, atol=1e-5)


def test_attention_map_is_normalised_mean_of_squared_channels():
    f = torch.zeros(1, 2, 2, 2)
    f[0, 0, 0, 0], f[0, 1, 0, 0], f[0, 0, 1, 1] = 3.0, 4.0, 2.0  # channel-mean of squares: (9+16)/2, 0, 0, 4/2
    am = attention_map(f)
    raw = torch.tensor([12.5, 0.0, 0.0, 2.0])
    assert torch.allclose(am[0], raw / raw.norm())
    assert float(attention_loss(f, f)) == 0.0
    assert float(attention_loss(f, torch.ones_like(f))) > 0


def test_nad_runs_and_distills_at_the_named_layers():
    model, data = _model(), _images()
    before = _state(model)
    out, report = run_nad(model, data, NADConfig(teacher_epochs=1, epochs=1, batch_size=16, min_clean_per_class=2),
                          num_classes=4)
    assert report.details["layers"] == ["layer2", "layer3", "layer4"]
    assert _same(before, model.state_dict()) and not _same(before, out.state_dict())
    assert not out._forward_pre_hooks and not out.layer2._forward_hooks  # hooks removed


def test_nad_on_a_model_without_named_layers_asks_for_them():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    with pytest.raises(ModelError, match="NAD needs the names"):
        run_nad(model, _images(), NADConfig(min_clean_per_class=2), num_classes=4)


def test_configs_reject_bad_values_and_small_subsets():
    with pytest.raises(ConfigError, match="acc_ratio"):
        FPConfig(acc_ratio=1.5)
    with pytest.raises(ConfigError, match="betas"):
        NADConfig(layers=("a", "b"), betas=(1.0,))
    with pytest.raises(DataError, match="needs at least 20"):
        run_ft(_model(), _images(12), FTConfig(), num_classes=4)
