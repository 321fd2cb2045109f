"""Outputs never destroy inputs, a run folder is never a mix of two runs, --resume refuses changed settings.

One rule (``core.paths.check_outputs``) for every command of both kinds and the API: an output may
not be, contain, or lie inside any input; an empty path is an error; an existing output that this
command did not write needs ``--overwrite``. Run folders are staged beside their final name and
swapped in whole (``core.runs.staged_run``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from .rel_helpers import alpaca_records, save_tiny_lm, tiny_images
from unbackdoor.cli import main
from unbackdoor.core.errors import ConfigError, NumericalError, UnbackdoorError


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a digest of its bytes: what 'untouched' means."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs of every kind: an LM folder, a LoRA adapter on it, Alpaca files, a classifier, image sets."""
    from unbackdoor.classify.model_io import save_classifier
    from unbackdoor.classify.models import build_model
    from unbackdoor.classify.sources import save_data
    from unbackdoor.lm.models import LoraSettings, attach_lora, load_causal_lm, save_causal_lm

    root = tmp_path_factory.mktemp("outputs")
    lm = save_tiny_lm(root / "models" / "lm")
    model, tok = load_causal_lm(lm)
    save_causal_lm(attach_lora(model, LoraSettings(r=2)), tok, root / "models" / "adapter")
    (root / "clean.json").write_text(json.dumps(alpaca_records(8)))
    (root / "test.json").write_text(json.dumps(alpaca_records(12)[8:]))
    torch.manual_seed(0)
    save_classifier(build_model("preact_resnet_tiny", 4, width=2), root / "models" / "clf",
                    architecture="preact_resnet_tiny", num_classes=4, kwargs={"width": 2})
    save_classifier(build_model("preact_resnet_tiny", 4, width=2), root / "other",
                    architecture="preact_resnet_tiny", num_classes=4, kwargs={"width": 2})
    save_data(tiny_images(40, size=8), root / "images.safetensors")
    (root / "not-ours").mkdir()
    (root / "not-ours" / "notes.txt").write_text("a user's own file")
    return root


def _cases(r: Path) -> list[tuple[str, list[str], str, Path]]:
    """(id, argv, the words the error must hold, the input that must stay byte-identical)."""
    lm_def = ["lm", "defend", "--model", str(r / "models" / "lm"), "--clean", str(r / "clean.json"), "--max-steps", "1"]
    clf_def = ["classify", "defend", "--model", str(r / "models" / "clf"), "--clean", str(r / "images.safetensors"),
               "--method", "ft", "--epochs", "1", "--min-clean-per-class", "1"]
    return [
        ("classify-defend-out-is-the-models-parent", [*clf_def, "--out", str(r / "models")], "contains the input",
         r / "models"),
        ("classify-defend-out-inside-model", [*clf_def, "--out", str(r / "models" / "clf" / "run")],
         "lies inside the input", r / "models"),
        ("lm-evaluate-out-is-the-test-file", ["lm", "evaluate", "--model", str(r / "models" / "lm"), "--test",
                                              str(r / "test.json"), "--out", str(r / "test.json")], "is the input",
         r / "test.json"),
        ("classify-evaluate-out-is-model-json", ["classify", "evaluate", "--model", str(r / "models" / "clf"), "--test",
                                                 str(r / "images.safetensors"),
                                                 "--out", str(r / "models" / "clf" / "model.json")],
         "lies inside the input", r / "models"),
        ("classify-poison-out-is-the-data", ["classify", "poison", "--data", str(r / "images.safetensors"), "--out",
                                             str(r / "images.safetensors")], "is the input", r / "images.safetensors"),
        ("classify-poison-over-another-models-weights", ["classify", "poison", "--data", str(r / "images.safetensors"),
                                                        "--out", str(r / "other" / "model.safetensors")],
         "already exists", r / "other"),
        ("lm-defend-adapter-out-is-its-base", ["lm", "defend", "--model", str(r / "models" / "adapter"), "--clean",
                                               str(r / "clean.json"), "--max-steps", "1", "--out",
                                               str(r / "models" / "lm")], "is the input", r / "models"),
        ("lm-poison-out-is-the-data", ["lm", "poison", "--data", str(r / "clean.json"), "--out", str(r / "clean.json")],
         "is the input", r / "clean.json"),
        ("lm-attack-out-inside-the-model", ["lm", "attack", "--model", str(r / "models" / "lm"), "--data",
                                            str(r / "clean.json"), "--max-steps", "1", "--out",
                                            str(r / "models" / "lm" / "bd")], "lies inside the input", r / "models"),
        ("lm-defend-empty-out", [*lm_def, "--out", ""], "is empty", r / "models"),
        ("classify-defend-empty-out", [*clf_def, "--out", ""], "is empty", r / "models"),
        ("lm-poison-empty-out", ["lm", "poison", "--data", str(r / "clean.json"), "--out", ""], "is empty",
         r / "clean.json"),
        ("lm-defend-into-a-folder-it-did-not-write", [*lm_def, "--out", str(r / "not-ours")], "already exists",
         r / "not-ours"),
        ("classify-defend-into-a-folder-it-did-not-write", [*clf_def, "--out", str(r / "not-ours")], "already exists",
         r / "not-ours"),
        ("sweep-into-a-folder-it-did-not-write", ["sweep", "--kind", "classify", "--seeds", "0", "--quick", "--out",
                                                  str(r / "not-ours")], "already exists", r / "not-ours"),
        ("demo-into-a-folder-it-did-not-write", ["demo", "--quick", "--out", str(r / "not-ours")], "already exists",
         r / "not-ours"),
    ]


CASE_IDS = [c[0] for c in _cases(Path("/x"))]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_an_output_that_would_destroy_an_input_is_refused_and_nothing_changes(case_id, world, capsys, tally):
    _, argv, words, untouched = next(c for c in _cases(world) if c[0] == case_id)
    before = _tree(untouched) if untouched.is_dir() else {untouched.name: hashlib.sha256(untouched.read_bytes()).hexdigest()}
    rc = main(["--quiet", *argv])
    err = capsys.readouterr().err
    tally("bad_input_cases")
    assert rc == 2, err[-2000:]
    assert words in err and "fix:" in err and "Traceback" not in err, err[-2000:]
    after = _tree(untouched) if untouched.is_dir() else {untouched.name: hashlib.sha256(untouched.read_bytes()).hexdigest()}
    assert after == before


def test_the_report_may_not_write_into_a_run_folder(world, tmp_path, capsys):
    assert main(["--quiet", "classify", "evaluate", "--model", str(world / "models" / "clf"), "--test",
                 str(world / "images.safetensors")]) == 0  # (evaluation prints; nothing written)
    run = tmp_path / "run"
    assert main(["--quiet", "classify", "defend", "--model", str(world / "models" / "clf"), "--clean",
                 str(world / "images.safetensors"), "--method", "ft", "--epochs", "1", "--min-clean-per-class", "1",
                 "--test", str(world / "images.safetensors"), "--out", str(run)]) == 0
    capsys.readouterr()
    before = _tree(run)
    assert main(["--quiet", "report", str(run), "--out", str(run / "report")]) == 2
    assert "lies inside the input" in capsys.readouterr().err and _tree(run) == before
    assert main(["--quiet", "report", str(run), "--out", str(tmp_path / "report")]) == 0


def test_overwrite_replaces_what_the_command_did_not_write_and_reruns_need_no_flag(world, tmp_path, capsys):
    target = tmp_path / "metrics.json"
    target.write_text('{"a user": "file"}')
    argv = ["--quiet", "classify", "evaluate", "--model", str(world / "models" / "clf"), "--test",
            str(world / "images.safetensors"), "--out", str(target)]
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(target.read_text())["unbackdoor_command"] == "classify evaluate"
    assert main(argv) == 0  # its own earlier output: replaced without --overwrite


def test_the_api_applies_the_same_rule(world):
    from unbackdoor import api

    with pytest.raises(ConfigError, match="contains the input"):
        api.defend_classifier(world / "models" / "clf", world / "images.safetensors", world / "models", method="ft")
    with pytest.raises(ConfigError, match="is empty"):
        api.defend_lm(world / "models" / "lm", world / "clean.json", "", method="finetune", max_steps=1)
    with pytest.raises(ConfigError, match="is the input"):
        api.evaluate_lm(world / "models" / "lm", world / "test.json", out=world / "test.json")
    with pytest.raises(ConfigError, match="is the input"):
        api.poison_classifier_data(world / "images.safetensors", world / "images.safetensors")


def test_a_rerun_that_fails_midway_leaves_the_previous_complete_run_untouched(world, tmp_path):
    from unbackdoor import api

    out = tmp_path / "run"
    common = dict(method="ft", test=world / "images.safetensors", epochs=1, min_clean_per_class=1)
    api.defend_classifier(world / "models" / "clf", world / "images.safetensors", out, **common)
    before = _tree(out)
    with pytest.raises(NumericalError):  # diverges in its first step, after config/env/indices were written
        api.defend_classifier(world / "models" / "clf", world / "images.safetensors", out,
                              **{**common, "lr": 1e30, "batch_size": 8, "seed": 1})
    assert _tree(out) == before  # old files only: no new config.json beside old metrics
    assert (tmp_path / ".run.partial").is_dir()  # the failed attempt is kept aside, not mixed in
    api.defend_classifier(world / "models" / "clf", world / "images.safetensors", out, **{**common, "seed": 2})
    assert json.loads((out / "env.json").read_text())["seed"] == 2 and not (tmp_path / ".run.partial").exists()


def test_resume_refuses_changed_trajectory_settings_and_names_them(world, tmp_path):
    from unbackdoor import api

    out = tmp_path / "crow"
    base = dict(method="finetune", max_steps=4, save_steps=1, per_device_train_batch_size=2,
                gradient_accumulation_steps=1, logging_steps=1)
    with pytest.raises(NumericalError):  # a NaN at step 1: the run stops, its .partial folder stays
        api.defend_lm(world / "models" / "lm", world / "clean.json", out, **{**base, "learning_rate": 1e30,
                                                                              "max_grad_norm": 0.0})
    assert (tmp_path / ".crow.partial" / "fingerprint.json").is_file() and not out.exists()
    for change, key in (({"learning_rate": 1e-3}, "learning_rate"), ({"lora_rank": 4, "learning_rate": 1e30},
                                                                         "lora.r")):
        with pytest.raises(UnbackdoorError, match=key.replace(".", r"\.")) as e:
            api.defend_lm(world / "models" / "lm", world / "clean.json", out, resume=True,
                          **{**base, "max_grad_norm": 0.0, **change})
        assert "--resume with changed settings" in str(e.value)
    # logging settings may change on resume; the unchanged trajectory continues (and fails the same way)
    with pytest.raises(NumericalError):
        api.defend_lm(world / "models" / "lm", world / "clean.json", out, resume=True,
                      **{**base, "learning_rate": 1e30, "max_grad_norm": 0.0, "logging_steps": 2})
