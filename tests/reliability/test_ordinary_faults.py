"""Ordinary faults are clear errors, not "probably a bug", and what was silently accepted is refused or
announced: the file system (read-only, full, over quota, a file where a folder belongs, no permission),
hostile text (a lone surrogate, JSON nested thousands deep, a decompression-bomb image, a chat template
the sandbox stops), damaged models (mis-shaped or missing weights, a ``num_classes`` of the wrong shape)
and data that does not fit (records longer than the context, 1-channel images for a 3-channel model,
an empty class folder, class folders in another order than the model's classes).

A full disk leaves the earlier output as it was. The file-system faults are injected (``OSError`` with
the errno the kernel gives), so the tests need neither root nor a real full disk.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from .rel_helpers import alpaca_records, save_tiny_lm, tiny_lm
from unbackdoor.cli import main
from unbackdoor.core import runs
from unbackdoor.core.errors import DataError, FileSystemError, ModelError, os_error
from unbackdoor.core.runs import RunDir, atomic_dir, atomic_write_json, read_json


# ---- the file system ---------------------------------------------------------------------------------

FS_FAULTS = [  # errno, words the message must hold
    (errno.EROFS, "read-only"), (errno.ENOSPC, "no space left"), (errno.EDQUOT, "quota"),
    (errno.EACCES, "permission denied"), (errno.ENOTDIR, "is a file"), (errno.EISDIR, "is a folder"),
    (errno.ENAMETOOLONG, "too long"),
]


@pytest.mark.parametrize("code,words", FS_FAULTS, ids=[errno.errorcode[c] for c, _ in FS_FAULTS])
def test_os_errors_become_file_system_errors_with_where_and_fix(tmp_path, code, words, tally):
    target = tmp_path / "out.json"
    err = os_error(OSError(code, os.strerror(code), str(tmp_path / ".out.json.pid1-h.x.tmp")), target)
    tally("bad_input_cases")
    assert isinstance(err, FileSystemError) and words in err.problem.lower()
    assert err.where == str(target) and err.fix  # the path the user gave, not our temporary name


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_full_disk_keeps_the_earlier_file_and_folder_intact(tmp_path, monkeypatch, code, tally):
    out = tmp_path / "metrics.json"
    atomic_write_json(out, {"run": 1})
    folder = tmp_path / "model"
    with atomic_dir(folder) as d:
        (d / "w.bin").write_bytes(b"old")

    def full(*_a, **_k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(runs.os, "fsync", full)
    with pytest.raises(FileSystemError) as e:
        atomic_write_json(out, {"run": 2})
    assert str(out) == e.value.where
    monkeypatch.undo()
    with pytest.raises(FileSystemError):
        with atomic_dir(folder) as d:
            (d / "w.bin").write_bytes(b"new")
            raise OSError(code, os.strerror(code), str(d / "w.bin"))  # e.g. save_pretrained ran out of space
    tally("bad_input_cases", 2)
    assert read_json(out) == {"run": 1} and (folder / "w.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model"]  # no temporary left behind


def test_an_input_problem_inside_atomic_dir_is_not_blamed_on_the_output(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_dir(tmp_path / "model"):
            open(tmp_path / "missing-input.bin", "rb")


def test_an_out_path_that_is_a_file_is_a_clear_error(tmp_path, tally):
    blocker = tmp_path / "results"
    blocker.write_text("an existing file")
    for make in (lambda: RunDir(blocker), lambda: RunDir(blocker / "run"),
                 lambda: atomic_write_json(blocker / "m.json", {}), lambda: atomic_dir(blocker / "m").__enter__()):
        with pytest.raises(FileSystemError, match="results is a file") as e:
            make()
        tally("bad_input_cases")
        assert e.value.fix
    assert blocker.read_text() == "an existing file"


@pytest.fixture
def good_data(tmp_path) -> Path:
    path = tmp_path / "clean.json"
    path.write_text(json.dumps(alpaca_records(6)))
    return path


def test_cli_read_only_and_full_disk_exit_2_naming_the_output(tmp_path, good_data, monkeypatch, capsys, tally):
    # read-only: creating the temporary file fails; full disk: flushing it does
    for code, where, words in ((errno.EROFS, "tempfile.mkstemp", "read-only"), (errno.ENOSPC, "os.fsync", "no space left")):
        def refuse(*_a, **_k):
            raise OSError(code, os.strerror(code))

        module, name = where.split(".")
        monkeypatch.setattr(getattr(runs, module), name, refuse)
        rc = main(["--quiet", "lm", "poison", "--data", str(good_data), "--out", str(tmp_path / "o.json")])
        err = capsys.readouterr().err
        monkeypatch.undo()
        tally("bad_input_cases")
        assert rc == 2 and words in err and "o.json" in err and "fix:" in err and "probably a bug" not in err, err
    assert not (tmp_path / "o.json").exists()


def test_cli_out_under_a_file_exits_2(tmp_path, good_data, capsys):
    (tmp_path / "f").write_text("x")
    rc = main(["--quiet", "lm", "poison", "--data", str(good_data), "--out", str(tmp_path / "f" / "o.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "is a file" in err and "probably a bug" not in err, err


def test_an_unmapped_os_error_still_gets_where_and_fix(tmp_path):
    err = os_error(OSError(errno.EIO, "Input/output error"), tmp_path / "x")
    assert "Input/output error" in err.problem and err.fix


# ---- hostile text ----------------------------------------------------------------------------------------

SURROGATE = '[{"instruction": "say \\ud800 now", "input": "", "output": "1"}]'
DEEP = "[" * 200_000 + "]" * 200_000


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("content,words", [(SURROGATE, "lone surrogate"), (DEEP, "nested too deeply")],
                         ids=["lone-surrogate", "deeply-nested"])
def test_hostile_json_data_is_a_data_error_naming_the_place(tmp_path, suffix, content, words, tally):
    from unbackdoor.lm.data import read_alpaca

    path = tmp_path / f"data{suffix}"
    path.write_text(content if suffix == ".json" else content.strip("[]") if content is SURROGATE else content)
    with pytest.raises(DataError, match=words) as e:
        read_alpaca(path)
    tally("bad_input_cases")
    assert str(path) in e.value.where and e.value.fix
    if content is SURROGATE:
        assert "record 0" in e.value.where and "instruction" in e.value.where


@pytest.mark.parametrize("content,words", [(SURROGATE, "lone surrogate"), (DEEP, "nested too deeply"),
                                           ('{"a": 1,', "not valid JSON")])
def test_hostile_json_files_read_by_the_toolkit_are_clear_errors(tmp_path, content, words, tally):
    path = tmp_path / "model.json"
    path.write_text(content)
    with pytest.raises(DataError, match=words):
        read_json(path)
    tally("bad_input_cases")


def test_in_memory_records_with_a_lone_surrogate_are_refused():
    from unbackdoor.lm.data import check_records

    with pytest.raises(DataError, match="lone surrogate"):
        check_records([{"instruction": "x\udc80", "output": "y"}])


def test_a_decompression_bomb_image_is_refused_before_decoding(tmp_path, monkeypatch, tally):
    from PIL import Image

    from unbackdoor.classify.data import load_image_folder

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the same check as for a 90-megapixel bomb
    for side in (40, 64):  # 1600 px: Pillow only warns; 4096 px: Pillow refuses
        root = tmp_path / f"bomb{side}"
        (root / "cat").mkdir(parents=True)
        Image.new("RGB", (side, side)).save(root / "cat" / "big.png")
        with pytest.raises(DataError, match="decompression bomb") as e:
            load_image_folder(root)
        tally("bad_input_cases")
        assert "big.png" in e.value.where


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% for m in %}",
    "{{ raise_exception('refused by the template') }}",
], ids=["sandbox-mro", "sandbox-globals", "syntax", "raise_exception"])
def test_a_chat_template_the_sandbox_stops_is_a_model_error(template, tally):
    from unbackdoor.lm.data import format_prompt

    _, tok = tiny_lm()
    tok.chat_template = template
    with pytest.raises(ModelError, match="chat template") as e:
        format_prompt(alpaca_records(1)[0], "chat", tok)
    tally("bad_input_cases")
    assert "alpaca" in e.value.fix


# ---- damaged models --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("lm") / "model")


def _edit_weights(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_mis_shaped_lm_weights_are_a_model_error(tmp_path, lm_folder, tally):
    from unbackdoor.lm.models import load_causal_lm

    def widen(state):
        k = next(k for k in sorted(state) if k.endswith("up_proj.weight"))
        state[k] = torch.zeros(state[k].shape[0] + 3, state[k].shape[1])

    with pytest.raises(ModelError, match="cannot load"):
        load_causal_lm(_edit_weights(lm_folder, tmp_path / "mis", widen))
    tally("bad_input_cases")


def test_a_checkpoint_missing_lm_head_is_refused_not_filled_at_random(tmp_path, lm_folder, tally):
    from unbackdoor.lm.models import load_causal_lm

    with pytest.raises(ModelError, match="lm_head.weight") as e:
        load_causal_lm(_edit_weights(lm_folder, tmp_path / "headless", lambda s: s.pop("lm_head.weight")))
    tally("bad_input_cases")
    assert "at random" in e.value.problem and "tie_word_embeddings" in e.value.fix


def test_mis_shaped_classifier_weights_are_a_model_error(tmp_path):
    from unbackdoor.classify.models import build_model
    from unbackdoor.classify.model_io import load_classifier, save_classifier
    from unbackdoor.core.safeio import load_state_dict, save_state_dict

    folder = save_classifier(build_model("preact_resnet_tiny", 4), tmp_path / "clf",
                             architecture="preact_resnet_tiny", num_classes=4)
    state = load_state_dict(folder / "model.safetensors")
    state["linear.weight"] = torch.zeros(7, state["linear.weight"].shape[1])
    save_state_dict(state, folder / "model.safetensors")
    with pytest.raises(ModelError, match="do not fit"):
        load_classifier(folder)


@pytest.mark.parametrize("value", [torch.tensor([4, 4]), torch.tensor(4.0), torch.zeros(2, 2, dtype=torch.long),
                                   torch.tensor(True), "4"], ids=["two-values", "float", "matrix", "bool", "string"])
def test_num_classes_of_the_wrong_shape_or_type_is_a_data_error(value, tally):
    from unbackdoor.classify.data import from_saved_tensors

    state = {"images": torch.zeros(4, 3, 8, 8, dtype=torch.uint8), "labels": torch.zeros(4, dtype=torch.long),
             "num_classes": value}
    with pytest.raises(DataError, match="num_classes") as e:
        from_saved_tensors(state, "set.safetensors")
    tally("bad_input_cases")
    assert "num_classes" in e.value.where
    state["num_classes"] = torch.tensor(4)
    assert from_saved_tensors(state, "set.safetensors").num_classes == 4


# ---- data that does not fit ---------------------------------------------------------------------------------

def test_records_longer_than_the_context_are_cut_with_a_warning_that_counts_them(caplog):
    from unbackdoor.lm.data import build_sft_features

    _, tok = tiny_lm()
    recs = alpaca_records(4)
    recs[1] = {**recs[1], "output": " ".join(["alpha"] * 80)}
    recs[3] = {**recs[3], "output": " ".join(["beta"] * 80)}
    with caplog.at_level(logging.WARNING, logger="unbackdoor"):
        feats = build_sft_features(recs, tok, max_length=48)
    assert max(len(f["input_ids"]) for f in feats) == 48
    msgs = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(msgs) == 1 and "truncated 2 of 4 records" in msgs[0] and "[1, 3]" in msgs[0]


def test_one_channel_images_for_a_three_channel_model_are_refused_in_evaluation(tally):
    from unbackdoor.classify.evaluate import evaluate_classifier
    from unbackdoor.classify.models import build_model, check_images_fit

    model = build_model("preact_resnet_tiny", 4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()
    gray = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    labels = torch.arange(8) % 4
    with pytest.raises(DataError, match="1 channel"):
        evaluate_classifier(model, gray.float() / 255, labels, gray.float() / 255, labels, target=0, num_classes=4)
    with pytest.raises(DataError, match="1 channel"):
        check_images_fit(model, gray, "test data")
    check_images_fit(model, gray.expand(-1, 3, -1, -1).contiguous(), "test data")
    tally("bad_input_cases", 2)


def _image_tree(root: Path, classes: dict[str, int]) -> Path:
    from PIL import Image

    for c, n in classes.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(root / c / f"{i}.png")
    return root


def test_an_empty_class_folder_is_refused(tmp_path, tally):
    from unbackdoor.classify.data import load_image_folder

    with pytest.raises(DataError, match="hold no image") as e:
        load_image_folder(_image_tree(tmp_path / "d", {"cat": 2, "dog": 0, "emu": 1}))
    tally("bad_input_cases")
    assert e.value.where.endswith("dog") and "renumber" in e.value.fix


def test_class_folders_are_aligned_to_the_classes_the_model_recorded(tmp_path, caplog, tally):
    from unbackdoor.classify.data import align_classes, load_image_folder

    data = load_image_folder(_image_tree(tmp_path / "d", {"cat": 2, "dog": 1}))
    assert align_classes(data, None) is data and align_classes(data, ["cat", "dog"]) is data
    with caplog.at_level(logging.WARNING, logger="unbackdoor"):
        aligned = align_classes(data, ["dog", "emu", "cat"], "test data")
    assert aligned.labels.tolist() == [2, 2, 0] and aligned.num_classes == 3
    assert aligned.class_names == ["dog", "emu", "cat"] and any("relabelled" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match="not classes of the model"):
        align_classes(data, ["airplane", "dog"], "test data")
    tally("bad_input_cases")


def test_cli_maps_any_os_error_it_meets_to_exit_2(tmp_path, good_data, monkeypatch, capsys):
    """Beyond our writers (e.g. an unreadable input): the command line's one mapping of OSError."""
    real = Path.read_text

    def unreadable(self, *a, **k):
        if self == good_data:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", unreadable)
    rc = main(["--quiet", "lm", "poison", "--data", str(good_data), "--out", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "permission denied" in err and str(good_data) in err and "probably a bug" not in err, err
