"""What the re-activation test of both kinds shares: the summary of its curves and the file it writes.

The retuning attack itself lives with each kind (``classify/reactivation.py``, ``lm/reactivation.py``);
both produce curves (``[{"step": 0, "asr": ...}, ...]``) for the defended model, the clean model (the
floor) and the backdoored model (the ceiling), and write them to ``reactivation.json`` in the run
folder. It is the evaluator's attack: the file says so, and ``threat_model.json`` is never touched.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .paths import MARKER_KEY, check_outputs
from .runs import atomic_write_json

FILE = "reactivation.json"
PAPER = ("Min et al., Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor Defense "
         "(NeurIPS 2024): the retuning attack")
EVALUATOR_NOTE = ("retuning uses poisoned samples and the attack's trigger: it is the evaluator's attack on the "
                  "defended model, not part of the defense, and nothing here was given to the defense")


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def summarize(curves: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """ASR before and after retuning per model (``defended``, ``floor``, ``ceiling``), and ``recovery``:
    where the defended model's post-retuning ASR lands between the floor (0) and the ceiling (1).

    ``recovery`` is None when a curve is missing or the ceiling does not exceed the floor (then the
    retuning cannot tell a removed backdoor from a hidden one).
    """
    out: dict[str, Any] = {}
    for name, curve in curves.items():
        if not curve:
            continue
        out[name] = {"asr_before": _number(curve[0].get("asr")), "asr_after": _number(curve[-1].get("asr")),
                     "steps": int(curve[-1].get("step", 0))}
    d, f, c = (out.get(k, {}).get("asr_after") for k in ("defended", "floor", "ceiling"))
    out["recovery"] = (d - f) / (c - f) if None not in (d, f, c) and c - f > 1e-9 else None  # type: ignore[operator]
    return out


def check_record(run_dir: str | Path, *, command: str, inputs: Iterable[str | Path | None] = (),
                 overwrite: bool = False) -> Path:
    """Refuse, before any compute, a ``reactivation.json`` that may not be written (the output rule)."""
    return check_outputs([Path(run_dir) / FILE], inputs, command=command, overwrite=overwrite)[0]


def write_record(run_dir: str | Path, record: Mapping[str, Any], *, command: str,
                 inputs: Iterable[str | Path | None] = (), overwrite: bool = False) -> Path:
    """Write ``reactivation.json`` into ``run_dir`` (the output rule applies: an existing file not written
    by ``command`` is replaced only with ``overwrite``)."""
    out = check_record(run_dir, command=command, inputs=inputs, overwrite=overwrite)
    return atomic_write_json(out, {MARKER_KEY: command, **record})


def add_reactivate_flags(p: argparse.ArgumentParser) -> None:
    """``--reactivate`` and ``--reactivate-clean-model`` on a ``defend`` command."""
    g = p.add_argument_group("re-activation (the evaluator's retuning attack, after the defense)")
    g.add_argument("--reactivate", action="store_true",
                   help="after the defense, run the retuning attack with its defaults (needs --test; writes "
                        "reactivation.json; `retune --help` lists its settings)")
    g.add_argument("--reactivate-clean-model", type=Path, default=None,
                   help="a clean model of the same task for the retuning floor")


def reactivate_after_defend(args: argparse.Namespace, run: Path, retune: Any) -> None:
    """``defend --reactivate``: ``retune(run, clean_model=...)`` on the run just written, and its summary."""
    if getattr(args, "reactivate", False):
        print_record(retune(run, clean_model=getattr(args, "reactivate_clean_model", None)))


def print_record(path: Path) -> None:
    """The summary of a ``reactivation.json`` on the terminal, and where it is."""
    import json

    print(format_summary(json.loads(Path(path).read_text())))
    print(f"-> {path}")


def format_summary(record: dict[str, Any]) -> str:
    """ASR before -> after retuning for each model, one line each (kind-agnostic)."""
    s = record.get("summary") or {}
    lines = [f"retuning attack ({record.get('config', {}).get('poisoned')} poisoned samples; the evaluator's attack):"]
    for name in ("defended", "floor", "ceiling"):
        if isinstance(s.get(name), dict):
            b, f = s[name].get("asr_before"), s[name].get("asr_after")
            fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            lines.append(f"  {name:<9} ASR {fmt(b)} -> {fmt(f)} after {s[name].get('steps')} steps")
    if s.get("recovery") is not None:
        lines.append(f"  recovery {s['recovery']:.2f} (0: like the clean model, 1: like the backdoored one)")
    return "\n".join(lines)


__all__ = ["EVALUATOR_NOTE", "FILE", "PAPER", "add_reactivate_flags", "check_record", "format_summary", "print_record",
           "reactivate_after_defend", "summarize",
           "write_record"]
