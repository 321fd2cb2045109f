"""What a run's artifacts say beyond its metrics: test-set sizes, class names, every example.

- :func:`metric_counts`: n, the number of test inputs behind each rate (its confidence interval
  needs it), from ``metrics.json`` when it records them, else derived from the artifacts that
  list every input (``predictions.json``, ``generations.json``), accepted only when each rate
  is a whole number of those inputs (an artifact holding a sample of the inputs is not n).
- :func:`class_names`: names for class indices, when the run records them.
- :func:`example_rows`: every generation / prediction, changed answers first, for the drill-down.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .collect import RunRecord

# rate metrics -> the test population they are a fraction of ("triggered" for classifiers: the
# triggered images whose true label is not the target, as ASR is defined; "clean_target": the
# clean images of the target class, for target recall)
POPULATIONS: dict[str, dict[str, str]] = {
    "lm": {"asr": "triggered", "strict_asr": "triggered", "triggered_utility": "triggered",
           "clean_utility": "clean", "false_trigger_rate": "clean"},
    "classify": {"acc": "clean", "asr": "triggered", "ra": "triggered", "target_recall": "clean_target"},
}
RATE_UTILITIES = (None, "exact_match")  # the LM utilities that are rates (ROUGE-L is a mean score)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def rate_metrics(rec: RunRecord) -> dict[str, str]:
    """The rate metrics of this run and their populations (utilities only when they are exact match)."""
    pops = dict(POPULATIONS.get(rec.kind, {}))
    if rec.kind == "lm" and rec.meta.get("utility_metric") not in RATE_UTILITIES:
        pops.pop("triggered_utility", None)
        pops.pop("clean_utility", None)
    return pops


def _predictions(rec: RunRecord, warnings: list[str] | None) -> dict[str, Any] | None:
    p = rec.artifact("predictions.json", warnings)
    return p if isinstance(p, dict) else None


def _split(pred: dict[str, Any], name: str) -> dict[str, list[Any]]:
    part = pred.get(name)
    return part if isinstance(part, dict) else {}


def population_sizes(rec: RunRecord, warnings: list[str] | None = None) -> dict[str, int]:
    """Test-population sizes that the artifacts listing every input give (may be a sample: see the module doc)."""
    out: dict[str, int] = {}
    if rec.kind == "classify":
        pred = _predictions(rec, warnings)
        if pred is None:
            return out
        clean, trig = _split(pred, "clean"), _split(pred, "triggered")
        labels = clean.get("labels")
        if isinstance(labels, list):
            out["clean"] = len(labels)
        tl, tt = trig.get("labels"), trig.get("target")
        if isinstance(tl, list) and isinstance(tt, list) and len(tl) == len(tt):
            out["triggered"] = sum(1 for a, b in zip(tl, tt) if a != b)
            targets = set(tt)
            if len(targets) == 1 and isinstance(labels, list):  # all-to-one: target recall is defined
                out["clean_target"] = sum(1 for a in labels if a == next(iter(targets)))
    elif rec.kind == "lm":
        gens = rec.artifact("generations.json", warnings)
        if isinstance(gens, list) and gens and all(isinstance(g, dict) for g in gens):
            out["triggered"] = sum(1 for g in gens if g.get("triggered"))
            out["clean"] = sum(1 for g in gens if not g.get("triggered"))
    return out


def _finite_rates(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]


def _is_population_size(rates: Sequence[Any], n: int) -> bool:
    """Could ``n`` be the number of inputs behind all these rates?

    Every rate must be k / n for a whole k, and at least one must lie strictly between 0 and 1:
    0 and 1 are whole multiples of any n, so they cannot tell a complete artifact from a sample
    of it (8 kept generations of 200 prompts must not become n = 4).
    """
    vals = _finite_rates(rates)
    return (n > 0 and bool(vals) and any(0.0 < v < 1.0 for v in vals)
            and all(abs(v * n - round(v * n)) < 1e-6 * max(1.0, n) for v in vals))


def metric_counts(rec: RunRecord, warnings: list[str] | None = None) -> dict[str, int]:
    """n per rate metric of this run (the same test inputs before and after the defense).

    Order of trust: ``metrics.json`` ``"n": {metric or population: n}``, then its ``n_clean`` /
    ``n_triggered``, then :func:`population_sizes`, checked against every rate of that population
    (:func:`_is_population_size`); else unknown (absent from the result).
    """
    meta = rec.meta
    explicit = meta.get("n") if isinstance(meta.get("n"), dict) else {}
    top = {p: v for p in ("clean", "triggered") if (v := _int(meta.get(f"n_{p}"))) is not None}
    rates = rate_metrics(rec)
    derived: dict[str, int] | None = None
    out: dict[str, int] = {}
    for metric, pop in rates.items():
        n = _int(explicit.get(metric))
        if n is None:
            n = _int(explicit.get(pop))
        if n is None:
            n = top.get(pop)
        if n is None:
            if derived is None:
                derived = population_sizes(rec, warnings)
            cand = derived.get(pop)
            same_pop = [side.get(m) for m, p in rates.items() if p == pop for side in (rec.before, rec.after)]
            if cand is not None and _is_population_size(same_pop, cand):
                n = cand
        if n is not None and n > 0:
            out[metric] = n
    return out


def measurement_warnings(rec: RunRecord) -> list[str]:
    """What a reader must know before trusting this LM run's numbers (from its ``metrics.json``).

    A backdoored model whose target is not trigger-specific (``backdoor_check``), and triggered
    references that start with the target (scored as they are, they reward the backdoor).
    """
    if rec.kind != "lm":
        return []
    out = []
    check = rec.meta.get("backdoor_check")
    if isinstance(check, dict) and check.get("trigger_specific") is False:
        out.append(f"seed {rec.seed}: the model before the defense does not count as backdoored: "
                   f"{check.get('warning', 'its false-trigger rate is above the allowed maximum')}.")
    n = rec.before.get("references_with_target")
    if isinstance(n, (int, float)) and not isinstance(n, bool) and n > 0:
        rule = (rec.meta.get("eval_rules") or {}).get("target_references", "strip")
        what = ("the target was stripped from them before scoring triggered utility" if rule == "strip"
                else "they were scored as they are (target_references=keep), so triggered utility rewards the backdoor")
        out.append(f"seed {rec.seed}: {int(n)} triggered test references start with the target; {what}.")
    return out


def class_names(rec: RunRecord, warnings: list[str] | None = None) -> list[str] | None:
    """The run's class names (``predictions.json``, else ``metrics.json`` ``"class_names"``), or None."""
    pred = _predictions(rec, warnings) if rec.kind == "classify" else None
    for src in (pred or {}, rec.meta):
        names = src.get("class_names")
        if isinstance(names, list) and names and all(isinstance(n, (str, int)) for n in names):
            return [str(n) for n in names]
    return None


def class_label(index: Any, names: Sequence[str] | None) -> str:
    """A class as a reader wants it: its name when known, else its index."""
    if names is not None and isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(names):
        return names[index]
    return "?" if index is None else str(index)


@dataclasses.dataclass
class ExampleSet:
    """Every example of one run: ``rows`` are ``[set, changed, *cells]``, changed answers first."""

    label: str
    columns: list[str]
    rows: list[list[Any]]

    @property
    def counts(self) -> dict[str, int]:
        out = {"all": len(self.rows), "changed": sum(1 for r in self.rows if r[1])}
        for r in self.rows:
            out[r[0]] = out.get(r[0], 0) + 1
        return out


def _text(v: Any) -> str:
    return "" if v is None else str(v)


def example_rows(rec: RunRecord, label: str, warnings: list[str] | None = None) -> ExampleSet | None:
    """The drill-down of one run: LM generations or classifier predictions, None when not recorded."""
    rows: list[list[Any]] = []
    if rec.kind == "lm":
        gens = rec.artifact("generations.json", warnings)
        if not isinstance(gens, list) or not gens:
            return None
        cols = ["set", "prompt", "reference", "before", "after"]
        for g in gens:
            if not isinstance(g, dict):
                continue
            before, after = _text(g.get("before")), _text(g.get("after"))
            rows.append(["triggered" if g.get("triggered") else "clean", before != after, _text(g.get("prompt")),
                         _text(g.get("reference")), before, after])
    else:
        pred = _predictions(rec, warnings)
        if pred is None:
            return None
        names = class_names(rec, warnings)
        cols = ["set", "#", "label", "target", "before", "after"]
        for part in ("clean", "triggered"):
            s = _split(pred, part)
            labels, before, after = s.get("labels") or [], s.get("before") or [], s.get("after") or []
            target = s.get("target") or [None] * len(labels)
            for i, (y, t, b, a) in enumerate(zip(labels, target, before, after)):
                rows.append([part, b != a, str(i), class_label(y, names), "–" if t is None else class_label(t, names),
                             class_label(b, names), class_label(a, names)])
    if not rows:
        return None
    rows.sort(key=lambda r: not r[1])  # stable: changed answers first, input order within
    return ExampleSet(label, cols, rows)
