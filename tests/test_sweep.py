"""Sweeps: every seed run once, complete seeds skipped on rerun, aggregate.json = mean/std/values per group.

The runner here is a stand-in for the domain pipelines that writes synthetic run folders
(tests/conftest.py); the real pipelines are exercised in tests/test_cli.py.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from conftest import write_synthetic_run
from unbackdoor.core.errors import ConfigError, DataError
from unbackdoor.sweep import SweepConfig, missing_runs, sweep


class FakeLM:
    """Writes one run folder per defense where the LM pipeline would; counts its calls."""

    def __init__(self, skip: tuple[str, ...] = ()):
        self.calls: list[tuple] = []
        self.skip = skip

    def __call__(self, out_dir: Path, *, seed: int, attack: str, task: str, defenses: tuple, quick: bool,
                 echo: bool = True):
        self.calls.append((seed, attack, defenses, quick))
        for d in defenses:
            if d not in self.skip:
                write_synthetic_run(Path(out_dir) / f"{attack}-{task}" / d, kind="lm", attack=attack, defense=d,
                                    seed=seed, task=task)
        return {}


class FakeClassify:
    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, out_dir: Path, *, seed: int, attacks: tuple, defenses: tuple, quick: bool, printer=print):
        self.calls.append((seed, attacks, defenses, quick))
        for a in attacks:
            for d in defenses:
                write_synthetic_run(Path(out_dir) / a / d, kind="classify", attack=a, defense=d, seed=seed, task=None)
        return {}


def test_sweep_runs_every_seed_and_aggregates_mean_std_values(tmp_path: Path):
    fake = FakeLM()
    res = sweep(tmp_path / "sw", SweepConfig(kind="lm", seeds=[0, 1, 2], quick=True), runner=fake)
    assert sorted(c[0] for c in fake.calls) == [0, 1, 2]
    assert all(c[1] == "badnet" and c[2] == ("finetune", "finetune-crow-lr", "crow") and c[3] is True
               for c in fake.calls)
    agg = json.loads(res.aggregate.read_text())
    crow = next(g for g in agg["groups"] if g["defense"] == "crow")
    vals = [json.loads(p.read_text())["after"]["asr"]
            for p in sorted((tmp_path / "sw").glob("seed-*/badnet-refusal/crow/*/metrics.json"))]
    assert len(vals) == 3 and crow["seeds"] == [0, 1, 2]
    assert crow["after"]["asr"]["values"] == vals
    assert crow["after"]["asr"]["mean"] == pytest.approx(statistics.mean(vals))
    assert crow["after"]["asr"]["std"] == pytest.approx(statistics.stdev(vals))
    assert res.report_html is not None and res.report_html.is_file()


def test_rerun_skips_complete_seeds_and_redoes_only_missing_ones(tmp_path: Path):
    out = tmp_path / "sw"
    cfg = SweepConfig(kind="lm", seeds=[0, 1], report=False)
    sweep(out, cfg, runner=FakeLM())
    again = FakeLM()
    res = sweep(out, cfg, runner=again)
    assert again.calls == [] and res.skipped == ["seed 0", "seed 1"]
    # an interrupted run: metrics.json damaged -> that seed runs again, the other does not
    damaged = next(out.glob("seed-1/**/crow/*/metrics.json"))
    damaged.write_text('{"kind": "lm", "defe')
    third = FakeLM()
    res = sweep(out, cfg, runner=third)
    assert [c[0] for c in third.calls] == [1] and res.skipped == ["seed 0"]


def test_classifier_sweep_passes_all_attacks_of_a_seed_in_one_call(tmp_path: Path):
    fake = FakeClassify()
    res = sweep(tmp_path / "sw", SweepConfig(kind="classify", seeds=[3, 4], defenses=["ft", "ulrl"], report=False),
                runner=fake)
    assert fake.calls == [(3, ("badnets", "blended"), ("ft", "ulrl"), False),
                          (4, ("badnets", "blended"), ("ft", "ulrl"), False)]
    agg = json.loads(res.aggregate.read_text())
    assert {(g["attack"], g["defense"]) for g in agg["groups"]} == {
        ("badnets", "ft"), ("badnets", "ulrl"), ("blended", "ft"), ("blended", "ulrl")}
    assert all(g["seeds"] == [3, 4] for g in agg["groups"])


def test_a_pipeline_that_writes_no_metrics_is_an_error_naming_the_gap(tmp_path: Path):
    with pytest.raises(DataError) as e:
        sweep(tmp_path / "sw", SweepConfig(kind="lm", seeds=[0], report=False), runner=FakeLM(skip=("crow",)))
    assert "seed 0: badnet/crow" in e.value.problem


def test_missing_runs_lists_exactly_the_absent_pairs(tmp_path: Path):
    write_synthetic_run(tmp_path / "a", kind="lm", attack="badnet", defense="crow", seed=5)
    write_synthetic_run(tmp_path / "b", kind="lm", attack="badnet", defense="crow", seed=6)  # other seed
    assert missing_runs(tmp_path, "lm", 5, ["badnet", "vpi"], ["crow", "finetune"]) == [
        ("badnet", "finetune"), ("vpi", "crow"), ("vpi", "finetune")]


def test_sweep_config_defaults_per_kind_and_rejects_bad_seeds():
    assert SweepConfig(kind="classify").defenses == ["ft", "fp", "nad", "ulrl"]
    assert SweepConfig(kind="lm").attacks == ["badnet"]
    with pytest.raises(ConfigError, match="seeds"):
        SweepConfig(seeds=[])
    with pytest.raises(ConfigError, match="duplicates"):
        SweepConfig(seeds=[1, 1])
