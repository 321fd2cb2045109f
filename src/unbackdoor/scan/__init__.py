"""Backdoor scanners, by name: one module each, registered in one line below.

``unbackdoor scan --model M --clean C`` runs every scanner of the model's kind (or those named) and
writes a scan folder (``scan.json`` + PNGs); :func:`unbackdoor.scan.flow.scan` is the Python entry.
A scanner sees the suspect model and clean data only: never the trigger, the target or triggered
inputs (those are used by the evaluation on a zoo, ``scripts/zoo_*.py``).
"""
from __future__ import annotations

from ..core.registry import Registry
from .spec import ScannerSpec, ScanResult

SCANNERS: Registry[ScannerSpec] = Registry("scanner")
SCANNERS.add("ulrl", "unbackdoor.scan.ulrl:SPEC")
SCANNERS.add("consistency", "unbackdoor.scan.consistency:SPEC")
SCANNERS.add("confguard", "unbackdoor.scan.confguard:SPEC")


def scanners_of(kind: str) -> list[str]:
    """The registered scanners for models of ``kind`` (``lm`` or ``classify``), in registration order."""
    return [name for name, spec in SCANNERS.items() if spec.kind == kind]


__all__ = ["SCANNERS", "ScanResult", "ScannerSpec", "scanners_of"]
