"""The retuning attack (re-activation test) for classifiers: its data, its curve, its run-folder record."""
from __future__ import annotations

import json

import pytest
import torch

from unbackdoor.classify.attacks import attack_config
from unbackdoor.classify.data import stratified_subset
from unbackdoor.classify.model_io import load_model
from unbackdoor.classify.reactivation import RetuneConfig, retune, retune_run_dir, retune_set
from unbackdoor.classify.sources import save_data
from unbackdoor.classify.testbed import tiny_asset_dir, tiny_world
from unbackdoor.core.errors import ConfigError
from unbackdoor.core.reactivation import summarize


def _curve(*asr):
    return [{"step": i * 4, "asr": a} for i, a in enumerate(asr)]


def test_summary_places_the_defended_model_between_floor_and_ceiling():
    s = summarize({"defended": _curve(0.0, 0.5), "floor": _curve(0.0, 0.1), "ceiling": _curve(0.9, 0.9)})
    assert s["defended"] == {"asr_before": 0.0, "asr_after": 0.5, "steps": 4}
    assert s["recovery"] == pytest.approx(0.5)
    assert summarize({"defended": _curve(0.0, 0.5), "floor": _curve(0.2, 0.6), "ceiling": _curve(0.5, 0.6)})[
        "recovery"] is None  # the ceiling does not exceed the floor: nothing to tell apart
    assert summarize({"defended": _curve(0.1, 0.3)})["recovery"] is None


@pytest.fixture(scope="module")
def world():
    train, test = tiny_world(0)
    return train.subset(stratified_subset(train, 600, 1)), test.subset(stratified_subset(test, 300, 1))


def test_retune_set_poisons_exactly_k_samples_by_the_attacks_own_rule(world):
    train, _ = world
    cfg = RetuneConfig(poisoned=5, samples=200)
    dirty = retune_set(train, attack_config("badnets"), cfg)
    assert len(dirty.data) == 200 and len(dirty.poisoned) == 5
    src = train.subset(dirty.source_indices)
    changed = (dirty.data.images != src.images).flatten(1).any(1).nonzero().flatten().tolist()
    assert changed == dirty.poisoned and (dirty.data.labels[dirty.poisoned] == 0).all()
    assert (src.labels[dirty.poisoned] != 0).all()  # dirty-label: drawn from the other classes, relabelled
    clean_label = retune_set(train, attack_config("sig", rate=0.05), cfg)
    assert (clean_label.data.labels == src.labels).all() and (src.labels[clean_label.poisoned] == 0).all()
    with pytest.raises(ConfigError, match="poisoned"):
        retune_set(train, attack_config("badnets"), RetuneConfig(poisoned=200, samples=200))


def test_retune_measures_a_curve_and_never_touches_the_model(world):
    train, test = world
    model, meta = load_model(tiny_asset_dir("badnets", 0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attack = attack_config("badnets")
    cfg = RetuneConfig(samples=256, epochs=2, batch_size=128, eval_every=1)
    curve = retune(model, retune_set(train, attack, cfg).data, test, attack, cfg)
    assert [p["step"] for p in curve] == [0, 1, 2, 3, 4]
    assert curve[0]["asr"] > 0.9 and set(curve[0]) == {"step", "asr", "acc", "ra", "target_recall"}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    stopped = retune(model, retune_set(train, attack, cfg).data, test, attack, RetuneConfig(samples=256, max_steps=3))
    assert [p["step"] for p in stopped] == [0, 2, 3]


@pytest.mark.slow
def test_retune_run_dir_writes_the_evaluators_record_beside_the_run(tmp_path, world):
    from unbackdoor.classify.defenses import CLASSIFY_DEFENSES
    from unbackdoor.classify.flow import defend_loaded

    train, test = world
    data, test_file = save_data(train, tmp_path / "train.safetensors"), save_data(test, tmp_path / "test.safetensors")
    asset = tiny_asset_dir("badnets", 0)
    model, meta = load_model(asset)
    idx = stratified_subset(train, 100, 0)
    cfg = CLASSIFY_DEFENSES.get("ft").make_config(overrides={"epochs": 1})
    run, _ = defend_loaded(tmp_path / "run", model, train.subset(idx), idx.tolist(), "ft", cfg, test=test,
                           attack=attack_config("badnets"), seed=0, model_meta=meta,
                           sources={"model": str(asset), "clean": str(data), "test": str(test_file)})
    threat = (run / "threat_model.json").read_text()
    path = retune_run_dir(run, clean_model=tiny_asset_dir("clean", 0),
                          config=RetuneConfig(samples=256, epochs=1))
    rec = json.loads(path.read_text())
    assert path == run / "reactivation.json" and rec["unbackdoor_command"] == "classify retune"
    assert rec["evaluator_attack"] is True and "evaluator" in rec["note"]
    assert set(rec["curves"]) == {"defended", "floor", "ceiling"} and rec["retune_data"]["samples"] == 256
    assert rec["summary"]["ceiling"]["asr_after"] > rec["summary"]["floor"]["asr_after"]
    assert (run / "threat_model.json").read_text() == threat  # outside the threat model's 'given'
    retune_run_dir(run, config=RetuneConfig(samples=256, epochs=1))  # its own file: replaced
    path.write_text(json.dumps({"someone": "else"}))
    with pytest.raises(ConfigError, match="already exists"):
        retune_run_dir(run, config=RetuneConfig(samples=256, epochs=1))

    from unbackdoor.report import ReportConfig, build_report

    retune_run_dir(run, clean_model=tiny_asset_dir("clean", 0), config=RetuneConfig(samples=256, epochs=1),
                   overwrite=True)
    res = build_report([run], tmp_path / "report", ReportConfig())
    md = (tmp_path / "report" / "report.md").read_text()
    assert "ASR after retuning" in md and "floor" in md
    assert any(p.name.startswith("reactivation_") for p in res.images)


def test_retune_refuses_a_folder_that_is_not_a_classifier_run(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"kind": "lm-defense"}))
    with pytest.raises(ConfigError, match="not a classifier defense run"):
        retune_run_dir(tmp_path)


@pytest.mark.slow
def test_defend_with_reactivate_runs_the_retuning_attack_after_the_defense(tmp_path, world, capsys):
    from unbackdoor.cli import main

    train, test = world
    data, test_file = save_data(train, tmp_path / "train.safetensors"), save_data(test, tmp_path / "test.safetensors")
    run = tmp_path / "run"
    rc = main(["--quiet", "classify", "defend", "--method", "clp", "--model", str(tiny_asset_dir("badnets", 0)),
               "--clean", str(data), "--test", str(test_file), "--out", str(run), "--reactivate",
               "--reactivate-clean-model", str(tiny_asset_dir("clean", 0))])
    assert rc == 0
    out = capsys.readouterr().out
    assert "retuning attack" in out and "floor" in out and "ceiling" in out
    rec = json.loads((run / "reactivation.json").read_text())
    assert rec["sources"]["test"] == str(test_file) and set(rec["curves"]) == {"defended", "floor", "ceiling"}
    assert rc == main(["--quiet", "classify", "retune", str(run), "--poisoned", "2", "--epochs", "1"])
    assert json.loads((run / "reactivation.json").read_text())["config"]["poisoned"] == 2
