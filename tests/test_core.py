"""Core machinery: typed configs, atomic writes, safe loading, aggregation."""
from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path
from typing import Literal, Optional

import pytest
import torch

from unbackdoor.core.config import check_positive, from_dict, load_config, option, parse_overrides, to_dict
from unbackdoor.core.errors import ConfigError, UnbackdoorError, UnsafeFileError
from unbackdoor.core.runs import RunDir, atomic_dir, atomic_write_json, read_json
from unbackdoor.core.safeio import check_output_path, load_state_dict, save_state_dict
from unbackdoor.core.stats import aggregate, mean_std


@dataclasses.dataclass
class Inner:
    r: int = option(8, "rank")


@dataclasses.dataclass
class Cfg:
    alpha: float = option(5.5, "weight")
    steps: int = option(10, "steps")
    mode: Literal["lora", "full"] = option("lora", "mode")
    name: Optional[str] = option(None, "name")
    layers: list[int] = option(factory=list, help="layers")
    inner: Inner = option(factory=Inner, help="nested")

    def __post_init__(self):
        check_positive(self, "steps")


def test_unknown_key_is_named_with_suggestion():
    with pytest.raises(ConfigError) as e:
        from_dict(Cfg, {"alpah": 1.0})
    assert "alpah" in str(e.value) and "alpha" in str(e.value)


def test_ill_typed_key_is_named():
    with pytest.raises(ConfigError) as e:
        from_dict(Cfg, {"steps": "ten"})
    assert "steps" in str(e.value) and "int" in str(e.value)
    with pytest.raises(ConfigError):
        from_dict(Cfg, {"mode": "qlora"})
    with pytest.raises(ConfigError):
        from_dict(Cfg, {"steps": True})


def test_out_of_range_value_is_refused():
    with pytest.raises(ConfigError) as e:
        from_dict(Cfg, {"steps": 0})
    assert "steps" in str(e.value)


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("alpha: 11\ninner:\n  r: 4\nlayers: [1, 2]\n")
    cfg = load_config(Cfg, p, ["steps=3", "inner.r=16", "name=x"])
    assert cfg.alpha == 11.0 and isinstance(cfg.alpha, float)
    assert cfg.steps == 3 and cfg.inner.r == 16 and cfg.layers == [1, 2] and cfg.name == "x"
    assert to_dict(cfg)["inner"] == {"r": 16}
    with pytest.raises(ConfigError):
        load_config(Cfg, p, ["inner.rank=3"])


def test_parse_overrides_needs_equals():
    assert parse_overrides(["a.b=1e-3"]) == {"a": {"b": 1e-3}}
    with pytest.raises(ConfigError):
        parse_overrides(["alpha"])


def test_atomic_dir_keeps_previous_output_on_failure(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as d:
        (d / "w.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            (d / "w.txt").write_text("half")
            raise RuntimeError("killed")
    assert (out / "w.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_json_round_trip(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": torch.tensor(1.5), "p": Path("x")})
    assert read_json(tmp_path / "m.json") == {"a": 1.5, "p": "x"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_run_dir_records_phases(tmp_path):
    run = RunDir(tmp_path / "run").start(Cfg(), seed=3, kind="test")
    with run.phase("train"):
        pass
    run.write_metrics({"asr": 0.1})
    run.close()
    assert (tmp_path / "run" / "config.json").is_file()
    assert read_json(tmp_path / "run" / "env.json")["seed"] == 3
    assert "train" in read_json(tmp_path / "run" / "timings.json")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    bad = tmp_path / "model.pt"
    bad.write_bytes(pickle.dumps({"w": payload}))
    with pytest.raises(UnsafeFileError) as e:
        load_state_dict(bad)
    assert "refused" in str(e.value)
    assert not marker.exists()


def test_safetensors_round_trip_and_truncation(tmp_path):
    sd = {"w": torch.randn(3, 4), "b": torch.zeros(3)}
    path = save_state_dict(sd, tmp_path / "m.safetensors")
    back = load_state_dict(path)
    assert torch.equal(back["w"], sd["w"])
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(UnbackdoorError):
        load_state_dict(path)


def test_output_inside_input_is_refused(tmp_path):
    with pytest.raises(UnbackdoorError):
        check_output_path(tmp_path / "in" / "out", tmp_path / "in")
    check_output_path(tmp_path / "out", tmp_path / "in")


def test_aggregate_mean_std():
    agg = aggregate([{"asr": 0.0, "acc": 0.9}, {"asr": 0.2, "acc": 0.8}])
    assert agg["asr"]["mean"] == pytest.approx(0.1)
    assert agg["acc"]["std"] == pytest.approx(mean_std([0.9, 0.8])[1])


def test_aggregate_does_not_count_nan():
    agg = aggregate([{"asr": float("nan")}, {"asr": 0.5}])
    assert agg["asr"]["n"] == 1 and agg["asr"]["mean"] == 0.5


def test_relative_to_checkout_strips_only_paths_under_the_root(tmp_path):
    from unbackdoor.core.runs import relative_to_checkout

    root = tmp_path / "repo"
    rec = {"model": str(root / "src" / "m"), "argv": ["x.py", "--cache", str(root / "runs" / "c")],
           "sibling": str(tmp_path / "repo2" / "y"), "outside": "/elsewhere/z", "n": 3}
    got = relative_to_checkout(rec, root)
    assert got == {"model": "src/m", "argv": ["x.py", "--cache", "runs/c"], "sibling": str(tmp_path / "repo2" / "y"),
                   "outside": "/elsewhere/z", "n": 3}
    assert rec["model"] == str(root / "src" / "m")  # the input is not modified
    home = tmp_path / "home"
    rec = {"base": str(home / ".cache" / "m"), "model": str(root / "m"), "other": str(tmp_path / "x")}
    assert relative_to_checkout(rec, root, home=home) == {"base": "~/.cache/m", "model": "m",
                                                          "other": str(tmp_path / "x")}
