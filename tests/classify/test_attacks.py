"""Each attack puts its trigger where it belongs, relabels right, poisons the right number, deterministically."""
from __future__ import annotations

import math

import pytest
import torch

from unbackdoor.classify.attacks import (IMAGE_ATTACKS, attack_config, attack_targets, build_attack, poison,
                                         poison_full, triggered_test_set)
from unbackdoor.classify.attacks.badnets import BadNets
from unbackdoor.classify.attacks.blended import Blended, blend_pattern
from unbackdoor.classify.attacks.bpp import BPP, floyd_steinberg_quantize
from unbackdoor.classify.attacks.sig import SIG
from unbackdoor.classify.attacks.wanet import WaNet

ATTACKS = IMAGE_ATTACKS.names()
CHEAP = {"lf": {"surrogate_epochs": 1, "lf_iterations": 5}, "lc": {"surrogate_epochs": 1},
         "trojannn": {"surrogate_epochs": 1, "trojan_iterations": 10}, "inputaware": {"ia_mask_epochs": 1, "ia_epochs": 1}}
"""Fitted attacks at a few steps: their properties are tested at length in test_fitted_attacks.py."""
from unbackdoor.classify.data import ImageData, to_float
from unbackdoor.core.errors import ConfigError


def _changed(a: ImageData, b: ImageData) -> torch.Tensor:
    return (a.images != b.images).flatten(1).any(1).nonzero().flatten()


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_poisoning_is_exact_in_count_and_deterministic_from_the_seed(random_images, name):
    cfg = attack_config(name, rate=0.05, seed=3, **CHEAP.get(name, {}))
    r1, r2 = poison_full(random_images, cfg), poison_full(random_images, cfg)
    other = poison_full(random_images, attack_config(name, rate=0.05, seed=4, **CHEAP.get(name, {})))
    assert len(r1.poisoned) == 5
    assert torch.equal(r1.data.images, r2.data.images) and torch.equal(r1.poisoned, r2.poisoned)
    assert not torch.equal(r1.poisoned, other.poisoned)
    untouched = torch.ones(len(random_images), dtype=torch.bool)
    untouched[r1.poisoned] = False
    untouched[r1.noise] = False
    assert torch.equal(r1.data.images[untouched], random_images.images[untouched])
    assert torch.equal(r1.data.labels[untouched], random_images.labels[untouched])
    assert torch.equal(r1.data.labels[r1.noise], random_images.labels[r1.noise])  # noise/negative: label kept


def test_all_to_one_relabels_non_target_samples_to_the_target(random_images):
    data, idx = poison(random_images, attack_config("badnets", target=2, rate=0.3))
    assert len(idx) == 30
    assert (random_images.labels[idx] != 2).all()
    assert (data.labels[idx] == 2).all()


def test_all_to_all_shifts_each_label_by_one(random_images):
    data, idx = poison(random_images, attack_config("blended", mode="all2all", rate=0.2))
    assert torch.equal(data.labels[idx], (random_images.labels[idx] + 1) % 10)
    assert torch.equal(attack_targets(torch.tensor([0, 9]), attack_config("badnets", mode="all2all"), 10), torch.tensor([1, 0]))


def test_badnets_patch_is_white_3x3_in_the_bottom_right_only(random_images):
    data, idx = poison(random_images, attack_config("badnets"))
    x, x0 = data.images[idx], random_images.images[idx]
    assert (x[:, :, -3:, -3:] == 255).all()
    mask = torch.ones(16, 16, dtype=torch.bool)
    mask[-3:, -3:] = False
    assert torch.equal(x[:, :, mask], x0[:, :, mask])
    shifted = BadNets(attack_config("badnets", patch_size=2, patch_margin=1, patch_value=0.0)).apply(torch.ones(1, 1, 6, 6))
    assert shifted[0, 0, 3:5, 3:5].eq(0).all() and shifted.sum() == 36 - 4


def test_blended_follows_the_blend_formula(random_images):
    cfg = attack_config("blended", blend_alpha=0.2)
    data, idx = poison(random_images, cfg)
    t = blend_pattern((3, 16, 16), cfg.seed)
    expected = (0.8 * to_float(random_images.images[idx]) + 0.2 * t) * 255
    assert (data.images[idx].float() - expected).abs().max() <= 0.5 + 1e-4  # uint8 rounding only
    assert torch.equal(Blended(cfg).pattern((3, 16, 16)), t)  # the same trigger every time


def test_sig_poisons_only_target_class_images_and_keeps_labels(random_images):
    cfg = attack_config("sig", target=1, rate=0.08)
    res = poison_full(random_images, cfg)
    assert len(res.poisoned) == 8 and (random_images.labels[res.poisoned] == 1).all()
    assert torch.equal(res.data.labels, random_images.labels)
    flat = torch.full((1, 3, 4, 16), 0.5)
    out = SIG(cfg).apply(flat)
    j = torch.arange(16)
    expected = 0.5 + 40 / 255 * torch.sin(2 * math.pi * j * 6 / 16)
    assert torch.allclose(out[0, 0, 2], expected, atol=1e-6)
    assert torch.equal(out[0, :, 0], out[0, :, 3])  # the same signal in every row and channel
    with pytest.raises(ConfigError, match="has only"):
        poison(random_images, attack_config("sig", rate=0.2))  # 20 > the 10 target-class images
    with pytest.raises(ConfigError, match="all2all"):
        attack_config("sig", mode="all2all")


def test_wanet_warps_smoothly_keeps_the_image_close_and_adds_noise_samples(tiny_world_small):
    train, _ = tiny_world_small
    cfg = attack_config("wanet", rate=0.1)
    res = poison_full(train, cfg)
    assert len(res.poisoned) == 20 and len(res.noise) == 40  # cross ratio 2
    assert not set(res.poisoned.tolist()) & set(res.noise.tolist())
    diff = (res.data.images[res.poisoned].float() - train.images[res.poisoned].float()).abs() / 255
    assert 0.002 < float(diff.mean()) < 0.08  # changed, but imperceptibly on average
    grid = WaNet(cfg).grid(32, 32)
    identity = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="xy"), 2)
    shift = (grid[0] - identity).abs()
    assert float(shift.max()) * 16 < 1.5  # at most ~1.5 pixels of displacement (s = 0.5)
    assert torch.allclose(WaNet(cfg).apply(torch.ones(2, 3, 32, 32)), torch.ones(2, 3, 32, 32), atol=1e-5)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    x = to_float(train.images[:2])
    assert not torch.equal(WaNet(cfg).apply_noise(x, g1), WaNet(cfg).apply_noise(x, g2))


def test_bpp_squeezes_to_eight_levels_with_error_diffusion(random_images):
    cfg = attack_config("bpp", rate=0.1)
    res = poison_full(random_images, cfg)
    levels = {round(255 * k / 7) for k in range(8)}
    assert set(res.data.images[res.poisoned].unique().tolist()) <= levels
    assert len(res.noise) == 1  # negative ratio 0.1 of 10 backdoor samples
    # dithering keeps the local mean: a flat 0.3 image becomes a mix of 2/7 and 3/7 averaging ~0.3
    flat = torch.full((1, 1, 16, 16), 0.3)
    d = floyd_steinberg_quantize(flat, 8)
    assert set((d * 7).round().unique().tolist()) == {2.0, 3.0}
    assert abs(float(d.mean()) - 0.3) < 0.01
    assert torch.equal(floyd_steinberg_quantize(flat, 8, dither=False), torch.full_like(flat, 2 / 7))


def test_triggered_test_set_keeps_true_labels_of_non_target_images(tiny_world_small):
    train, test = tiny_world_small
    for name in ATTACKS:
        cfg = attack_config(name, target=0, **CHEAP.get(name, {}))
        if build_attack(cfg).stateful:  # a fitted trigger exists only after poisoning (test_fitted_attacks.py)
            cfg = poison_full(train, cfg).config
        trig = triggered_test_set(test, cfg)
        assert len(trig) == int((test.labels != 0).sum())
        assert torch.equal(trig.labels, test.labels[test.labels != 0])
        assert not torch.equal(trig.images, test.images[test.labels != 0])
    all2all = triggered_test_set(test, attack_config("badnets", mode="all2all"))
    assert len(all2all) == len(test)


def test_bad_configs_are_named():
    with pytest.raises(ConfigError, match="unknown image attack 'trojan'"):
        attack_config("trojan")
    with pytest.raises(ConfigError, match="did you mean 'blended'"):
        attack_config("blendd")
    with pytest.raises(ConfigError, match="rate"):
        attack_config("badnets", rate=1.5)
    with pytest.raises(ConfigError, match="unknown config key 'blend_alpha'"):
        attack_config("badnets", blend_alpha=0.3)  # another attack's knob
    with pytest.raises(ConfigError, match="target class 12"):
        poison(ImageData(torch.zeros(10, 3, 8, 8, dtype=torch.uint8), torch.arange(10), 10), attack_config("badnets", target=12))
    assert isinstance(build_attack("bpp"), BPP)
