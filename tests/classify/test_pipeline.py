"""The classifier pipeline: the run-folder contract, the tiny-world demo, the CLI and its errors."""
from __future__ import annotations

import json

import pytest
import torch

from unbackdoor.classify.attacks import attack_config
from unbackdoor.classify.data import ImageData
from unbackdoor.classify.models import preact_resnet_tiny
from unbackdoor.classify.defenses import CLASSIFY_DEFENSES
from unbackdoor.classify.flow import defend_loaded
from unbackdoor.classify.model_io import load_model
from unbackdoor.classify.sources import load_data, save_data
from unbackdoor.classify.testbed import run_tiny_world, tiny_asset_dir
from unbackdoor.cli import main
from unbackdoor.core.errors import ConfigError, DataError

torch.set_num_threads(1)

METRIC_KEYS = {"acc", "asr", "ra", "target_recall", "per_class_acc"}


def _images(n: int, seed: int) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    return ImageData(torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8), labels, 4)


def _check_contract(path, defense: str) -> dict:
    for name in ("config.json", "env.json", "clean_indices.json", "timings.json", "metrics.json", "log.txt",
                 "model/model.safetensors"):
        assert (path / name).is_file(), name
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["kind"] == "classify-defense" and isinstance(cfg["config"], dict)
    m = json.loads((path / "metrics.json").read_text())
    assert m["kind"] == "classify" and m["defense"] == defense
    assert METRIC_KEYS <= set(m["before"]) and METRIC_KEYS | {"der"} <= set(m["after"])
    assert 0.0 <= m["after"]["der"] <= 1.0 and m["seconds"] > 0
    timings = json.loads((path / "timings.json").read_text())
    assert "evaluate" in timings
    return m


def test_run_defense_writes_the_run_folder_contract(tmp_path):
    torch.manual_seed(0)
    model = preact_resnet_tiny(4, width=4)
    clean, test = _images(40, 0), _images(40, 1)
    cfg = CLASSIFY_DEFENSES.get("ft").make_config(overrides={"epochs": 1, "batch_size": 16, "min_clean_per_class": 2})
    meta = {"architecture": "preact_resnet_tiny", "kwargs": {"width": 4}, "num_classes": 4}
    path, metrics = defend_loaded(tmp_path / "run", model, clean, list(range(40)), "ft", cfg, test=test,
                                attack=attack_config("badnets"), seed=0, model_meta=meta)
    m = _check_contract(path, "ft")
    assert m["attack"] == "badnets" and m["seed"] == 0 and m == metrics
    assert json.loads((path / "clean_indices.json").read_text())["indices"] == list(range(40))
    assert "train" in json.loads((path / "timings.json").read_text())
    loaded, _ = load_model(path / "model")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in load_model(path / "model")[0].state_dict().items())


def test_data_round_trips_through_safetensors_and_missing_data_is_named(tmp_path):
    data = _images(12, 3)
    save_data(data, tmp_path / "d.safetensors")
    back = load_data(tmp_path / "d.safetensors")
    assert torch.equal(back.images, data.images) and torch.equal(back.labels, data.labels) and back.num_classes == 4
    with pytest.raises(DataError, match="data not found"):
        load_data(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="unknown classifier defense 'anpp'"):
        CLASSIFY_DEFENSES.get("anpp")


needs_asset = pytest.mark.skipif(not (tiny_asset_dir("badnets", 0) / "model.json").is_file(),
                                 reason="shipped tiny-world checkpoint missing (python scripts/efficacy_classify.py --make-assets)")


@needs_asset
def test_tiny_world_quick_run_produces_the_contract_for_each_defense(tmp_path):
    paths = run_tiny_world(tmp_path, attacks=("badnets",), defenses=("ulrl", "fp"), quick=True,
                           printer=None)
    assert set(paths) == {"badnets/ulrl", "badnets/fp"}
    for key, path in paths.items():
        assert path == tmp_path / key / "seed0"
        m = _check_contract(path, key.split("/")[1])
        assert m["before"]["asr"] > 0.9  # the shipped model carries its backdoor
        assert json.loads((path / "clean_indices.json").read_text())["indices"] == \
            json.loads((paths["badnets/fp"] / "clean_indices.json").read_text())["indices"]  # ONE clean subset
    sel = json.loads((paths["badnets/ulrl"] / "ulrl_selection.json").read_text())
    assert sel["status"] in ("ok", "mad_zero", "no_suspect") and len(sel["scores"]) == 10
    assert (paths["badnets/ulrl"] / "unlearn_trace.json").is_file()


@needs_asset
def test_cli_refuses_to_write_into_the_input_model_folder(tmp_path, capsys):
    model_dir = tiny_asset_dir("badnets", 0)
    rc = main(["classify", "defend", "--model", str(model_dir), "--clean", str(_small_32px_set(tmp_path / "s.safetensors")),
               "--out", str(model_dir / "defended")])
    assert rc == 2 and "inside the input" in capsys.readouterr().err


@needs_asset
def test_cli_rejects_ulrl_flags_for_another_method(tmp_path, capsys):
    rc = main(["classify", "defend", "--model", str(tiny_asset_dir("badnets", 0)), "--clean",
               str(_small_32px_set(tmp_path / "s.safetensors")), "--method", "ft", "--alpha", "0.1",
               "--out", str(tmp_path / "r")])
    assert rc == 2 and "--alpha" in capsys.readouterr().err


def _small_32px_set(path, n: int = 60, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    data = ImageData(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % 10, 10)
    save_data(data, path)
    return path


@needs_asset
def test_cli_defend_then_evaluate(tmp_path, capsys):
    out = tmp_path / "r"
    data = _small_32px_set(tmp_path / "small.safetensors")
    rc = main(["--quiet", "classify", "defend", "--model", str(tiny_asset_dir("badnets", 0)), "--clean", str(data),
               "--method", "ft", "--set", "epochs=1", "--out", str(out)])
    assert rc == 0 and (out / "model" / "model.json").is_file() and (out / "clean_indices.json").is_file()
    capsys.readouterr()
    rc = main(["--quiet", "classify", "evaluate", "--model", str(out / "model"), "--test", str(data),
               "--out", str(tmp_path / "m.json")])
    assert rc == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["attack"] == "badnets" and METRIC_KEYS <= set(m)
