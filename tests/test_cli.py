"""The ``unbackdoor`` command as a user drives it: help everywhere, configs, clean errors, end to end."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unbackdoor.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None
        ) -> subprocess.CompletedProcess:
    """Run ``python -m unbackdoor.cli ARGS`` in a fresh process, as a user would."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "unbackdoor.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=e)


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [prefix]
    out = [prefix] if prefix else []
    for action in subs:
        for name, child in action.choices.items():
            out += _command_paths(child, prefix + (name,))
    return out


def test_top_level_help_and_version():
    r = cli("--help")
    assert r.returncode == 0 and "examples:" in r.stdout
    for cmd in ("report", "sweep", "demo"):
        assert cmd in r.stdout
    v = cli("--version")
    assert v.returncode == 0 and v.stdout.startswith("unbackdoor ")


@pytest.mark.parametrize("command", ["report", "sweep", "demo"])
def test_subcommand_help_in_a_fresh_process(command: str):
    r = cli(command, "--help")
    assert r.returncode == 0, r.stderr
    assert "examples:" in r.stdout and f"unbackdoor {command}" in r.stdout
    assert "--config" in r.stdout and "--set" in r.stdout


def test_every_subcommand_has_help_with_examples():
    paths = _command_paths(build_parser())
    assert ("report",) in paths and ("sweep",) in paths and ("demo",) in paths
    missing = []
    for path in paths:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main([*path, "--help"]) == 0, path
        if "example" not in out.getvalue().lower():
            missing.append(" ".join(path))
    assert not missing, f"--help without examples: {missing}"


def test_unknown_config_key_exits_2_naming_the_key_without_traceback(synthetic_runs: Path, tmp_path: Path):
    r = cli("report", str(synthetic_runs), "--out", str(tmp_path / "rep"), "--set", "digitz=2")
    assert r.returncode == 2
    assert "digitz" in r.stderr and "did you mean 'digits'" in r.stderr
    assert "Traceback" not in r.stderr
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("title: x\nmax_generation: 3\n")
    r = cli("report", str(synthetic_runs), "--out", str(tmp_path / "rep"), "--config", str(bad_yaml))
    assert r.returncode == 2 and "max_generation" in r.stderr and str(bad_yaml) in r.stderr
    assert "Traceback" not in r.stderr


def test_ill_typed_and_out_of_range_values_are_named(synthetic_runs: Path, tmp_path: Path):
    r = cli("report", str(synthetic_runs), "--out", str(tmp_path / "rep"), "--set", "digits=many")
    assert r.returncode == 2 and "'digits'" in r.stderr and "Traceback" not in r.stderr
    r = cli("sweep", "--out", str(tmp_path / "sw"), "--seeds", "1", "1")
    assert r.returncode == 2 and "seeds" in r.stderr and "duplicates" in r.stderr and "Traceback" not in r.stderr


def _decimals(md: str) -> set[int]:
    """How many decimals the table cells of a Markdown report show."""
    import re

    return {len(frac) for frac in re.findall(r"\| -?\d+\.(\d+) ± \d", md)}


def test_config_file_then_set_then_flags(synthetic_runs: Path, tmp_path: Path):
    cfg = tmp_path / "report.yaml"
    cfg.write_text("title: From YAML\ndigits: 1\nmax_generations: 1\n")
    r = cli("report", str(synthetic_runs), "--out", str(tmp_path / "a"), "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "a" / "report.md").read_text()
    assert md.startswith("# From YAML") and _decimals(md) == {1}
    assert "1 of 2 examples of finetune, seed 0" in md  # max_generations from the file
    r = cli("report", str(synthetic_runs), "--out", str(tmp_path / "b"), "--config", str(cfg),
            "--set", "title=From set", "--digits", "4")
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "b" / "report.md").read_text()
    assert md.startswith("# From set")  # --set beats the file
    assert _decimals(md) == {4}  # the flag beats the file


def test_user_errors_exit_2_and_bugs_exit_1_with_a_debug_hint(tmp_path: Path):
    r = cli("report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "rep"))
    assert r.returncode == 2 and r.stderr.startswith("error: path not found") and "fix:" in r.stderr
    assert "Traceback" not in r.stderr
    bug = ("import sys, unbackdoor.report.build as b\n"
           "def boom(*a, **k): raise ZeroDivisionError('simulated bug')\n"
           "b.build_report = boom\n"
           "from unbackdoor.cli import main\n"
           "sys.exit(main(sys.argv[1:]))\n")
    args = ["report", str(tmp_path), "--out", str(tmp_path / "rep")]
    r = subprocess.run([sys.executable, "-c", bug, *args], capture_output=True, text=True)
    assert r.returncode == 1 and "ZeroDivisionError: simulated bug" in r.stderr and "--debug" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-c", bug, *args, "--debug"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" in r.stderr  # --debug after the subcommand works too


def test_report_command_writes_the_report(synthetic_runs: Path, tmp_path: Path):
    r = cli("--quiet", "report", str(synthetic_runs), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    assert "report.html" in r.stdout and (tmp_path / "rep" / "report.html").is_file()
    assert "6 plot(s), 12 run(s)" in r.stdout


def test_the_yaml_examples_in_the_docs_are_valid_configs():
    import re

    import yaml

    from unbackdoor.core.config import from_dict
    from unbackdoor.lm.defenses.crow import CrowConfig
    from unbackdoor.sweep import SweepConfig

    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "cli.md").read_text(), re.S)
    assert len(blocks) == 2
    assert from_dict(CrowConfig, yaml.safe_load(blocks[0])).alpha == 11.0
    assert from_dict(SweepConfig, yaml.safe_load(blocks[1])).kind == "classify"


# ---- end to end on the real tiny worlds (quick settings) ---------------------------------------------

LM_DEFENSES = {"finetune", "finetune-crow-lr", "crow"}  # the official baseline, the equal-lr control, CROW
CLASSIFY_RUNS = {(a, d) for a in ("badnets", "blended") for d in ("ft", "fp", "nad", "ulrl", "ulrl-kept")}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """``unbackdoor demo --quick`` once for this module (both tiny worlds, seed 0)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, cli("--quiet", "demo", "--quick", "--out", str(out), timeout=900)


def _metrics(root: Path) -> dict[tuple[str, str, int], dict]:
    from unbackdoor.report import find_run_dirs

    out = {}
    for d in find_run_dirs([root]):
        m = json.loads((d / "metrics.json").read_text())
        out[(m["attack"], m["defense"], m["seed"])] = m
    return out


def _assert_row(text: str, name: str, values: list[float]) -> None:
    """The first table row of ``text`` named ``name`` shows ``values`` (3 decimals), in order."""
    row = next(line.split() for line in text.splitlines() if line.split()[:1] == [name])
    cells = row[2:]  # after the model name and the seed
    assert cells[:len(values)] == [f"{v:.3f}" for v in values], (row, values)


@pytest.mark.slow
def test_demo_writes_valid_run_folders_tables_and_a_report_that_loads(demo_run, chromium: str, tmp_path: Path):
    from conftest import assert_report_loads
    from unbackdoor.report import find_run_dirs, validate_run_dir

    out, r = demo_run
    assert r.returncode == 0, r.stderr[-3000:]
    lm, cls = _metrics(out / "lm"), _metrics(out / "classify")
    assert {d for _, d, _ in lm} == LM_DEFENSES and {(a, d) for a, d, _ in cls} == CLASSIFY_RUNS
    for d in find_run_dirs([out]):
        assert validate_run_dir(d) == [], d
    # the printed tables are the saved metrics, read back
    crow = lm[("badnet", "crow", 0)]["after"]
    ulrl = cls[("blended", "ulrl", 0)]["after"]
    _assert_row(r.stdout, "crow", [crow[k] for k in ("asr", "strict_asr", "triggered_utility", "clean_utility",
                                                    "false_trigger_rate", "target_loss")])
    _assert_row(r.stdout.split("classify: blended")[1], "ulrl", [ulrl[k] for k in ("acc", "asr", "ra", "target_recall",
                                                                                  "der")])
    assert "lm: badnet / refusal" in r.stdout and "classify: blended" in r.stdout
    report = out / "report"
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert {"asr_utility_lm.png", "asr_utility_classify.png", "layer_cosine_lm-badnet-refusal-crow.png",
            "ulrl_selection_classify-badnets-ulrl.png", "unlearn_trace_classify-blended-ulrl.png"} <= set(pngs)
    assert str(report / "report.html") in r.stdout
    assert_report_loads(chromium, report / "report.html", len(pngs), tmp_path)


@pytest.mark.slow
def test_same_config_and_seed_reproduce_the_metrics(demo_run, tmp_path: Path):
    from unbackdoor.classify.testbed import run_tiny_world as classify_world
    from unbackdoor.lm.testbed import run_tiny_world as lm_world

    out, r = demo_run
    assert r.returncode == 0, r.stderr[-3000:]
    # from scratch in a new folder: world, pretraining, backdoor, defenses
    lm_world(tmp_path / "lm", seed=0, quick=True, echo=False)
    classify_world(tmp_path / "classify", seed=0, attacks=("badnets",), defenses=("ulrl",), quick=True,
                   printer=None)
    first, again = _metrics(out / "lm"), _metrics(tmp_path / "lm")
    assert again.keys() == first.keys()
    for key in first:
        assert (again[key]["before"], again[key]["after"]) == (first[key]["before"], first[key]["after"]), key
    first, again = _metrics(out / "classify"), _metrics(tmp_path / "classify")
    for key in again:
        assert (again[key]["before"], again[key]["after"]) == (first[key]["before"], first[key]["after"]), key


@pytest.mark.slow
def test_lm_from_poison_to_report_through_the_cli(demo_run, tmp_path: Path):
    """A user's chain on the tiny world's files: poison + attack -> defend (CROW) -> report."""
    from unbackdoor.report import validate_run_dir

    out, r = demo_run
    assert r.returncode == 0, r.stderr[-3000:]
    world = out / "lm" / "_world" / "seed0"
    steps = [
        ("lm", "attack", "--model", world / "pretrained", "--data", world / "data" / "attack.json", "--poison",
         "--attack", "badnet", "--task", "refusal", "--merge", "--max-steps", "4", "--out", tmp_path / "bd"),
        ("lm", "defend", "--method", "crow", "--model", tmp_path / "bd" / "model", "--clean",
         world / "data" / "clean.json", "--test", world / "data" / "test.json", "--attack", "badnet", "--task",
         "refusal", "--max-steps", "3", "--max-new-tokens", "8", "--out", tmp_path / "runs" / "crow"),
        ("report", tmp_path / "runs", "--out", tmp_path / "report"),
    ]
    for step in steps:
        res = cli("--quiet", *map(str, step))
        assert res.returncode == 0, (step[:2], res.stderr[-3000:])
    assert validate_run_dir(tmp_path / "runs" / "crow") == []
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| crow | 0 |" in md and "layer_cosine_lm-badnet-refusal-crow.png" in md


@pytest.mark.slow
def test_sweep_command_runs_the_lm_pipeline_over_seeds_and_resumes(tmp_path: Path):
    out = tmp_path / "sweep"
    first = cli("--quiet", "sweep", "--kind", "lm", "--seeds", "0", "1", "--quick", "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "ran 2, skipped 0" in first.stdout
    agg = json.loads((out / "aggregate.json").read_text())
    crow = next(g for g in agg["groups"] if g["defense"] == "crow")
    assert crow["seeds"] == [0, 1] and len(crow["after"]["asr"]["values"]) == 2
    assert (out / "report" / "report.html").is_file()
    again = cli("--quiet", "sweep", "--kind", "lm", "--seeds", "0", "1", "--quick", "--out", str(out))
    assert again.returncode == 0 and "ran 0, skipped 2" in again.stdout


# ---- the Python API mirrors the command line --------------------------------------------------------

def test_api_report_takes_keyword_overrides_checked_like_a_config_file(synthetic_runs: Path, tmp_path: Path):
    from unbackdoor import api
    from unbackdoor.core.errors import ConfigError

    res = api.report(synthetic_runs, tmp_path / "rep", title="API report", digits=2)
    assert res.markdown.read_text().startswith("# API report")
    with pytest.raises(ConfigError, match="digitz"):
        api.report(synthetic_runs, tmp_path / "rep", digitz=2)
    with pytest.raises(ConfigError, match="'digits'"):
        api.report(synthetic_runs, tmp_path / "rep", api.ReportConfig(), digits="two")


@pytest.mark.slow
def test_api_defends_your_own_models_into_valid_run_folders(demo_run, tmp_path: Path):
    from unbackdoor import api
    from unbackdoor.classify.testbed import tiny_asset_dir

    out, r = demo_run
    assert r.returncode == 0, r.stderr[-3000:]
    world = out / "lm" / "_world" / "seed0" / "data"
    run = api.defend_lm(out / "lm" / "badnet-refusal" / "_backdoored" / "seed0" / "model", world / "clean.json",
                        tmp_path / "crow", method="crow", test=world / "test.json", max_steps=2, alpha=11.0)
    assert api.validate_run_dir(run) == []
    assert json.loads((run / "config.json").read_text())["config"]["alpha"] == 11.0
    model = tiny_asset_dir("badnets", 0)  # the shipped checkpoint, or the one the demo trained and cached
    model = model if (model / "model.json").is_file() else out / "classify" / "models" / "tinyworld-badnets-seed0"
    run = api.defend_classifier(model, "tinyworld:0", tmp_path / "ft", method="ft",
                                clean_count=100, epochs=1, test="tinyworld:0")
    assert api.validate_run_dir(run) == []
    m = json.loads((run / "metrics.json").read_text())
    assert m["defense"] == "ft" and len(json.loads((run / "clean_indices.json").read_text())["indices"]) == 100
