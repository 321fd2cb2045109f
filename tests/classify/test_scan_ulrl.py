"""The ULRL scanner and `unbackdoor scan` on classifiers whose answer is known (the shipped tiny-world models)."""
from __future__ import annotations

import json

import pytest

from unbackdoor.classify.data import stratified_subset
from unbackdoor.classify.model_io import load_classifier
from unbackdoor.classify.testbed import tiny_asset_dir, tiny_world
from unbackdoor.core.errors import ConfigError
from unbackdoor.scan.ulrl import scan_ulrl


@pytest.fixture(scope="module")
def clean300():
    train, _ = tiny_world(0)
    return train.subset(stratified_subset(train, 300, 0))


@pytest.mark.slow
def test_ulrl_scanner_flags_the_backdoored_model_and_names_its_target(clean300):
    model = load_classifier(tiny_asset_dir("badnets", 0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = scan_ulrl(model, clean300, null=[1.0, 2.0, 3.0])
    assert res.verdict is True and res.target == 0 and res.score > 10
    assert res.p_value == pytest.approx(1 / 4)  # above every clean model of the null
    assert all((model.state_dict()[k] == v).all() for k, v in before.items())  # the suspect is never modified


@pytest.mark.slow
def test_ulrl_scanner_finds_nothing_in_the_clean_model(clean300):
    res = scan_ulrl(load_classifier(tiny_asset_dir("clean", 0)), clean300)
    assert res.verdict is False and res.target is None and res.score < 3.5
    assert len(res.evidence["z"]) == 10


@pytest.mark.slow
def test_scan_command_writes_a_scan_folder_and_prints_the_verdict(tmp_path, capsys):
    from unbackdoor.cli import main

    out = tmp_path / "scan"
    rc = main(["--quiet", "scan", "--model", str(tiny_asset_dir("badnets", 0)), "--clean", "tinyworld:0",
               "--clean-count", "300", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "BACKDOORED" in printed and "target class 0" in printed
    rec = json.loads((out / "scan.json").read_text())
    assert rec["verdict"] is True and rec["results"][0]["target"] == 0 and rec["kind"] == "classify"
    assert (out / "scan_ulrl.png").is_file() and rec["images"] == ["scan_ulrl.png"]
    assert rec["class_names"][0] == "disk"
    # rerunning the same command replaces its own folder; an input is never an output
    assert main(["--quiet", "scan", "--model", str(tiny_asset_dir("badnets", 0)), "--clean", "tinyworld:0",
                 "--clean-count", "300", "--out", str(out), "--scanners", "ulrl"]) == 0


def test_scan_refuses_an_output_inside_the_model_and_a_scanner_of_the_other_kind(tmp_path):
    from unbackdoor import api

    model = tiny_asset_dir("badnets", 0)
    with pytest.raises(ConfigError, match="input"):
        api.scan(model, "tinyworld:0", model / "scan")
    with pytest.raises(ConfigError, match="lm models"):
        api.scan(model, "tinyworld:0", tmp_path / "s", scanners=["confguard"], clean_count=100)


def test_report_shows_scan_folders_beside_the_runs(tmp_path):
    from unbackdoor.report import ReportConfig, build_report
    from unbackdoor.scan.flow import COMMAND

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    metrics = {"kind": "classify", "defense": "ft", "variant": None, "attack": "badnets", "seed": 0,
               "before": {"acc": 0.9, "asr": 1.0, "ra": 0.0, "target_recall": 0.9, "per_class_acc": [0.9]},
               "after": {"acc": 0.9, "asr": 0.5, "ra": 0.4, "target_recall": 0.9, "per_class_acc": [0.9], "der": 0.7},
               "seconds": 1.0}
    (run / "metrics.json").write_text(json.dumps(metrics))
    scan = tmp_path / "runs" / "scan"
    scan.mkdir()
    (scan / "scan.json").write_text(json.dumps({
        "unbackdoor_command": COMMAND, "kind": "classify", "sources": {"model": "models/suspect"}, "verdict": True,
        "class_names": ["disk", "square"], "images": [],
        "results": [{"scanner": "ulrl", "verdict": True, "score": 21.5, "threshold": 3.5, "target": 0,
                     "p_value": 0.05, "status": "ok"}]}))
    build_report([tmp_path / "runs"], tmp_path / "report", ReportConfig())
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Scans" in md and "models/suspect" in md and "0 (disk)" in md and "21.500" in md
