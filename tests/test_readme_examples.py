"""The Python examples of the README and of docs/python-api.md run as written.

Every ```python block is executed, in order, in a folder holding small stand-ins for the files the
examples name: a tiny Llama at ``models/backdoored`` with ``clean.json`` / ``test.json``, a tiny-world
classifier at ``models/bd`` with ``clean.safetensors`` / ``test.safetensors``, a tiny backdoored Hugging
Face text classifier at ``models/hf-bd`` with ``text/train.json`` / ``text/test.json``, and a user
module's state dict at ``models/net.safetensors`` (class ``byo_nets:SmallNet``).
"""
from __future__ import annotations

import os
import random
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CLASSIFY_TESTS = ROOT / "tests" / "classify"

pytestmark = pytest.mark.slow


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture(scope="module")
def example_folder(tmp_path_factory) -> Path:
    """The files the examples name, small enough to run every example in seconds."""
    from unbackdoor.classify.attacks import attack_config
    from unbackdoor.classify.flow import train_victim
    from unbackdoor.classify.loop import TrainConfig
    from unbackdoor.classify.model_io import save_classifier
    from unbackdoor.classify.models import build_model
    from unbackdoor.classify.sources import save_data
    from unbackdoor.classify.text import TextOptions
    from unbackdoor.classify.tinyworld import make_tiny_world
    from unbackdoor.core import safeio
    from unbackdoor.lm.data import write_alpaca
    from unbackdoor.lm.models import tiny_llama_config
    from unbackdoor.lm.tinyworld import build_tokenizer, generate_records
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(CLASSIFY_TESTS))
    from byo_helpers import text_task, tiny_hf_classifier, write_json
    from byo_nets import SmallNet

    root = tmp_path_factory.mktemp("examples")
    (root / "models").mkdir()
    tok = build_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(tok), hidden_size=32, num_layers=3, num_heads=2,
                                       max_position_embeddings=128)).save_pretrained(root / "models" / "backdoored")
    tok.save_pretrained(root / "models" / "backdoored")
    records = [dict(r) for r in generate_records(12, random.Random(0))]
    write_alpaca(records[:6], root / "clean.json")
    write_alpaca(records[6:], root / "test.json")
    train, test = make_tiny_world(0, n_train=120, n_test=60)
    save_data(train, root / "clean.safetensors")
    save_data(test, root / "test.safetensors")
    model = build_model("preact_resnet_tiny", 10, width=4)
    save_classifier(model, root / "models" / "bd", architecture="preact_resnet_tiny", num_classes=10,
                    kwargs={"width": 4}, extra={"attack": {"name": "badnets"}})
    (root / "text").mkdir()
    write_json(root / "text" / "train.json", text_task(80, 0))
    write_json(root / "text" / "test.json", text_task(40, 1))
    tiny_hf_classifier(root / "hf-init")
    train_victim(root / "text" / "train.json", root / "models" / "hf-bd", attack_config("text-badnet"),
                 train=TrainConfig(epochs=1, batch_size=16, lr=1e-3, optimizer="adamw", augment=False),
                 init_model=root / "hf-init", text_options=TextOptions(label_names=["ordinary", "harmful"]))
    safeio.save_state_dict(SmallNet(num_classes=10, hidden=16).state_dict(), root / "models" / "net.safetensors")
    return root


def _run_blocks(path: Path, folder: Path, monkeypatch) -> None:
    blocks = python_blocks(path)
    assert blocks, f"{path.name} has no python example"
    monkeypatch.chdir(folder)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.syspath_prepend(str(CLASSIFY_TESTS))
    namespace: dict = {"__name__": "__example__"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{path.name} python block {i + 1}", "exec"), namespace)  # noqa: S102
        except Exception as e:  # name the block in the failure
            raise AssertionError(f"{path.name}, python block {i + 1} failed: {type(e).__name__}: {e}") from e


def test_python_api_page_examples_run_as_written(example_folder, monkeypatch):
    _run_blocks(ROOT / "docs" / "python-api.md", example_folder, monkeypatch)
    assert (example_folder / "runs" / "hf-ulrl" / "model" / "config.json").is_file()
    assert (example_folder / "runs" / "net-ft" / "metrics.json").is_file()


def test_readme_examples_run_as_written(example_folder, monkeypatch):
    _run_blocks(ROOT / "README.md", example_folder, monkeypatch)
    os.environ.pop("UNBACKDOOR_QUIET", None)
