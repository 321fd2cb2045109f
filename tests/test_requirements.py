"""The dependency floors are true, declared once, and checked with a clear error at import."""
from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

import pytest

from unbackdoor.core.errors import ConfigError
from unbackdoor.core.requirements import FLOORS, LM_PACKAGES, check_versions, version_tuple

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_exactly_the_floors_the_guard_checks():
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"dependencies = \[(.*?)\]", text, re.S).group(1)
    declared = dict(re.findall(r'"([a-z_-]+)>=([0-9.]+)', deps))
    assert {k: declared[k] for k in FLOORS} == FLOORS


def test_the_installed_versions_pass():
    check_versions(FLOORS)


def test_an_old_transformers_is_refused_with_what_was_found_and_the_pip_command(monkeypatch):
    monkeypatch.delenv("UNBACKDOOR_IGNORE_VERSIONS", raising=False)
    old = {"transformers": "4.57.6", "peft": "0.12.0"}
    with pytest.raises(ConfigError) as e:
        check_versions(LM_PACKAGES, installed=lambda n: old.get(n) or md.version(n))
    msg = str(e.value)
    assert "transformers 4.57.6 found, unbackdoor needs >= 5.19" in msg and "peft 0.12.0 found" in msg
    assert "pip install -U 'transformers>=5.19' 'peft>=0.20'" in e.value.fix


def test_a_missing_package_is_named(monkeypatch):
    def installed(name):
        raise md.PackageNotFoundError(name)

    with pytest.raises(ConfigError, match="accelerate is not installed"):
        check_versions(["accelerate"], installed=installed)


def test_the_escape_hatch_turns_the_error_into_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("UNBACKDOOR_IGNORE_VERSIONS", "1")
    check_versions(["transformers"], installed=lambda n: "5.18.0")
    assert any("5.18.0 found" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("text,want", [("2.13.0+cpu", (2, 13, 0)), ("5.24.0.dev0", (5, 24, 0)), ("1.1", (1, 1)),
                                       ("0.23.1rc1", (0, 23, 1))])
def test_version_numbers_are_read_from_their_release_part(text, want):
    assert version_tuple(text) == want


def test_the_command_line_reports_an_old_library_as_an_error(tmp_path):
    """A real process whose transformers reports 4.57: `unbackdoor lm ...` exits 2 naming it."""
    code = ("import importlib.metadata as md, sys; real = md.version; "
            "md.version = lambda n: '4.57.6' if n == 'transformers' else real(n); "
            "from unbackdoor.cli import main; sys.exit(main(['lm', 'poison', '--help']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "transformers 4.57.6 found, unbackdoor needs >= 5.19" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
