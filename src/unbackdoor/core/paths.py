"""The one rule for where a command may write: outputs never destroy inputs or other people's files.

Every command of both kinds and every API function calls :func:`check_outputs` with all the
paths it will write and all the paths it reads, before it reads or writes anything:

* an output path may not be empty (an unset shell variable must not mean "the current folder");
* an output may not be, contain, or lie inside any input (model, adapter, its base model, data,
  test and triggered sets), symlinks resolved;
* an existing output is replaced only when it is this command's own earlier output (a run folder
  or file marked with the same command), or an empty folder, or with ``overwrite=True``
  (``--overwrite``).

Outputs are then written atomically (``core.runs``), so a refused or killed command leaves what
was there before.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from .errors import ConfigError

MARKER_KEY = "unbackdoor_command"
"""The key under which outputs record the command that wrote them (JSON field, safetensors metadata)."""


def output_path(value: str | Path | None, what: str = "--out") -> Path:
    """``value`` as a Path; an empty or missing value is an error, never the current folder."""
    if value is None or str(value).strip() == "":
        raise ConfigError(f"{what} is empty", where=what,
                          fix=f"give {what} a path (an unset shell variable expands to nothing)")
    return Path(value)


def written_by(path: Path) -> str | None:
    """The command that wrote ``path``, when it is an output of this toolkit (else None)."""
    try:
        if path.is_dir():
            # run folders, classifier folders, reports, sweeps, demos
            for name in ("config.json", "model.json", "summary.json", "sweep_config.json", "demo_config.json"):
                f = path / name
                if f.is_file():
                    data = json.loads(f.read_text(encoding="utf-8"))
                    if isinstance(data, dict) and isinstance(data.get(MARKER_KEY), str):
                        return data[MARKER_KEY]
            return None
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return data.get(MARKER_KEY) if isinstance(data, dict) else None
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return (f.metadata() or {}).get(MARKER_KEY)
    except (OSError, ValueError, RecursionError):
        return None
    except Exception:  # noqa: BLE001 - a damaged safetensors header is "not ours", not a crash
        return None
    return None


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp in out.parents:
        return "lies inside"
    if out in inp.parents:
        return "contains"
    return None


def check_outputs(outputs: Iterable[str | Path | None], inputs: Iterable[str | Path | None], *,
                  command: str, overwrite: bool = False) -> list[Path]:
    """Apply the rule above to every output; returns the outputs as resolved paths.

    ``command`` names the command (``"lm defend"``, ``"classify poison"``...) as it is recorded
    in its outputs. ``None`` inputs are ignored (optional arguments); ``None`` outputs are errors.
    """
    outs = [output_path(o) for o in outputs]
    ins = [Path(i) for i in inputs if i is not None and str(i) != ""]
    resolved_in = [(i, i.resolve()) for i in ins]
    checked: list[Path] = []
    for given in outs:
        out = given.resolve()
        for raw, inp in resolved_in:
            rel = _relation(out, inp)
            if rel is not None:
                raise ConfigError(f"the output {given} {rel} the input {raw}", where=f"{command}: output {given}",
                                  fix="write outputs somewhere else: inputs are never modified or replaced")
        if out.exists() and not overwrite:
            mine = written_by(out)
            same = mine == command
            empty_dir = out.is_dir() and not any(out.iterdir())
            if not (same or empty_dir):
                what = "folder" if out.is_dir() else "file"
                owner = f"written by '{mine}'" if mine else "not written by this command"
                raise ConfigError(f"the output {what} {given} already exists ({owner})",
                                  where=f"{command}: output {given}",
                                  fix="choose a new path, or pass --overwrite (overwrite=True) to replace it")
        checked.append(out)
    return checked
