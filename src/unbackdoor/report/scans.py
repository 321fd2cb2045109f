"""Scan folders in the report: one table of verdicts per scanned model, and the scanners' figures.

A scan folder is any folder holding a ``scan.json`` written by ``unbackdoor scan`` (``scan/flow.py``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from .render import Image, Para, Section, Table


def find_scans(paths: Iterable[str | Path]) -> list[tuple[Path, dict[str, Any]]]:
    """Every ``scan.json`` at or under ``paths`` (hidden temp folders skipped), read; malformed ones skipped."""
    found = []
    for raw in paths:
        root = Path(raw)
        files = [root / "scan.json"] if (root / "scan.json").is_file() else (root.rglob("scan.json") if root.is_dir()
                                                                              else [])
        for f in files:
            if any(part.startswith(".") for part in f.relative_to(root).parts[:-1]):
                continue
            try:
                rec = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict) and isinstance(rec.get("results"), list):
                found.append((f.parent, rec))
    return sorted(found, key=lambda x: str(x[0]))


def _num(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "n/a"


def scan_section(paths: Iterable[str | Path], out: Path, digits: int = 3) -> tuple[Section, list[Path]] | None:
    """The "Scans" section (model, scanner, verdict, score, threshold, target, p-value, status; the PNGs, copied
    into ``out``) and the images it wrote; None when no scan folder is under ``paths``."""
    from ..core.runs import atomic_write_bytes
    scans = find_scans(paths)
    if not scans:
        return None
    rows = []
    blocks: list[Any] = [Para("Is the model backdoored? Each scanner saw the model and a clean set only (no trigger, "
                              "no target, no triggered input). p: the score's rank among clean models of the "
                              "calibration zoo (docs/results-scan-reactivation.md); n/a without one.")]
    names = {True: "backdoored", False: "no backdoor found", None: "no verdict"}
    images: list[Path] = []
    for i, (folder, rec) in enumerate(scans):
        classes = rec.get("class_names") or []
        for r in rec["results"]:
            t = r.get("target")
            target = "" if t is None else (f"{t} ({classes[t]})" if isinstance(t, int) and t < len(classes) else str(t))
            rows.append([str(rec.get("sources", {}).get("model", folder)), r.get("scanner", "?"),
                         names.get(r.get("verdict")), _num(r.get("score"), digits), _num(r.get("threshold"), digits),
                         target, _num(r.get("p_value"), digits), r.get("status", "")])
        for name in rec.get("images", []):
            if (folder / name).is_file():
                png = atomic_write_bytes(out / f"scan{i}_{name}", (folder / name).read_bytes())
                images.append(png)
                blocks.append(Image(png, f"scan {name}", f"{rec.get('sources', {}).get('model', folder)}: {name}"))
    blocks.insert(1, Table(["model", "scanner", "verdict", "score", "threshold", "suspected target", "p", "status"],
                           rows, "One row per scanner and scanned model.", numeric=False, name="scans"))
    return Section("Scans", blocks), images


__all__ = ["find_scans", "scan_section"]
