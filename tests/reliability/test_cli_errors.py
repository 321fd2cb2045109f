"""The command line never shows a bare traceback for a user's mistake: bad input exits with status 2
and an ``error:`` message with ``where`` and ``fix`` lines; ``--debug`` shows the traceback. Inputs
are never modified, and outputs are never written inside an input model's folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .rel_helpers import CodePayload
from unbackdoor.cli import main
from unbackdoor.core.errors import UnbackdoorError


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))} if folder.exists() else {}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs shared by the CLI cases: good data, bad data, a tiny LM, a classifier, a poisoned model."""
    import torch

    from .rel_helpers import alpaca_records, save_tiny_lm, tiny_images
    from unbackdoor.classify.models import build_model
    from unbackdoor.classify.model_io import save_classifier
    from unbackdoor.classify.sources import save_data

    root = tmp_path_factory.mktemp("cli")
    (root / "clean.json").write_text(json.dumps(alpaca_records(8)))
    (root / "truncated.json").write_text(json.dumps(alpaca_records(8))[:50])
    (root / "bad.yaml").write_text("lr: [unclosed\n")
    (root / "typo.yaml").write_text("lrr: 0.1\n")
    lm = save_tiny_lm(root / "lm")
    evil = root / "evil-lm"
    evil.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (lm / f).exists():
            (evil / f).write_bytes((lm / f).read_bytes())
    torch.save({"w": torch.zeros(1), "x": CodePayload(root / "PWNED")}, evil / "pytorch_model.bin")
    save_classifier(build_model("preact_resnet_tiny", 4), root / "clf", architecture="preact_resnet_tiny",
                      num_classes=4)
    save_data(tiny_images(64, 32), root / "clean-images.safetensors")
    return root


def _cases(r: Path) -> list[tuple[str, list[str], tuple[str, ...], Path | None]]:
    """(id, argv, substrings the error must contain, an input folder that must stay untouched)."""
    lm_defend = ["lm", "defend", "--model", str(r / "lm"), "--clean", str(r / "clean.json"), "--max-steps", "1"]
    clf_defend = ["classify", "defend", "--model", str(r / "clf"), "--clean", str(r / "clean-images.safetensors")]
    return [
        ("lm-poison-missing-data", ["lm", "poison", "--data", str(r / "nope.json"), "--out", str(r / "o.json")],
         ("not found", "nope.json"), None),
        ("lm-poison-truncated-data", ["lm", "poison", "--data", str(r / "truncated.json"), "--out", str(r / "o.json")],
         ("malformed", "truncated.json"), None),
        ("lm-defend-missing-model", ["lm", "defend", "--model", str(r / "nope"), "--clean", str(r / "clean.json"),
                                     "--out", str(r / "o1")], ("not found",), None),
        ("lm-defend-output-inside-model", [*lm_defend, "--out", str(r / "lm" / "defended")], ("inside the input",),
         r / "lm"),
        ("lm-defend-negative-alpha", [*lm_defend, "--out", str(r / "o2"), "--alpha", "-1"], ("alpha",), r / "lm"),
        ("lm-defend-negative-epsilon", [*lm_defend, "--out", str(r / "o2"), "--epsilon", "-0.1"], ("epsilon",), r / "lm"),
        ("lm-defend-zero-lr", [*lm_defend, "--out", str(r / "o2"), "--set", "lr=0"], ("learning_rate",), r / "lm"),
        ("lm-defend-zero-epochs", [*lm_defend[:-2], "--out", str(r / "o2"), "--epochs", "0"], ("num_train_epochs",), r / "lm"),
        ("lm-defend-bad-yaml", [*lm_defend, "--out", str(r / "o2"), "--config", str(r / "bad.yaml")], ("yaml",), r / "lm"),
        ("lm-defend-typo-in-yaml", [*lm_defend, "--out", str(r / "o2"), "--config", str(r / "typo.yaml")],
         ("lrr", "did you mean"), r / "lm"),
        ("lm-defend-bad-override", [*lm_defend, "--out", str(r / "o2"), "--set", "alpha"], ("key=value",), r / "lm"),
        ("lm-defend-pickle-payload", ["lm", "defend", "--model", str(r / "evil-lm"), "--clean", str(r / "clean.json"),
                                      "--out", str(r / "o3")], ("could run code",), r / "evil-lm"),
        ("classify-defend-missing-model", ["classify", "defend", "--model", str(r / "nope"), "--clean",
                                           str(r / "clean-images.safetensors"), "--out", str(r / "o4")], ("nope",), None),
        ("classify-defend-output-inside-model", [*clf_defend, "--out", str(r / "clf" / "x")], ("inside the input",),
         r / "clf"),
        ("classify-defend-negative-alpha", [*clf_defend, "--out", str(r / "o5"), "--alpha", "-1"], ("alpha",), r / "clf"),
        ("classify-defend-zero-epochs", [*clf_defend, "--out", str(r / "o5"), "--relearn-epochs", "0"],
         ("relearn_epochs",), r / "clf"),
        ("classify-defend-negative-lr", [*clf_defend, "--out", str(r / "o5"), "--unlearn-lr", "-0.01"],
         ("unlearn_lr",), r / "clf"),
        ("classify-defend-missing-clean", ["classify", "defend", "--model", str(r / "clf"), "--clean",
                                           str(r / "nope-data"), "--out", str(r / "o6")], ("nope-data",), r / "clf"),
        ("classify-defend-clean-is-lm-data", ["classify", "defend", "--model", str(r / "clf"), "--clean",
                                              str(r / "clean.json"), "--out", str(r / "o7")], ("clean.json",), r / "clf"),
    ]


CASE_IDS = [c[0] for c in _cases(Path("/x"))]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_cli_bad_input_exits_2_with_a_clear_message(case_id, files, capsys, tally):
    _, argv, needles, untouched = next(c for c in _cases(files) if c[0] == case_id)
    before = _tree(untouched) if untouched else None
    rc = main(["--quiet", *argv])
    err = capsys.readouterr().err
    tally("bad_input_cases")
    assert rc == 2, f"exit status {rc}; stderr:\n{err[-2000:]}"
    assert "Traceback" not in err
    assert "error:" in err and "where:" in err and "fix:" in err, err[-2000:]
    for n in needles:
        assert n.lower() in err.lower(), f"{n!r} not in:\n{err[-2000:]}"
    if untouched is not None:
        assert _tree(untouched) == before, "the input folder was modified"
    assert not (files / "PWNED").exists()


def test_debug_flag_shows_the_traceback(files):
    with pytest.raises(UnbackdoorError):
        main(["--debug", "--quiet", "lm", "poison", "--data", str(files / "nope.json"), "--out", str(files / "o.json")])


def _start_cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", UNBACKDOOR_QUIET="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "unbackdoor.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_cli_process_exit_status_and_stderr(files, tally):
    """The real process: status 2, no traceback; with --debug the traceback is there (both run at once)."""
    args = ["lm", "poison", "--data", str(files / "truncated.json"), "--out", str(files / "o.json")]
    plain, debug = _start_cli(*args), _start_cli("--debug", *args)
    _, err = plain.communicate(timeout=300)
    tally("bad_input_cases")
    assert plain.returncode == 2 and "Traceback" not in err and "error:" in err, err[-2000:]
    _, err = debug.communicate(timeout=300)
    assert debug.returncode not in (0, 2) and "Traceback" in err and "DataError" in err, err[-2000:]
