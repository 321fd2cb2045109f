"""The dependency versions the code really needs, checked when a part of the toolkit is imported.

An older library often does not fail: it silently trains differently. transformers < 5.19 ignores
``Trainer.loss_is_scaled_for_ga`` (CROW's loss would be divided by the accumulation steps a second
time), and before 5.0 a float ``warmup_steps`` was a step count instead of a ratio (no warm-up at
all). ``pyproject.toml`` declares the same floors (a test keeps the two equal); this guard catches
an environment that was assembled without pip's resolver (``--no-deps``, conda, a stale venv).
``UNBACKDOOR_IGNORE_VERSIONS=1`` turns the error into a warning, for those who know better.
"""
from __future__ import annotations

import importlib.metadata as md
import logging
import os
import re
from typing import Callable, Iterable

from .errors import ConfigError

log = logging.getLogger("unbackdoor")

FLOORS: dict[str, str] = {
    "torch": "2.5",          # torch.serialization.safe_globals (checkpoint pre-scan); transformers 5.19 needs it
    "transformers": "5.19",  # Trainer.loss_is_scaled_for_ga (5.19); float warmup_steps as a ratio (5.0)
    "peft": "0.20",          # the peft that transformers 5.19 integrates with (its own floor)
    "accelerate": "1.3",     # Accelerator.unwrap_model(keep_torch_compile=...), which the 5.19 Trainer calls
    "safetensors": "0.8",
    "tokenizers": "0.23.1",
}
"""Package -> the lowest version the code is known to work with (the floors of ``pyproject.toml``)."""

LM_PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers")
CLASSIFY_PACKAGES = ("torch", "safetensors")


def version_tuple(text: str) -> tuple[int, ...]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``: the leading release numbers (pre/dev/local parts ignored)."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", text)
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


def _at_least(found: str, floor: str) -> bool:
    a, b = version_tuple(found), version_tuple(floor)
    n = max(len(a), len(b))
    return a + (0,) * (n - len(a)) >= b + (0,) * (n - len(b))


def check_versions(packages: Iterable[str], *, installed: Callable[[str], str] = md.version) -> None:
    """Raise a ``ConfigError`` naming every package below its floor (or missing), with the pip command."""
    problems, pins = [], []
    for name in packages:
        floor = FLOORS[name]
        try:
            found = installed(name)
        except md.PackageNotFoundError:
            problems.append(f"{name} is not installed")
        else:
            if _at_least(found, floor):
                continue
            problems.append(f"{name} {found} found, unbackdoor needs >= {floor}")
        pins.append(f"'{name}>={floor}'")
    if not problems:
        return
    err = ConfigError("; ".join(problems), where="installed packages",
                      fix=f"pip install -U {' '.join(pins)} (or reinstall unbackdoor: pip install -e .); "
                          "set UNBACKDOOR_IGNORE_VERSIONS=1 to run anyway at your own risk")
    if os.environ.get("UNBACKDOOR_IGNORE_VERSIONS") == "1":
        log.warning("%s", err.format())
        return
    raise err
