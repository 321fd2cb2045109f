"""Every registered LM defense gets a working ``lm defend --method NAME --help`` with its own flags."""
from __future__ import annotations

import contextlib
import io

import pytest

from unbackdoor.cli import main
from unbackdoor.lm.defenses import LM_DEFENSES


@pytest.mark.parametrize("name", LM_DEFENSES.names())
def test_each_defense_lists_its_settings_under_defend_help(name):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["lm", "defend", "--method", name, "--help"]) == 0
    spec = LM_DEFENSES.get(name)
    assert f"{spec.name} settings ({spec.config.__name__})" in out.getvalue()


def test_the_registry_lists_baselines_before_crow():
    names = LM_DEFENSES.names()
    assert names[-1] == "crow" and names[0] == "finetune"
    assert {"prune", "wanda", "quantize", "lora-scale", "merge", "cleangen", "beear"} <= set(names)
