"""Baselines at equal learning rate: the finetuning control follows CROW's settings wherever it runs."""
from __future__ import annotations

import pytest

from unbackdoor.core.config import load_config, to_dict
from unbackdoor.core.defense import DefenseSpec, Linked, resolve_links
from unbackdoor.core.errors import ConfigError
from unbackdoor.lm.defenses.finetune import OFFICIAL_LR_RATIO
from unbackdoor.lm.flow import resolve_defense
from unbackdoor.lm.testbed import DEFAULT_DEFENSES, TinyRunConfig, tiny_run_config
from unbackdoor.lm.training import FinetuneConfig


def _steps(c):
    return (c.num_train_epochs, c.max_steps, c.per_device_train_batch_size, c.gradient_accumulation_steps,
            str(c.lr_scheduler_type), c.warmup_steps, c.finetune, c.lora.r)


def test_lm_defend_control_takes_crows_paper_lr_and_steps_and_the_baseline_its_ratio():
    _, crow, _ = resolve_defense("crow")
    _, control, preset = resolve_defense("finetune-crow-lr")
    _, official, _ = resolve_defense("finetune", preset="official")
    _, default, _ = resolve_defense("finetune")
    assert preset == "crow-lr" and control.learning_rate == crow.learning_rate == 1e-3
    assert official.learning_rate == default.learning_rate == 2e-4 == OFFICIAL_LR_RATIO * crow.learning_rate
    assert _steps(control) == _steps(official) == _steps(default) == _steps(crow)
    _, flagged, _ = resolve_defense("finetune-crow-lr", overrides={"learning_rate": 5e-4})
    assert flagged.learning_rate == 5e-4  # flags still win


def test_tiny_world_control_follows_the_worlds_crow_including_overrides():
    cfg = load_config(TinyRunConfig, None, ["defense.crow.learning_rate=0.005", "defense.crow.num_train_epochs=10"],
                      base=to_dict(tiny_run_config()))
    _, crow, _ = cfg.defense_config("crow", "demo")
    _, control, _ = cfg.defense_config("finetune-crow-lr", "demo")
    _, official, _ = cfg.defense_config("finetune", "demo")
    assert control.learning_rate == crow.learning_rate == 5e-3 and official.learning_rate == pytest.approx(1e-3)
    assert control.num_train_epochs == official.num_train_epochs == 10.0
    assert tuple(DEFAULT_DEFENSES) == ("finetune", "finetune-crow-lr", "crow")


def test_tiny_world_presets_apply_after_the_budget_and_full_name_overrides_last():
    cfg = tiny_run_config()
    _, released, _ = cfg.defense_config("crow-released", "demo")
    assert released.epsilon == 0.0 and released.alpha == 11.0  # the budget's epsilon 0.1 does not undo the preset
    cfg.defense = {"finetune": {"weight_decay": 0.1}, "finetune-crow-lr": {"learning_rate": 3e-3}}
    _, control, _ = cfg.defense_config("finetune-crow-lr", "demo")
    _, official, _ = cfg.defense_config("finetune", "demo")
    assert control.learning_rate == 3e-3 and control.weight_decay == official.weight_decay == 0.1
    assert official.learning_rate == pytest.approx(0.2 * 2e-3)


def test_links_resolve_scaled_and_name_what_is_wrong():
    values = {"learning_rate": Linked("crow", "learning_rate", 0.2), "lora": {"r": Linked("crow", "r")}, "x": 1}
    got = resolve_links(values, lambda name: {"learning_rate": 1e-3, "r": 8})
    assert got == {"learning_rate": 2e-4, "lora": {"r": 8}, "x": 1}  # exactly 2e-4, not 2.0000000000000004e-4
    with pytest.raises(ConfigError, match="no such field"):
        resolve_links({"a": Linked("crow", "nope")}, lambda name: {"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="no settings of other defenses"):
        resolve_links({"a": Linked("crow", "learning_rate")}, None)


def test_a_tiny_world_link_cycle_is_a_config_error(monkeypatch):
    from unbackdoor.lm import testbed

    loop = DefenseSpec(name="finetune", kind="lm", config=FinetuneConfig, run=lambda *a: None, summary="",
                       budgets={"demo": {"learning_rate": Linked("finetune", "learning_rate")}})
    real_get = testbed.LM_DEFENSES.get
    monkeypatch.setattr(testbed.LM_DEFENSES, "get", lambda name: loop if name == "finetune" else real_get(name))
    with pytest.raises(ConfigError, match="link back"):
        tiny_run_config().defense_config("finetune", "demo")
