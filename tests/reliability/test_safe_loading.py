"""Untrusted files: a pickle that would run code on load is refused in every format the tool
accepts, and the code never runs; repository code never runs unless asked; outputs never go
into an input model's folder."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from .rel_helpers import CodePayload
from unbackdoor.core.errors import ConfigError, UnbackdoorError, UnsafeFileError
from unbackdoor.core.runs import atomic_dir
from unbackdoor.core.safeio import (
    check_output_path, hf_pretrained_kwargs, load_data_pickle, load_into, load_state_dict, remote_code_files,
    save_state_dict,
)


def _write_payload(path: Path, marker: Path, how: str) -> None:
    """A checkpoint that carries a code payload next to real tensors, written the way ``how`` says."""
    state = {"weight": torch.zeros(2, 2), "evil": CodePayload(marker)}
    if how == "torch-zip":
        torch.save(state, path)
    elif how == "torch-legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif how == "nested-state-dict":
        torch.save({"state_dict": state, "epoch": 3}, path)
    elif how == "raw-pickle":
        path.write_bytes(pickle.dumps(state, protocol=2))
    elif how == "raw-pickle-p5":
        path.write_bytes(pickle.dumps(state, protocol=5))
    elif how == "payload-only":
        torch.save(CodePayload(marker), path)
    else:  # pragma: no cover
        raise AssertionError(how)


SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")
HOWS = ("torch-zip", "torch-legacy", "nested-state-dict", "raw-pickle", "raw-pickle-p5", "payload-only")


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("how", HOWS)
def test_code_payload_is_refused_and_never_runs(tmp_path, marker, tally, suffix, how):
    path = tmp_path / f"model{suffix}"
    _write_payload(path, marker, how)
    with pytest.raises(UnsafeFileError) as e:
        load_state_dict(path)
    tally("unsafe_payloads")
    assert not marker.exists(), "the payload ran during loading"
    msg = str(e.value)
    assert "could run code" in msg and path.name in msg and "safetensors" in e.value.fix
    with pytest.raises(UnsafeFileError):
        load_into(torch.nn.Linear(2, 2, bias=False), path)
    assert not marker.exists()


def test_payload_in_a_model_folder_is_refused(tmp_path, marker, tally):
    folder = tmp_path / "model"
    folder.mkdir()
    _write_payload(folder / "pytorch_model.bin", marker, "torch-zip")
    with pytest.raises(UnsafeFileError):
        load_state_dict(folder)
    with pytest.raises(UnsafeFileError):  # scanned before from_pretrained ever sees it
        hf_pretrained_kwargs(folder)
    tally("unsafe_payloads", 2)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_data_pickle_with_payload_is_refused(tmp_path, marker, tally, protocol):
    path = tmp_path / "data_batch_1"
    import numpy as np

    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1],
                                   b"evil": CodePayload(marker)}, protocol=protocol))
    with pytest.raises(UnsafeFileError) as e:
        load_data_pickle(path)
    tally("unsafe_payloads")
    assert not marker.exists()
    assert "exec" in str(e.value) and e.value.where == str(path)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_data_pickle_of_arrays_loads(tmp_path, protocol):
    import numpy as np

    data = {b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072), b"labels": [3, 7],
            b"filenames": [b"a.png", b"b.png"], b"batch_label": b"training batch 1 of 5"}
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    out = load_data_pickle(path)
    assert out[b"labels"] == [3, 7] and np.array_equal(out[b"data"], data[b"data"])


@pytest.mark.parametrize("content", [b"", b"hello world", b"\x80\x04\x95", b"PK\x03\x04 truncated zip"])
def test_damaged_weight_files_are_clear_errors(tmp_path, tally, content):
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"m{suffix}"
        path.write_bytes(content)
        with pytest.raises(UnbackdoorError) as e:
            load_state_dict(path)
        assert not isinstance(e.value, UnsafeFileError), "damage is not an attack: say so"
        assert str(path) == e.value.where and e.value.fix
        tally("bad_input_cases")


def test_truncated_checkpoint_is_a_clear_error(tmp_path, tally):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(64, 64)}, good)
    raw = good.read_bytes()
    st = tmp_path / "good.safetensors"
    save_state_dict({"w": torch.randn(64, 64)}, st)
    st_raw = st.read_bytes()
    for frac in (0.1, 0.5, 0.9, 0.99):
        for name, blob in (("t.pt", raw), ("t.safetensors", st_raw)):
            path = tmp_path / name
            path.write_bytes(blob[: int(len(blob) * frac)])
            with pytest.raises(UnbackdoorError) as e:
                load_state_dict(path)
            assert e.value.where == str(path)
            tally("bad_input_cases")


def test_non_tensor_checkpoint_is_refused_by_name(tmp_path, tally):
    path = tmp_path / "m.pt"
    torch.save({"lr": 0.1, "epoch": 3}, path)
    with pytest.raises(UnbackdoorError, match="state_dict"):
        load_state_dict(path)
    torch.save({}, path)
    with pytest.raises(UnbackdoorError, match="state_dict"):
        load_state_dict(path)
    tally("bad_input_cases", 2)


def test_missing_files_and_folders_are_named(tmp_path, tally):
    with pytest.raises(UnbackdoorError, match="not found") as e:
        load_state_dict(tmp_path / "nope.pt")
    assert "nope.pt" in e.value.where
    with pytest.raises(UnbackdoorError, match="no weights file") as e:
        load_state_dict(tmp_path)
    assert "model.safetensors" in e.value.fix
    tally("bad_input_cases", 2)


def test_weights_that_do_not_fit_the_model_are_named(tmp_path, tally):
    path = save_state_dict({"weight": torch.zeros(3, 3)}, tmp_path / "m.safetensors")
    with pytest.raises(UnbackdoorError, match="do not fit") as e:
        load_into(torch.nn.Linear(2, 2, bias=False), path)
    assert "architecture" in e.value.fix
    tally("bad_input_cases")


def test_trust_remote_code_is_off_unless_asked(tmp_path):
    assert hf_pretrained_kwargs(tmp_path)["trust_remote_code"] is False
    assert hf_pretrained_kwargs(tmp_path, trust_remote_code=True)["trust_remote_code"] is True


def test_remote_code_is_detected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "m.M"}}))
    (tmp_path / "m.py").write_text("raise SystemExit")
    assert remote_code_files(tmp_path) == ["config.json: auto_map", "m.py"]


@pytest.mark.parametrize("rel", [".", "sub", "sub/deeper", "./sub/../other"])
def test_output_inside_the_input_is_refused(tmp_path, tally, rel):
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(ConfigError, match="inside the input") as e:
        check_output_path(model / rel, tmp_path / "x", model)
    assert "outside" in e.value.fix
    tally("bad_input_cases")


def test_output_through_a_symlink_into_the_input_is_refused(tmp_path, tally):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "alias").symlink_to(model)
    with pytest.raises(ConfigError):
        check_output_path(tmp_path / "alias" / "out", model)
    assert check_output_path(tmp_path / "elsewhere", model) == (tmp_path / "elsewhere").resolve()
    tally("bad_input_cases")


def test_atomic_dir_refuses_to_replace_a_file(tmp_path, tally):
    (tmp_path / "out").write_text("precious")
    with pytest.raises(UnbackdoorError, match="a file of that name"):
        with atomic_dir(tmp_path / "out"):
            pass
    assert (tmp_path / "out").read_text() == "precious"
    tally("bad_input_cases")


# ---- through the domain loaders -----------------------------------------------------------------

def _lm_folder_with_payload(tmp_path: Path, marker: Path) -> Path:
    from .rel_helpers import save_tiny_lm

    good = save_tiny_lm(tmp_path / "good")
    evil = tmp_path / "evil"
    evil.mkdir()
    for f in good.iterdir():
        if f.suffix != ".safetensors":
            (evil / f.name).write_bytes(f.read_bytes())
    state = load_state_dict(good / "model.safetensors")
    torch.save({**state, "lm_head.evil": CodePayload(marker)}, evil / "pytorch_model.bin")
    return evil


def test_lm_folder_with_a_pickle_payload_is_refused(tmp_path, marker, tally):
    from unbackdoor.lm.models import load_causal_lm

    evil = _lm_folder_with_payload(tmp_path, marker)
    with pytest.raises(UnsafeFileError) as e:
        load_causal_lm(evil)
    tally("unsafe_payloads")
    assert not marker.exists() and "pytorch_model.bin" in str(e.value)


def test_lm_adapter_with_a_pickle_payload_is_refused(tmp_path, marker, tally):
    from .rel_helpers import save_tiny_lm
    from unbackdoor.lm.models import LoraSettings, attach_lora, load_causal_lm

    base = save_tiny_lm(tmp_path / "base")
    model, tok = load_causal_lm(base)
    peft_model = attach_lora(model, LoraSettings())
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = tmp_path / "adapter"
    weights = {k: v.clone() for k, v in load_state_dict(adapter / "adapter_model.safetensors").items()}
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({**weights, "evil": CodePayload(marker)}, adapter / "adapter_model.bin")
    with pytest.raises(UnsafeFileError):
        load_causal_lm(base, adapter=adapter)
    tally("unsafe_payloads")
    assert not marker.exists()


def test_lm_folder_with_remote_code_does_not_run_it(tmp_path, tally):
    """``auto_map`` + a ``modeling_*.py`` that would write a marker on import: never imported by default."""
    from .rel_helpers import save_tiny_lm
    from unbackdoor.lm.models import load_causal_lm

    folder = save_tiny_lm(tmp_path / "remote")
    marker = tmp_path / "REMOTE_CODE_RAN"
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n")
    tally("unsafe_payloads")
    try:
        model, _ = load_causal_lm(folder)
    except UnbackdoorError:
        pass  # refusing is fine too
    else:
        assert type(model).__name__ == "LlamaForCausalLM"  # the built-in class, not the folder's
    assert not marker.exists(), "repository code ran without --trust-remote-code"
    assert remote_code_files(folder) == ["config.json: auto_map", "modeling_evil.py"]


def test_classifier_weights_that_are_a_pickle_are_refused(tmp_path, marker, tally):
    from unbackdoor.classify.models import build_model
    from unbackdoor.classify.model_io import load_classifier, save_classifier

    folder = save_classifier(build_model("preact_resnet_tiny", 4), tmp_path / "clf", architecture="preact_resnet_tiny",
                             num_classes=4)
    state = {k: v.clone() for k, v in load_state_dict(folder / "model.safetensors").items()}  # not the mmap
    # a pickle where the safetensors file should be (and a .pt next to it): neither may run
    torch.save({**state, "evil": CodePayload(marker)}, folder / "model.safetensors")
    torch.save({**state, "evil": CodePayload(marker)}, folder / "model.pt")
    with pytest.raises(UnbackdoorError):
        load_classifier(folder)
    tally("unsafe_payloads")
    assert not marker.exists()


def test_cifar_batch_with_a_payload_is_refused(tmp_path, marker, tally):
    import numpy as np

    from unbackdoor.classify.data import load_cifar10

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / name).write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1],
                                                    b"x": CodePayload(marker)}, protocol=2))
    for train in (True, False):
        with pytest.raises(UnsafeFileError) as e:
            load_cifar10(tmp_path, train=train)
        tally("unsafe_payloads")
        assert not marker.exists() and "batch" in e.value.where


def test_defend_refuses_to_write_inside_the_input_model(tmp_path, tally):
    from .rel_helpers import alpaca_records, save_tiny_lm
    from unbackdoor.lm.defenses.crow import CrowConfig
    from unbackdoor.lm.flow import defend as defend_model

    model = save_tiny_lm(tmp_path / "lm", num_layers=3)
    (tmp_path / "clean.json").write_text(json.dumps(alpaca_records(8)))
    before = sorted(p.name for p in model.rglob("*"))
    for out, relation in ((model, "is"), (model / "defended", "lies inside"), (model / "a" / "b", "lies inside"),
                          (tmp_path, "contains")):
        with pytest.raises(ConfigError, match=f"{relation} the input"):
            defend_model(model, tmp_path / "clean.json", out, "crow", CrowConfig(max_steps=1))
        tally("bad_input_cases")
    assert sorted(p.name for p in model.rglob("*")) == before


def test_attack_refuses_to_write_inside_the_input_model(tmp_path, tally):
    from .rel_helpers import alpaca_records, save_tiny_lm
    from unbackdoor.lm.flow import attack_model
    from unbackdoor.lm.training import SFTConfig

    model = save_tiny_lm(tmp_path / "lm")
    (tmp_path / "train.json").write_text(json.dumps(alpaca_records(8)))
    before = sorted(p.name for p in model.rglob("*"))
    with pytest.raises(ConfigError, match="inside the input"):
        attack_model(model, tmp_path / "train.json", model / "attacked", SFTConfig(max_steps=1))
    tally("bad_input_cases")
    assert sorted(p.name for p in model.rglob("*")) == before
