"""Finding, validating and grouping run folders (the contract in docs/ARCHITECTURE.md).

A run folder is any folder holding a ``metrics.json``. The report needs only that file;
everything else (plots, generations) comes from optional artifacts beside it, read here
defensively: a missing artifact is skipped, a malformed one becomes a warning in the report.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable

from ..core.errors import DataError
from ..core.stats import aggregate as _core_aggregate
from ..core.stats import t_interval, wilson_interval
from .variants import Settings, distinguishing_settings, settings_text

KINDS = ("lm", "classify")

# metric keys each kind must report before and after a defense (``der`` only after)
REQUIRED_METRICS: dict[str, tuple[str, ...]] = {
    "lm": ("asr", "strict_asr", "triggered_utility", "clean_utility", "false_trigger_rate", "target_loss"),
    "classify": ("acc", "asr", "ra", "target_recall", "per_class_acc"),
}
REQUIRED_FILES = ("config.json", "env.json", "clean_indices.json", "timings.json", "log.txt", "metrics.json")

# the order rows appear in: no defense, baselines, then the methods this toolkit is about
def _registered_order() -> list[str]:
    """Every registered defense of both kinds, in registration order (baselines first, by convention)."""
    from ..classify.defenses import CLASSIFY_DEFENSES
    from ..lm.defenses import LM_DEFENSES

    return LM_DEFENSES.names() + CLASSIFY_DEFENSES.names()


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One defense run, as read back from its ``metrics.json`` (and its resolved ``config.json``).

    ``settings`` are the settings that set it apart from other runs of the same defense
    (:mod:`.variants`); they are filled in by :func:`summarise`, which sees all runs.
    """

    path: Path
    kind: str
    attack: str
    task: str | None
    defense: str
    seed: int
    before: dict[str, Any]
    after: dict[str, Any]
    seconds: float | None
    variant: str | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    settings: Settings = ()
    _cache: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def base_group(self) -> tuple[str, str, str, str]:
        """Runs that may differ only by seed and settings: same kind, attack, task and defense."""
        return (self.kind, self.attack, self.task or "", self.defense)

    @property
    def group(self) -> tuple[str, str, str, str, Settings]:
        """What runs are averaged over: same kind, attack, task, defense and settings, different seeds."""
        return (*self.base_group, self.settings)

    def artifact(self, name: str, warnings: list[str] | None = None) -> Any:
        """An optional JSON artifact beside ``metrics.json``, or None (missing or malformed); read once."""
        if name in self._cache:
            return self._cache[name]
        p = self.path / name
        value = None
        if p.is_file():
            try:
                value = json.loads(p.read_text())
            except (OSError, ValueError) as e:
                if warnings is not None:
                    warnings.append(f"skipped {p}: not valid JSON ({e})")
        self._cache[name] = value
        return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every folder with a ``metrics.json`` at or under ``paths`` (hidden temp folders skipped)."""
    found: set[Path] = set()
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            raise DataError(f"path not found: {root}", where=str(root),
                            fix="pass run folders, or folders that contain them (e.g. a sweep's --out)")
        if root.is_file():
            if root.name != "metrics.json":
                raise DataError(f"{root} is a file, not a run folder", where=str(root),
                                fix="pass the folder that holds metrics.json")
            found.add(root.parent.resolve())
            continue
        for m in root.rglob("metrics.json"):
            rel = m.relative_to(root).parts
            if any(part.startswith(".") for part in rel[:-1]):
                continue  # an atomic write still in progress, or a discarded one
            found.add(m.parent.resolve())
    return sorted(found)


def load_run(path: str | Path) -> RunRecord:
    """Read a run folder's ``metrics.json``; a missing or ill-typed field is a DataError naming it."""
    path = Path(path)
    mfile = path / "metrics.json"
    if not mfile.is_file():
        raise DataError(f"no metrics.json in {path}", where=str(path),
                        fix="this folder is not a finished run; rerun the defense or remove the folder")
    try:
        m = json.loads(mfile.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"metrics.json is not valid JSON: {e}", where=str(mfile),
                        fix="the run was interrupted or the file edited by hand; rerun it") from None
    if not isinstance(m, dict):
        raise DataError("metrics.json must hold an object", where=str(mfile), fix="rerun the defense")

    def need(key: str, types: tuple[type, ...], what: str) -> Any:
        v = m.get(key)
        if not isinstance(v, types) or isinstance(v, bool) and bool not in types:
            raise DataError(f"field '{key}' is {v!r}, expected {what}", where=f"{mfile}, field '{key}'",
                            fix="see the metrics.json contract in docs/ARCHITECTURE.md; rerun the defense")
        return v

    kind = need("kind", (str,), "'lm' or 'classify'")
    if kind not in KINDS:
        raise DataError(f"field 'kind' is {kind!r}, expected 'lm' or 'classify'", where=f"{mfile}, field 'kind'",
                        fix="see the metrics.json contract in docs/ARCHITECTURE.md")
    task = m.get("task")
    if task is not None and not isinstance(task, str):
        raise DataError(f"field 'task' is {task!r}, expected a string", where=f"{mfile}, field 'task'",
                        fix="see the metrics.json contract in docs/ARCHITECTURE.md")
    seconds = m.get("seconds")
    variant = m.get("variant")
    if variant is not None and not isinstance(variant, str):
        raise DataError(f"field 'variant' is {variant!r}, expected a preset name", where=f"{mfile}, field 'variant'",
                        fix="see the metrics.json contract in docs/ARCHITECTURE.md")
    return RunRecord(
        path=path, kind=kind, attack=need("attack", (str,), "an attack name"), task=task,
        defense=need("defense", (str,), "a defense name"), seed=need("seed", (int,), "an integer seed"),
        before=need("before", (dict,), "an object of metrics"), after=need("after", (dict,), "an object of metrics"),
        seconds=float(seconds) if _is_number(seconds) else None, variant=variant,
        config=_resolved_config(path), meta=m,
    )


def _resolved_config(path: Path) -> dict[str, Any]:
    """``config.json``'s ``"config"`` (empty when absent or unreadable: then no setting tells runs apart)."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    inner = cfg.get("config") if isinstance(cfg, dict) else None
    return inner if isinstance(inner, dict) else {}


def _check_json(path: Path, problems: list[str]) -> Any:
    if not path.is_file():
        problems.append(f"missing {path.name}")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        problems.append(f"{path.name} is not valid JSON ({e})")
        return None


def _check_series(obj: Any, keys: Iterable[str], where: str, problems: list[str]) -> None:
    for k in keys:
        v = obj.get(k) if isinstance(obj, dict) else None
        if not isinstance(v, list) or not all(_is_number(x) or x is None for x in v):
            problems.append(f"{where}: '{k}' must be a list of numbers")


def validate_run_dir(path: str | Path) -> list[str]:
    """Every way ``path`` breaks the run-folder contract (an empty list: it follows it).

    Checks the files every defense run must write, the fields and metric keys of
    ``metrics.json``, and the shape of the optional artifacts the report reads.
    """
    path = Path(path)
    problems: list[str] = []
    if not path.is_dir():
        return [f"{path} is not a folder"]
    for name in REQUIRED_FILES:
        if name.endswith(".json"):
            continue
        if not (path / name).is_file():
            problems.append(f"missing {name}")
    model_dir = path / "model"
    if not ((model_dir.is_dir() and any(model_dir.iterdir())) or (path / "model.safetensors").is_file()):
        problems.append("missing the output model (model/ folder or model.safetensors)")

    cfg = _check_json(path / "config.json", problems)
    if cfg is not None and not (isinstance(cfg, dict) and isinstance(cfg.get("kind"), str)
                                and isinstance(cfg.get("config"), dict)):
        problems.append("config.json must be {\"kind\": str, \"config\": {...}}")
    env = _check_json(path / "env.json", problems)
    if env is not None and not (isinstance(env, dict) and "versions" in env and "seed" in env):
        problems.append("env.json must record 'versions' and 'seed'")
    idx = _check_json(path / "clean_indices.json", problems)
    if idx is not None and not (isinstance(idx, dict) and isinstance(idx.get("indices"), list)
                                and all(isinstance(i, int) for i in idx["indices"])):
        problems.append("clean_indices.json must be {\"indices\": [int, ...]}")
    tim = _check_json(path / "timings.json", problems)
    if tim is not None and not (isinstance(tim, dict) and all(_is_number(v) for v in tim.values())):
        problems.append("timings.json must map phase names to seconds")

    try:
        rec = load_run(path)
    except DataError as e:
        problems.append(e.problem)
        return problems
    if rec.kind == "lm" and not rec.task:
        problems.append("metrics.json: an lm run must name its 'task'")
    if rec.seconds is None:
        problems.append("metrics.json: 'seconds' must be a number")
    for side in ("before", "after"):
        metrics = getattr(rec, side)
        for key in REQUIRED_METRICS[rec.kind]:
            if key not in metrics:
                problems.append(f"metrics.json: '{side}' lacks '{key}'")
        for key, v in metrics.items():
            ok = _is_number(v) or v is None or (isinstance(v, list) and all(_is_number(x) or x is None for x in v))
            if not ok:
                problems.append(f"metrics.json: '{side}.{key}' = {v!r} is not a number")
    if rec.kind == "classify" and "der" not in rec.after:
        problems.append("metrics.json: 'after' lacks 'der'")

    lc = rec.artifact("layer_cosine.json", problems)
    if lc is not None:
        for side in ("before", "after"):
            _check_series(lc.get(side) if isinstance(lc, dict) else None, ("clean", "triggered"),
                          f"layer_cosine.json '{side}'", problems)
        per = lc.get("per_prompt") if isinstance(lc, dict) else None
        if per is not None and not (isinstance(per, dict) and all(
                isinstance(per.get(side, {}), dict) and all(
                    isinstance(rows, list) and all(isinstance(r, list) and all(_is_number(x) or x is None for x in r)
                                                   for r in rows)
                    for rows in per.get(side, {}).values()) for side in ("before", "after"))):
            problems.append("layer_cosine.json 'per_prompt' must hold lists of per-prompt lists of numbers")
    gens = rec.artifact("generations.json", problems)
    if gens is not None:
        if not isinstance(gens, list) or not all(isinstance(g, dict) and "prompt" in g for g in gens):
            problems.append("generations.json must be a list of {prompt, reference, triggered, before, after}")
    pred = rec.artifact("predictions.json", problems)
    if pred is not None:
        problems += _prediction_problems(pred)
    sel = rec.artifact("ulrl_selection.json", problems)
    if sel is not None:
        if not isinstance(sel, dict) or not isinstance(sel.get("selected"), list):
            problems.append("ulrl_selection.json must hold a 'selected' list")
        else:
            _check_series(sel, ("scores",), "ulrl_selection.json", problems)
            if sel.get("status") not in ("ok", "mad_zero", "no_suspect"):
                problems.append("ulrl_selection.json: 'status' must be ok, mad_zero or no_suspect")
    trace = rec.artifact("unlearn_trace.json", problems)
    if trace is not None:
        _check_series(trace, ("step", "acc"), "unlearn_trace.json", problems)
    return problems


def _prediction_problems(pred: Any) -> list[str]:
    """How ``predictions.json`` departs from ``{"class_names", "clean": {...}, "triggered": {...}}``."""
    if not isinstance(pred, dict):
        return ["predictions.json must be an object with 'clean' and 'triggered'"]
    problems = []
    names = pred.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        problems.append("predictions.json: 'class_names' must be a list of strings")
    for part, fields in (("clean", ("labels", "before", "after")), ("triggered", ("labels", "target", "before", "after"))):
        s = pred.get(part)
        if not isinstance(s, dict):
            problems.append(f"predictions.json: '{part}' must be an object of {', '.join(fields)}")
            continue
        lists = [s.get(f) for f in fields]
        bad = [f for f, v in zip(fields, lists) if not (isinstance(v, list) and all(isinstance(x, int) for x in v))]
        if bad:
            problems.append(f"predictions.json: '{part}' needs integer lists {', '.join(bad)}")
        elif len({len(v) for v in lists}) > 1:
            problems.append(f"predictions.json: the lists of '{part}' differ in length")
    return problems


def check_run_dir(path: str | Path) -> None:
    """Raise a DataError listing every contract violation of the run folder ``path``."""
    problems = validate_run_dir(path)
    if problems:
        raise DataError("run folder breaks the contract: " + "; ".join(problems), where=str(path),
                        fix="see 'Run folders' in docs/ARCHITECTURE.md")


# ---- grouping and aggregation (pure: records in, summaries out) ---------------------------------

def defense_rank(name: str) -> tuple[int, str]:
    """Where a defense's rows go: no defense first, then the registries' order (a preset such as ``ulrl-kept``
    right after its method), unregistered names last."""
    order = _registered_order()
    if name == "none":
        return (-1, name)
    base = next((m for m in sorted(order, key=len, reverse=True) if name == m or name.startswith(m + "-")), None)
    return (order.index(base) if base is not None else len(order), name)


def _settings_order(settings: Settings) -> tuple:
    """Variants in a readable order: numbers by value (alpha 5.5 before 11), words alphabetically."""
    def value(v: str) -> tuple:
        try:
            return (0, float(v), "")
        except ValueError:
            return (1, 0.0, v)
    return tuple((k, value(v)) for k, v in settings)


def sort_key(group: tuple) -> tuple:
    kind, attack, task, defense = group[:4]
    settings = group[4] if len(group) > 4 else ()
    return (KINDS.index(kind) if kind in KINDS else 9, attack, task, defense_rank(defense), _settings_order(settings))


@dataclasses.dataclass
class GroupSummary:
    """The runs of one (kind, attack, task, defense, settings) over seeds, with statistics per metric.

    Each metric's statistics: ``mean``, ``std``, ``n`` (seeds that gave a number), ``values`` (per
    seed), ``n_inputs`` (test inputs per seed, None when unknown) and ``ci`` (see :func:`with_intervals`).
    """

    kind: str
    attack: str
    task: str
    defense: str
    seeds: list[int]
    before: dict[str, dict[str, Any]]
    after: dict[str, dict[str, Any]]
    runs: list[RunRecord]
    seconds: dict[str, Any]
    settings: Settings = ()

    @property
    def scenario(self) -> tuple[str, str, str]:
        return (self.kind, self.attack, self.task)

    @property
    def settings_text(self) -> str:
        return settings_text(self.settings)

    @property
    def label(self) -> str:
        """The defense, with its distinguishing settings when there are any: ``crow (alpha=11)``."""
        return f"{self.defense} ({self.settings_text})" if self.settings else self.defense

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "attack": self.attack, "task": self.task or None, "defense": self.defense,
                "settings": dict(self.settings), "variant": self.runs[0].variant if self.runs else None,
                "seeds": self.seeds, "before": self.before, "after": self.after, "seconds": self.seconds,
                "runs": [str(r.path) for r in self.runs]}


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``core.stats.aggregate`` with ``n`` = the number of seeds that gave a number (NaN does not count)."""
    out = _core_aggregate(records)
    for stats in out.values():
        stats["n"] = sum(1 for v in stats["values"] if _is_number(v) and not math.isnan(v))
    return out


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """Numeric metrics only (lists such as per_class_acc are plotted, not averaged); None -> NaN."""
    out = {}
    for k, v in metrics.items():
        if v is None:
            out[k] = float("nan")
        elif _is_number(v):
            out[k] = float(v)
    return out


CONFIDENCE = 0.95


def with_intervals(stats: dict[str, dict[str, Any]], counts: list[dict[str, int]],
                   confidence: float = CONFIDENCE) -> dict[str, dict[str, Any]]:
    """Add ``n_inputs`` and ``ci`` to aggregated metrics (``counts``: n per rate metric, one dict per seed).

    One seed: a rate with a known n gets its Wilson interval; several seeds: the Student-t interval
    of the mean over seeds. ``ci`` is ``{"low", "high", "method": "wilson" | "t", "level"}`` or None.
    """
    for key, s in stats.items():
        ns = [c.get(key) for c in counts]
        s["n_inputs"] = ns if any(n is not None for n in ns) else None
        finite = [(v, n) for v, n in zip(s["values"], ns) if _is_number(v) and not math.isnan(v)]
        ci = None
        if len(finite) == 1 and finite[0][1] is not None:
            v, n = finite[0]
            lo, hi = wilson_interval(v * n, n, confidence)
            ci = {"low": lo, "high": hi, "method": "wilson", "level": confidence}
        elif len(finite) >= 2:
            lo, hi = t_interval([v for v, _ in finite], confidence)
            ci = {"low": lo, "high": hi, "method": "t", "level": confidence}
        s["ci"] = ci
    return stats


def assign_settings(records: Iterable[RunRecord]) -> list[RunRecord]:
    """The records with their distinguishing settings filled in (per kind, attack, task and defense)."""
    records = list(records)
    by_base: dict[tuple[str, str, str, str], list[int]] = {}
    for i, r in enumerate(records):
        by_base.setdefault(r.base_group, []).append(i)
    out = list(records)
    for idx in by_base.values():
        runs = [records[i] for i in idx]
        found = distinguishing_settings([r.config for r in runs], [r.seed for r in runs], [r.variant for r in runs],
                                        [str(r.path) for r in runs])
        for i, s in zip(idx, found):
            out[i] = dataclasses.replace(records[i], settings=s, _cache=records[i]._cache)
    return out


def summarise(records: Iterable[RunRecord], warnings: list[str] | None = None) -> list[GroupSummary]:
    """Group runs by (kind, attack, task, defense, settings) and aggregate each metric over seeds.

    Two runs of the same group and seed (settings that do not tell them apart) are a user
    error (which one counts?), reported by name.
    """
    from .evidence import metric_counts

    groups: dict[tuple, list[RunRecord]] = {}
    for r in assign_settings(records):
        groups.setdefault(r.group, []).append(r)
    out = []
    for key in sorted(groups, key=sort_key):
        runs = sorted(groups[key], key=lambda r: r.seed)
        seen: dict[int, Path] = {}
        for r in runs:
            if r.seed in seen:
                setting = f" ({settings_text(key[4])})" if key[4] else ""
                raise DataError(f"two runs of {'/'.join(k for k in key[:4] if k)}{setting} with seed {r.seed} "
                                f"and the same settings: {seen[r.seed]} and {r.path}", where=str(r.path),
                                fix="pass only one of them to the report (or give them different seeds)")
            seen[r.seed] = r.path
        counts = [metric_counts(r, warnings) for r in runs]
        out.append(GroupSummary(
            kind=key[0], attack=key[1], task=key[2], defense=key[3], seeds=[r.seed for r in runs],
            before=with_intervals(aggregate([_scalars(r.before) for r in runs]), counts),
            after=with_intervals(aggregate([_scalars(r.after) for r in runs]), counts),
            runs=runs,
            seconds=aggregate([{"seconds": r.seconds if r.seconds is not None else float("nan")} for r in runs])
            .get("seconds", {}), settings=key[4],
        ))
    return out


def backdoored_baseline(groups: list[GroupSummary]) -> tuple[dict[str, dict[str, Any]], list[int], list[str]]:
    """The 'before' (backdoored model) metrics of one scenario, one value per seed.

    Every defense run re-measures the same backdoored model; we take each seed once (from the
    first defense in row order) and report, not hide, a seed whose defenses disagree on it.
    """
    from .evidence import metric_counts

    per_seed: dict[int, dict[str, Any]] = {}
    counts: dict[int, dict[str, int]] = {}
    notes: list[str] = []
    for g in groups:
        for r in g.runs:
            vals = _scalars(r.before)
            if r.seed not in per_seed:
                per_seed[r.seed] = vals
                counts[r.seed] = metric_counts(r)
                continue
            ref = per_seed[r.seed]
            for k in set(ref) & set(vals):
                a, b = ref[k], vals[k]
                if not (math.isnan(a) and math.isnan(b)) and abs(a - b) > 1e-6:
                    notes.append(f"seed {r.seed}: '{k}' of the backdoored model differs between defense runs "
                                 f"({a:.4g} vs {b:.4g} in {g.label}); the table uses the first")
                    break
    seeds = sorted(per_seed)
    return with_intervals(aggregate([per_seed[s] for s in seeds]), [counts[s] for s in seeds]), seeds, notes


def scenarios(groups: list[GroupSummary]) -> dict[tuple[str, str, str], list[GroupSummary]]:
    """Groups keyed by scenario (kind, attack, task), rows in defense order."""
    out: dict[tuple[str, str, str], list[GroupSummary]] = {}
    for g in groups:
        out.setdefault(g.scenario, []).append(g)
    return out
