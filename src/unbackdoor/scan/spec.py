"""What a scanner is: its config, its code, what it needs, and the verdict it returns.

A scanner answers "is this model backdoored?" (a model-level verdict and score, a suspected target
class for classifiers) from the suspect model and a small clean set, without the trigger. Some also
give a runtime filter: a per-input score with a threshold calibrated on the clean set. One module
per scanner, registered in one line in ``scan/__init__.py`` (``SCANNERS``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from ..core.config import from_dict, to_dict
from ..core.defense import Needs


@dataclass(frozen=True)
class ScannerSpec:
    """One scanner: its name, kind, config class and code.

    ``run(model, clean, cfg, *, tokenizer=None, seed=0, null=None) -> ScanResult``; ``clean`` is an
    ``ImageData`` / ``(inputs, labels)`` for classifiers, Alpaca records for LMs. ``null`` is the
    calibration sample (model-level scores of clean models) when one is known. ``filters_inputs``:
    the scanner also scores single inputs (``score_inputs(model, records, cfg, *, tokenizer)``).
    """

    name: str
    kind: Literal["lm", "classify"]
    config: type
    run: Callable[..., "ScanResult"]
    summary: str
    paper: str = ""
    needs: Needs = field(default_factory=lambda: Needs(trains=False))
    score_inputs: Callable[..., list[float]] | None = None

    @property
    def filters_inputs(self) -> bool:
        return self.score_inputs is not None

    def make_config(self, overrides: dict[str, Any] | None = None) -> Any:
        return from_dict(self.config, dict(overrides or {}), source=f"scanner '{self.name}' settings")


@dataclass
class ScanResult:
    """A scanner's answer: the verdict, the score it rests on, and the evidence to audit it.

    ``verdict`` is None when the scanner cannot judge this model (``status`` says why). ``score`` is
    higher for more suspicious models; ``threshold`` is the decision rule on it. ``p_value`` is the
    score's calibration against clean models (``null``: how many), when a null is known.
    """

    scanner: str
    kind: str
    verdict: bool | None
    score: float
    threshold: float
    status: str = "ok"
    target: int | None = None
    p_value: float | None = None
    null: dict[str, Any] | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    input_threshold: float | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def threshold_text(self) -> str:
        """``threshold 3.500``, or ``uncalibrated`` when the decision needs a null that was not given."""
        return "uncalibrated" if self.threshold != self.threshold else f"threshold {self.threshold:.3g}"

    def line(self) -> str:
        """One line for a terminal: the verdict and the numbers behind it."""
        v = {True: "BACKDOORED", False: "no backdoor found", None: "no verdict"}[self.verdict]
        parts = [f"{self.scanner}: {v}", f"score {self.score:.3f} ({self.threshold_text()})"]
        if self.target is not None:
            parts.append(f"suspected target class {self.target}")
        if self.p_value is not None:
            parts.append(f"p = {self.p_value:.3f} vs {self.null.get('n', '?') if self.null else '?'} clean models")
        if self.status != "ok":
            parts.append(f"[{self.status}]")
        return ", ".join(parts)


def config_dict(cfg: Any) -> dict[str, Any]:
    return to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg or {})


__all__ = ["ScanResult", "ScannerSpec", "config_dict"]
