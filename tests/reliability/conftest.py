"""Shared helpers for the reliability suite, and the tally of what it tried.

Every test counts what it exercised (bad-input cases, fuzz examples, kill points, unsafe
payloads ...) through the ``tally`` fixture; at the end of the session the counts, and the
outcome of every reliability test, are written to ``tests/reliability/last_counts.json``.
``docs/reliability.md`` quotes them.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

HERE = Path(__file__).resolve().parent
COUNTS_FILE = HERE / "last_counts.json"

_COUNTS: collections.Counter[str] = collections.Counter()
_OUTCOMES: collections.Counter[str] = collections.Counter()
_START = time.time()


@pytest.fixture
def tally() -> Callable[..., None]:
    """``tally("bad_input")`` or ``tally("fuzz_examples", 5)``: count what a test tried."""

    def add(kind: str, n: int = 1) -> None:
        _COUNTS[kind] += n

    return add


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not str(report.fspath).startswith(str(HERE)) and "reliability" not in report.nodeid:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = "xfailed" if hasattr(report, "wasxfail") and report.outcome == "skipped" else report.outcome
        if hasattr(report, "wasxfail") and report.outcome == "passed":
            outcome = "xpassed"
        _OUTCOMES[outcome] += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _OUTCOMES:
        return
    data = {
        "counts": dict(sorted(_COUNTS.items())),
        "tests": dict(sorted(_OUTCOMES.items())),
        "wall_seconds": round(time.time() - _START, 1),
        "exit_status": int(exitstatus),
        "args": [str(x) for x in session.config.invocation_params.args],
        "python": sys.version.split()[0],
    }
    tmp = COUNTS_FILE.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, COUNTS_FILE)


# ---- helpers shared by the tests ------------------------------------------------------------

@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """A path that exists only if a payload ran; tests assert it never appears."""
    return tmp_path / "PWNED"
