"""The attacks from BackdoorBench's list beyond the static five: each one's defining property on small data.

LF: a universal, bounded, low-frequency additive trigger; LC: clean-label, PGD-hardened target images
with four corner checkerboards; TrojanNN: a pattern confined to its region that excites the chosen
neurons; Input-aware: a different trigger for every image, cross samples with their labels;
Adap-Blend: half the trigger's pieces while poisoning, the whole trigger at test time, cover samples.
Fitted triggers are rebuilt from the recorded config alone.
"""
from __future__ import annotations

import math

import pytest
import torch

from unbackdoor.classify.attacks import attack_config, attack_config_from_dict, build_attack, poison_full
from unbackdoor.classify.attacks.base import decode_state, encode_state
from unbackdoor.classify.attacks.blended import blend_pattern
from unbackdoor.classify.attacks.lc import checkerboard, four_corners
from unbackdoor.classify.attacks.lf import gaussian_lowpass, low_frequency_energy
from unbackdoor.classify.data import to_float
from unbackdoor.core.config import to_dict
from unbackdoor.core.errors import ConfigError

FAST = {"surrogate_epochs": 1}


@pytest.fixture(scope="module")
def world():
    from unbackdoor.classify.tinyworld import make_tiny_world

    return make_tiny_world(0, n_train=300, n_test=60)


def _rebuilt(result):
    """The attack as a later evaluation sees it: from the recorded config dict only."""
    return build_attack(attack_config_from_dict(to_dict(result.config)))


def test_state_round_trips_and_a_missing_or_corrupt_state_is_a_clear_error(world):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    back = decode_state(encode_state(t))
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])
    with pytest.raises(ConfigError, match="cannot be read"):
        decode_state("not base64 safetensors!")
    with pytest.raises(ConfigError, match="no fitted trigger"):
        build_attack(attack_config("lf")).triggered_test_set(world[1])


# ---- LF ----------------------------------------------------------------------------------------------

def test_lowpass_keeps_constants_and_removes_a_checkerboard():
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(gaussian_lowpass(flat, 2.0), flat, atol=1e-6)
    board = (torch.arange(16).view(-1, 1) + torch.arange(16).view(1, -1)) % 2
    board = board.float().expand(1, 3, 16, 16) - 0.5
    assert float(gaussian_lowpass(board, 2.0).abs().max()) < 0.01
    assert low_frequency_energy(board) < 0.01 and low_frequency_energy(flat) > 0.99


def test_lf_trigger_is_universal_bounded_low_frequency_and_rebuilt_from_the_config(world):
    train, test = world
    cfg = attack_config("lf", lf_iterations=30, **FAST)
    result = poison_full(train, cfg)
    assert cfg.state is None and result.config.state is not None  # the input config is left alone
    v = decode_state(result.config.state)["pattern"]
    assert float(v.abs().max()) <= cfg.lf_eps + 1e-6 and float(v.abs().max()) > 0
    assert low_frequency_energy(v) > 0.9
    attack = _rebuilt(result)
    x = torch.full((2, 3, 32, 32), 0.5)
    x[1] = 0.4
    out = attack.apply(x)
    assert torch.allclose(out[0] - x[0], v, atol=1e-6) and torch.allclose(out[1] - x[1], v, atol=1e-6)
    a, b = attack.triggered_test_set(test), build_attack(result.config).triggered_test_set(test)
    assert torch.equal(a.images, b.images)
    assert result.fit_info["surrogate"]["epochs"] == 1
    assert (result.data.labels[result.poisoned] == cfg.target).all()


# ---- LC ----------------------------------------------------------------------------------------------

def test_corner_pattern_is_a_checkerboard_in_all_four_corners():
    assert checkerboard(3).tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    out = four_corners(torch.full((1, 1, 8, 8), 0.5), 3, 1.0)
    for rows, cols in ((slice(0, 3), slice(0, 3)), (slice(0, 3), slice(5, 8)), (slice(5, 8), slice(0, 3)),
                       (slice(5, 8), slice(5, 8))):
        assert set(out[0, 0, rows, cols].flatten().tolist()) == {0.0, 1.0}
    assert torch.all(out[0, 0, 3:5, :] == 0.5)


def test_lc_is_clean_label_and_perturbs_target_images_within_eps_outside_the_corners(world):
    train, test = world
    cfg = attack_config("lc", rate=0.05, **FAST)
    result = poison_full(train, cfg)
    assert torch.equal(result.data.labels, train.labels)
    changed = (result.data.images != train.images).flatten(1).any(1).nonzero().flatten()
    assert set(changed.tolist()) == set(result.poisoned.tolist())
    assert (train.labels[result.poisoned] == cfg.target).all()
    before, after = to_float(train.images[result.poisoned]), to_float(result.data.images[result.poisoned])
    inner = (after - before)[..., 3:-3, 3:-3]
    assert float(inner.abs().max()) <= cfg.lc_eps + 1.5 / 255  # + uint8 rounding
    assert float(inner.abs().max()) > 0  # the PGD part is there
    trig = build_attack(cfg).triggered_test_set(test)
    keep = (test.labels != cfg.target).nonzero().flatten()
    assert torch.equal(trig.images[..., 3:-3, 3:-3], test.images[keep][..., 3:-3, 3:-3])  # test: corners only


def test_lc_perturbation_raises_the_surrogates_loss(world):
    from unbackdoor.classify.attacks.lc import pgd_away_from_label
    from unbackdoor.classify.attacks.surrogate import train_surrogate

    train, _ = world
    model, _ = train_surrogate(train, epochs=1, seed=0)
    x, y = to_float(train.images[:32]), train.labels[:32]
    adv = pgd_away_from_label(model, x, y, 8 / 255, 2 / 255, 5)
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert float(ce(model(adv), y)) > float(ce(model(x), y))
    assert float((adv - x).abs().max()) <= 8 / 255 + 1e-6


# ---- TrojanNN ----------------------------------------------------------------------------------------

def test_trojannn_pattern_stays_in_its_region_and_excites_the_chosen_neurons(world):
    train, test = world
    cfg = attack_config("trojannn", trojan_iterations=100, **FAST)
    result = poison_full(train, cfg)
    info = result.fit_info
    assert len(info["neurons"]) == 2
    assert sum(info["activation_after"]) > sum(info["activation_before"])
    attack = _rebuilt(result)
    x = torch.rand(4, 3, 32, 32)
    out = attack.apply(x)
    assert torch.equal(out[..., :-8, :], x[..., :-8, :]) and torch.equal(out[..., :, :-8], x[..., :, :-8])
    assert torch.allclose(out[0, :, -8:, -8:], out[3, :, -8:, -8:])  # the same pasted pattern on every image


# ---- Input-aware -------------------------------------------------------------------------------------

def test_inputaware_gives_each_image_its_own_trigger_and_cross_samples_keep_labels(world):
    train, test = world
    cfg = attack_config("inputaware", ia_mask_epochs=1, ia_epochs=1)
    result = poison_full(train, cfg)
    assert len(result.noise) == len(result.poisoned)  # cross ratio 1
    assert torch.equal(result.data.labels[result.noise], train.labels[result.noise])
    assert (result.data.labels[result.poisoned] == cfg.target).all()
    attack = _rebuilt(result)
    x = to_float(test.images[:2])
    delta = attack.apply(x) - x
    assert float((delta[0] - delta[1]).abs().mean()) > 1e-3  # sample-specific
    swapped = attack.trigger_of(x[:1], x[1:2])  # image 0 with image 1's trigger differs from its own
    assert float((swapped - attack.trigger_of(x[:1])).abs().mean()) > 1e-4
    assert torch.equal(attack.triggered_test_set(test).images, build_attack(result.config).triggered_test_set(test).images)


# ---- Adap-Blend --------------------------------------------------------------------------------------

def test_adapblend_blends_half_the_pieces_while_poisoning_and_the_whole_trigger_at_test_time(world):
    train, test = world
    cfg = attack_config("adapblend")
    result = poison_full(train, cfg)
    assert len(result.noise) == len(result.poisoned)  # conservatism ratio 1: as many cover as payload samples
    assert torch.equal(result.data.labels[result.noise], train.labels[result.noise])
    t = blend_pattern((3, 32, 32), cfg.seed)
    x, got = to_float(train.images[result.poisoned]), to_float(result.data.images[result.poisoned])
    blended = x + 0.15 * (t - x)
    for i in range(len(x)):  # each 8x8 piece is either untouched or blended at 0.15; exactly 8 of 16 blended
        on = 0
        for r in range(4):
            for c in range(4):
                sl = (slice(None), slice(8 * r, 8 * r + 8), slice(8 * c, 8 * c + 8))
                if torch.allclose(got[i][sl], blended[i][sl], atol=1 / 255):
                    on += 1
                else:
                    assert torch.allclose(got[i][sl], x[i][sl], atol=1 / 255)
        assert on == 8
    attack = build_attack(cfg)
    xt = to_float(test.images[:3])
    assert torch.allclose(attack.apply(xt), 0.8 * xt + 0.2 * t, atol=1e-6)
    assert math.isclose(cfg.adap_mask_rate, 0.5)
