"""Runs record their clean-data budget and peak memory; a fitted attack's trigger travels with the model."""
from __future__ import annotations

import json

import torch

from unbackdoor.classify.attacks import attack_config, attack_config_from_dict, build_attack
from unbackdoor.classify.data import ImageData
from unbackdoor.classify.defenses import CLASSIFY_DEFENSES
from unbackdoor.classify.flow import defend_loaded
from unbackdoor.classify.loop import TrainConfig
from unbackdoor.classify.models import preact_resnet_tiny
from unbackdoor.classify.victim import train_backdoored
from unbackdoor.core.resources import PeakMemory
from unbackdoor.core.runs import read_json


def _images(n: int, seed: int) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    return ImageData(torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8), torch.arange(n) % 4, 4)


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory() as m:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB
        x += 1
        del x
    assert m.peak_mib >= 48 and "RSS" in m.method


def test_a_defense_run_records_the_clean_budget_and_its_peak_memory(tmp_path):
    torch.manual_seed(0)
    model = preact_resnet_tiny(4, width=4)
    cfg = CLASSIFY_DEFENSES.get("ft").make_config(overrides={"epochs": 1, "batch_size": 16, "min_clean_per_class": 2})
    path, metrics = defend_loaded(tmp_path / "run", model, _images(40, 0), list(range(40)), "ft", cfg,
                                  test=_images(40, 1), attack=attack_config("badnets"), seed=0, clean_pool=400,
                                  model_meta={"architecture": "preact_resnet_tiny", "kwargs": {"width": 4},
                                              "num_classes": 4})
    given = json.loads((path / "threat_model.json").read_text())["given"]
    assert given["clean_samples"] == 40 and given["clean_pool"] == 400 and given["clean_fraction"] == 0.1
    assert metrics["clean_fraction"] == 0.1 and metrics["peak_memory_mib"] >= 0 and metrics["memory_method"]


def test_a_fitted_attacks_trigger_is_recorded_in_model_json_and_rebuilds_the_test_trigger(tmp_path):
    from unbackdoor.classify.tinyworld import make_tiny_world

    train, test = make_tiny_world(0, n_train=200, n_test=40)
    cfg = attack_config("lf", surrogate_epochs=1, lf_iterations=5)
    train_backdoored(train, cfg, "preact_resnet_tiny", TrainConfig(epochs=1, batch_size=64), tmp_path / "m",
                     model_kwargs={"width": 4})
    meta = read_json(tmp_path / "m" / "model.json")
    assert meta["attack"]["state"] and meta["attack_fit"]["surrogate"]["epochs"] == 1
    assert cfg.state is None  # the caller's config is untouched
    recorded = attack_config_from_dict(meta["attack"])
    again = build_attack(recorded).triggered_test_set(test)
    assert torch.equal(again.images, build_attack(attack_config_from_dict(meta["attack"])).triggered_test_set(test).images)
