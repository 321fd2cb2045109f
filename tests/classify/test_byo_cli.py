"""Bring your own classifier through the command line, as a user would (fresh processes):
a Hugging Face sequence classifier built from a config with text JSON data, a user nn.Module by
import path, a BackdoorBench-layout state dict, and Fashion-MNIST (skipped with the reason when absent)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unbackdoor.classify.fashion_mnist import available as fashion_mnist_available
from unbackdoor.classify.model_io import save_classifier
from unbackdoor.classify.models import PreActResNet, build_model
from unbackdoor.classify.sources import save_data
from unbackdoor.classify.tinyworld import make_tiny_world
from unbackdoor.core import safeio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from byo_helpers import text_task, tiny_hf_classifier, write_json  # noqa: E402

pytestmark = pytest.mark.slow


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "unbackdoor.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900, env=env)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_hf_sequence_classifier_from_a_config_with_text_json(tmp_path):
    tiny_hf_classifier(tmp_path / "init")
    write_json(tmp_path / "train.json", text_task(200, 0))
    write_json(tmp_path / "test.json", text_task(60, 1))
    # backdoor it: finetune the HF model on text JSON poisoned with BadMagic (harmful -> ordinary)
    ok(cli("classify", "attack", "--data", "train.json", "--init-model", "init", "--attack", "text-badnet",
           "--optimizer", "adamw", "--lr", "1e-3", "--epochs", "3", "--batch-size", "16",
           "--label-names", "ordinary,harmful", "--out", "bd", cwd=tmp_path))
    meta = json.loads((tmp_path / "bd" / "model.json").read_text())
    assert meta["format"] == "hf" and meta["attack"]["name"] == "text-badnet"
    assert json.loads((tmp_path / "bd" / "config.json").read_text())["id2label"] == {"0": "ordinary", "1": "harmful"}
    r = ok(cli("classify", "defend", "--model", "bd", "--clean", "train.json", "--clean-count", "40", "--test",
               "test.json", "--method", "ulrl", "--preset", "encoder", "--relearn-epochs", "1",
               "--unlearn-max-epochs", "2", "--out", "run", cwd=tmp_path))
    assert "text-badnet" in r.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["class_names"] == ["ordinary", "harmful"] and 0 <= metrics["after"]["asr"] <= 1
    assert metrics["n"]["triggered"] == 30 and isinstance(metrics["warnings"], list)
    preds = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert preds["class_names"] == ["ordinary", "harmful"] and len(preds["clean"]["after"]) == 60
    sel = json.loads((tmp_path / "run" / "ulrl_selection.json").read_text())
    assert sel["scored"] == "feeding" and sel["layer"] == "bert.pooler.dense"
    out = tmp_path / "run" / "model"  # saved in the format it came in: an HF folder with its tokenizer
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    from unbackdoor.classify.model_formats import load_model

    again, again_meta = load_model(out)
    assert again_meta["class_names"] == ["ordinary", "harmful"] and again_meta["attack"]["name"] == "text-badnet"
    # an HF folder that does not record its attack: ASR needs --attack, and says so
    r = cli("classify", "defend", "--model", "init", "--clean", "train.json", "--test", "test.json", "--method", "ft",
            "--out", "run2", cwd=tmp_path)
    assert r.returncode != 0 and "--attack" in r.stderr and "Traceback" not in r.stderr


def _images(tmp_path: Path) -> None:
    train, test = make_tiny_world(0, n_train=120, n_test=60)
    save_data(train, tmp_path / "clean.safetensors")
    save_data(test, tmp_path / "test.safetensors")


def test_user_module_by_import_path(tmp_path):
    from byo_nets import SmallNet

    _images(tmp_path)
    torch.manual_seed(0)
    safeio.save_state_dict(SmallNet(num_classes=10, hidden=16).state_dict(), tmp_path / "net.safetensors")
    r = ok(cli("classify", "defend", "--model", "net.safetensors", "--model-class", "byo_nets:SmallNet",
               "--model-kwargs", '{"hidden": 16}', "--clean", "clean.safetensors", "--test", "test.safetensors",
               "--attack", "badnets", "--method", "ft", "--epochs", "1", "--min-clean-per-class", "2",
               "--out", "run", cwd=tmp_path))
    assert "badnets" in r.stdout
    out = tmp_path / "run" / "model"
    assert json.loads((out / "model.json").read_text())["model_class"] == "byo_nets:SmallNet"
    again = SmallNet(num_classes=10, hidden=16)
    safeio.load_into(again, out / "model.safetensors")  # the user's own class reads the defended weights
    r = cli("classify", "evaluate", "--model", str(out), "--test", "test.safetensors", "--attack", "badnets",
            cwd=tmp_path)
    assert r.returncode != 0 and "--model-class byo_nets:SmallNet" in r.stderr  # never imported on its own say-so
    ok(cli("classify", "evaluate", "--model", str(out), "--model-class", "byo_nets:SmallNet", "--model-kwargs",
           '{"hidden": 16}', "--test", "test.safetensors", "--attack", "badnets", cwd=tmp_path))


def test_backdoorbench_layout_state_dict(tmp_path):
    _images(tmp_path)
    torch.manual_seed(0)
    net = PreActResNet(10, final_bn=False)  # BackdoorBench's PreActResNet18: width 64, no final BN
    torch.save(net.state_dict(), tmp_path / "bd.pt")  # a plain state dict, as BackdoorBench's code saves it
    ok(cli("classify", "defend", "--model", "bd.pt", "--normalize", "cifar10", "--clean", "clean.safetensors",
           "--test", "test.safetensors", "--attack", "badnets", "--method", "clp", "--out", "run", cwd=tmp_path))
    out = tmp_path / "run" / "model"
    meta = json.loads((out / "model.json").read_text())
    assert meta["format"] == "backdoorbench" and meta["kwargs"]["final_bn"] is False
    assert set(torch.load(out / "model.pt", weights_only=True)) == set(net.state_dict())  # same layout back
    ev = json.loads(ok(cli("classify", "evaluate", "--model", str(out), "--test", "test.safetensors", "--attack",
                           "badnets", cwd=tmp_path)).stdout)
    assert 0 <= ev["acc"] <= 1


@pytest.mark.skipif(not fashion_mnist_available(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist; scripts/setup.sh "
                           "does it where apt-get works)")
def test_fashion_mnist_through_the_classify_commands(tmp_path):
    ok(cli("classify", "poison", "--data", "fashion-mnist", "--attack", "badnets", "--out", "p.safetensors",
           cwd=tmp_path))
    poisoned = safeio.load_state_dict(tmp_path / "p.safetensors")
    assert tuple(poisoned["images"].shape) == (60000, 1, 28, 28)
    assert len(json.loads((tmp_path / "p.poison.json").read_text())["poisoned_indices"]) == 6000
    torch.manual_seed(0)
    model = build_model("preact_resnet_tiny", 10, in_channels=1, mean=(0.286,), std=(0.353,))
    save_classifier(model, tmp_path / "m", architecture="preact_resnet_tiny", num_classes=10,
                    kwargs={"in_channels": 1, "mean": (0.286,), "std": (0.353,)},
                    extra={"attack": {"name": "badnets"}})
    ok(cli("classify", "defend", "--model", "m", "--clean", "fashion-mnist", "--clean-count", "100", "--test",
           "fashion-mnist", "--method", "ft", "--epochs", "1", "--out", "run", cwd=tmp_path))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["class_names"][0] == "T-shirt/top" and metrics["n"]["clean"] == 10000
