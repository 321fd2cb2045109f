"""Which settings tell two runs of the same defense apart (ULRL ``paper`` vs ``kept``, CROW alpha 5.5 vs 11).

No per-method list: the distinguishing settings of runs that share (kind, attack, task, defense)
are the keys of their resolved ``config.json`` whose values differ between them, minus what
differs for every run anyway (the seed, output folders, anything that changes with the seed
alone, such as a per-seed model path). A preset name (``metrics.json`` ``"variant"``) stands for
the keys it determines, so a table says ``preset=kept`` instead of five hyper-parameters.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

# last components of config keys that name where a run lives or which seed it is, never a setting
NON_SETTINGS = frozenset({"seed", "seeds", "out", "out_dir", "output", "output_dir", "logging_dir", "run_dir",
                          "run_name", "resume", "resume_from_checkpoint"})
PRESET_KEY = "preset"

Settings = tuple[tuple[str, str], ...]
"""``(("alpha", "5.5"), ("epsilon", "0.1"))``: the distinguishing settings of one run, as display text."""


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"defense.alpha": 5.5, ...}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def value_text(v: Any) -> str:
    """A setting's value as a table shows it: 5.5, true, none, kept, [1, 2]."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(", ", "="), sort_keys=True) if isinstance(v, list) else json.dumps(v)
    return str(v)


_MISSING = object()


def _key(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str) if v is not _MISSING else "<unset>"


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """The last component of each dotted key, or more of it where two keys would read the same."""
    names = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            short = ".".join(parts[-n:])
            if sum(1 for o in keys if o == short or o.endswith("." + short)) == 1:
                break
        names[k] = short
    return names


def distinguishing_settings(configs: Sequence[Mapping[str, Any]], seeds: Sequence[int],
                            variants: Sequence[str | None], run_paths: Sequence[str] = ()) -> list[Settings]:
    """The settings that set each run apart from the others of its (kind, attack, task, defense).

    ``configs`` are the runs' resolved configs, ``seeds`` and ``variants`` their seeds and preset
    names (None: no preset), ``run_paths`` their folders (a config value naming one is an output
    location, not a setting). Returns one :data:`Settings` per run, empty when the runs differ
    only by seed.
    """
    n = len(configs)
    flat = [flatten(c) for c in configs]
    keys = sorted({k for f in flat for k in f})
    seed_groups: dict[int, list[int]] = {}
    for i, s in enumerate(seeds):
        seed_groups.setdefault(s, []).append(i)
    variant_differs = len({v or "" for v in variants}) > 1
    chosen: list[str] = []
    for k in keys:
        if k.split(".")[-1] in NON_SETTINGS:
            continue
        vals = [f.get(k, _MISSING) for f in flat]
        if len({_key(v) for v in vals}) < 2:
            continue
        if any(isinstance(v, str) and p and p in v for v in vals for p in run_paths):
            continue  # an output location inside a run folder
        # a path or number that changes with the seed alone (the backdoored model of that seed, a
        # data seed): one value per seed. A hyper-parameter (a float, a bool) is never taken for one.
        per_seed = {s: {_key(vals[i]) for i in idx} for s, idx in seed_groups.items()}
        seedlike = all(isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool) and v == seeds[i])
                       for i, v in enumerate(vals))
        if seedlike and len(seed_groups) > 1 and all(len(v) == 1 for v in per_seed.values()) \
                and len({_key(v) for v in vals}) == len(seed_groups):
            continue
        if variant_differs:  # the preset decides it: the preset name says it shorter
            by_variant: dict[str, set[str]] = {}
            for v, x in zip(variants, vals):
                by_variant.setdefault(v or "", set()).add(_key(x))
            if all(len(s) == 1 for s in by_variant.values()):
                continue
        chosen.append(k)
    names = _short_names(chosen)
    out: list[Settings] = []
    for i in range(n):
        pairs: list[tuple[str, str]] = []
        if variant_differs:
            pairs.append((PRESET_KEY, variants[i] or "none"))
        for k in chosen:
            v = flat[i].get(k, _MISSING)
            pairs.append((names[k], "unset" if v is _MISSING else value_text(v)))
        out.append(tuple(pairs))
    return out


def settings_text(settings: Settings) -> str:
    """``"alpha=5.5, epsilon=0.1"`` (empty when there is nothing to tell apart)."""
    return ", ".join(f"{k}={v}" for k, v in settings)
