"""Every file a model folder or a checkpoint names is checked, and lies inside the folder.

Crafted folders: shard indexes naming ``../outside``, absolute paths, missing shards and shards
carrying code; symlinks leading out of a folder; Trainer checkpoints whose optimizer, scheduler
or RNG state carry code; the Hugging Face cache layout (links into ``../../blobs``), which is
allowed. A refusal is an ``UnsafeFileError`` naming the file, never torch's advice to retry with
``weights_only=False``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from .rel_helpers import CodePayload, alpaca_records, tiny_lm
from unbackdoor.core.errors import ModelError, UnsafeFileError
from unbackdoor.core.safeio import check_checkpoint_dir, check_model_folder, hf_pretrained_kwargs, index_files
from unbackdoor.lm.models import load_causal_lm, save_causal_lm


def _no_unsafe_advice(err: BaseException) -> None:
    text = str(err).lower()
    assert "weights_only=false" not in text.replace(" ", "") and "weights_only` set to `false" not in text


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory) -> Path:
    model, tok = tiny_lm()
    return save_causal_lm(model, tok, tmp_path_factory.mktemp("lm") / "model", template="alpaca")


@pytest.fixture
def sharded(tmp_path, saved_lm) -> Path:
    """A copy of the tiny model with its weights split in two safetensors shards and an index."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sharded"
    shutil.copytree(saved_lm, folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in parts.items():
        save_file({k: state[k].contiguous() for k in keys}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _copy_with_link_out(src: Path, dst: Path, name: str, outside: Path) -> Path:
    """A copy of folder ``src`` whose file ``name`` was moved to ``outside`` and replaced by a link to it."""
    shutil.copytree(src, dst)
    (dst / name).rename(outside)
    (dst / name).symlink_to(outside)
    return dst


def _point_index(folder: Path, index: str, new_name: str) -> None:
    data = json.loads((folder / index).read_text())
    first = sorted(data["weight_map"])[0]
    data["weight_map"][first] = new_name
    (folder / index).write_text(json.dumps(data))


def test_a_sharded_folder_loads_and_its_shards_are_the_weights_checked(sharded):
    files = check_model_folder(sharded)
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    model, _ = load_causal_lm(sharded)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("name", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors"])
def test_an_index_naming_a_file_outside_the_folder_is_refused(sharded, tmp_path, name, tally):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(sharded / "model-00001-of-00002.safetensors", outside)
    _point_index(sharded, "model.safetensors.index.json", str(outside) if name == "ABSOLUTE" else name)
    for load in (hf_pretrained_kwargs, load_causal_lm):
        with pytest.raises(UnsafeFileError, match="outside the model folder") as e:
            load(sharded)
        tally("bad_input_cases")
    assert "model.safetensors.index.json" in e.value.where and e.value.fix


def test_an_index_naming_a_missing_shard_or_damaged_is_a_model_error(sharded):
    _point_index(sharded, "model.safetensors.index.json", "model-00003-of-00002.safetensors")
    with pytest.raises(ModelError, match="missing"):
        check_model_folder(sharded)
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": {"a": ' + "[" * 100_000)
    with pytest.raises(ModelError, match="not valid JSON"):
        index_files(sharded / "model.safetensors.index.json")


def _pickle_sharded(tmp_path: Path, saved_lm: Path, marker: Path, *, outside_payload: bool) -> Path:
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(saved_lm, folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    torch.save({k: state[k] for k in names[::2]}, folder / "pytorch_model-00001-of-00002.bin")
    evil = {**{k: state[k] for k in names[1::2]}, "x": CodePayload(marker)}
    evil_path = (tmp_path / "outside.bin") if outside_payload else folder / "pytorch_model-00002-of-00002.bin"
    torch.save(evil, evil_path)
    second = "../outside.bin" if outside_payload else "pytorch_model-00002-of-00002.bin"
    weight_map = {k: "pytorch_model-00001-of-00002.bin" for k in names[::2]} | {k: second for k in names[1::2]}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("outside", [False, True], ids=["shard-with-code", "shard-outside"])
def test_pickled_shards_named_by_an_index_are_scanned_and_never_run(tmp_path, saved_lm, marker, outside, tally):
    folder = _pickle_sharded(tmp_path, saved_lm, marker, outside_payload=outside)
    with pytest.raises(UnsafeFileError) as e:
        load_causal_lm(folder)
    tally("unsafe_payloads")
    assert not marker.exists(), "the payload ran"
    _no_unsafe_advice(e.value)
    assert ("outside the model folder" in str(e.value)) if outside else ("could run code" in str(e.value))


def test_a_weights_symlink_leading_out_of_the_folder_is_refused(tmp_path, saved_lm, tally):
    folder = _copy_with_link_out(saved_lm, tmp_path / "linked", "model.safetensors", tmp_path / "elsewhere.safetensors")
    with pytest.raises(UnsafeFileError, match="is a link to"):
        load_causal_lm(folder)
    tally("bad_input_cases")


def test_the_hugging_face_cache_layout_links_into_its_blobs_and_loads(tmp_path, saved_lm):
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True), blobs.mkdir()
    for i, f in enumerate(sorted(saved_lm.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    assert [p.name for p in check_model_folder(snapshot)] == ["blob" + str(sorted(
        x.name for x in saved_lm.iterdir()).index("model.safetensors"))]
    load_causal_lm(snapshot)


def test_an_adapter_whose_weights_link_outside_is_refused(tmp_path, saved_lm):
    from unbackdoor.lm.models import LoraSettings, attach_lora

    model, tok = load_causal_lm(saved_lm)
    adapter = save_causal_lm(attach_lora(model, LoraSettings(r=2, lora_alpha=4.0)), tok, tmp_path / "adapter")
    outside = tmp_path / "adapter_elsewhere.safetensors"
    (adapter / "adapter_model.safetensors").rename(outside)
    (adapter / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(UnsafeFileError, match="outside the model folder"):
        load_causal_lm(adapter)


# ---- checkpoints a run resumes from --------------------------------------------------------------

@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory) -> Path:
    """A real Hugging Face Trainer checkpoint-2 (rng state, optimizer, scheduler, training args, state)."""
    from unbackdoor.lm.training import SFTConfig, train_sft

    out = tmp_path_factory.mktemp("trainer")
    model, tok = tiny_lm()
    cfg = SFTConfig(learning_rate=1e-3, max_steps=2, save_steps=2, per_device_train_batch_size=4,
                    gradient_accumulation_steps=1, finetune="full")
    train_sft(model, tok, alpaca_records(8), cfg, out)
    return out / "checkpoint-2"


def test_a_genuine_trainer_checkpoint_passes_every_file_checked(trainer_checkpoint):
    names = {p.name for p in check_checkpoint_dir(trainer_checkpoint)}
    assert {"rng_state.pth", "optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin"} <= names


@pytest.mark.parametrize("file", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"])
def test_a_checkpoint_file_carrying_code_is_refused_before_resume(tmp_path, trainer_checkpoint, marker, file, tally):
    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(trainer_checkpoint, ckpt)
    torch.save({"state": {}, "param_groups": [], "x": CodePayload(marker)}, ckpt / file)
    with pytest.raises(UnsafeFileError) as e:
        check_checkpoint_dir(ckpt)
    tally("unsafe_payloads")
    assert file in e.value.where and not marker.exists()
    _no_unsafe_advice(e.value)


def test_resume_refuses_a_hostile_checkpoint_with_a_clear_error(tmp_path, trainer_checkpoint, marker):
    from unbackdoor.lm.training import SFTConfig, train_sft

    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(trainer_checkpoint, out / "checkpoint-2")
    torch.save({"x": CodePayload(marker)}, out / "checkpoint-2" / "optimizer.pt")
    model, tok = tiny_lm()
    cfg = SFTConfig(learning_rate=1e-3, max_steps=4, save_steps=2, per_device_train_batch_size=4,
                    gradient_accumulation_steps=1, finetune="full")
    with pytest.raises(UnsafeFileError, match="optimizer.pt") as e:
        train_sft(model, tok, alpaca_records(8), cfg, out, resume=True)
    assert not marker.exists()
    _no_unsafe_advice(e.value)


def test_training_args_bin_is_never_unpickled_on_resume(tmp_path, trainer_checkpoint, marker):
    """The documented decision: resume rebuilds the arguments; a hostile training_args.bin never runs."""
    from unbackdoor.lm.training import SFTConfig, train_sft

    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(trainer_checkpoint, out / "checkpoint-2")
    torch.save(CodePayload(marker), out / "checkpoint-2" / "training_args.bin")
    check_checkpoint_dir(out / "checkpoint-2")
    model, tok = tiny_lm()
    cfg = SFTConfig(learning_rate=1e-3, max_steps=4, save_steps=2, per_device_train_batch_size=4,
                    gradient_accumulation_steps=1, finetune="full")
    train_sft(model, tok, alpaca_records(8), cfg, out, resume=True)
    assert not marker.exists()


def test_a_checkpoint_symlink_or_damaged_state_is_refused(tmp_path, trainer_checkpoint):
    outside = tmp_path / "opt-elsewhere.pt"
    ckpt = _copy_with_link_out(trainer_checkpoint, tmp_path / "checkpoint-2", "optimizer.pt", outside)
    with pytest.raises(UnsafeFileError, match="outside the model folder"):
        check_checkpoint_dir(ckpt)
    (ckpt / "optimizer.pt").unlink()
    outside.rename(ckpt / "optimizer.pt")
    (ckpt / "trainer_state.json").write_text("[" * 100_000)
    with pytest.raises(ModelError, match="not valid JSON"):
        check_checkpoint_dir(ckpt)


def test_a_classifier_checkpoint_passes_and_a_missing_folder_is_named(tmp_path):
    from unbackdoor.classify.loop import TrainConfig, fit
    from unbackdoor.classify.data import from_arrays

    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    data = from_arrays(x, torch.arange(16) % 2, 2, name="ckpt")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 2))
    fit(net, data, TrainConfig(epochs=1, batch_size=8, augment=False), checkpoint_dir=tmp_path / "ckpt")
    names = {p.name for p in check_checkpoint_dir(tmp_path / "ckpt" / "last")}
    assert {"model.safetensors", "optimizer.safetensors", "state.json"} <= names
    with pytest.raises(ModelError, match="not found"):
        check_checkpoint_dir(tmp_path / "nowhere")
