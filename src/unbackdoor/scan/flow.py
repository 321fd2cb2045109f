"""``unbackdoor scan``: run the scanners of a model's kind on a clean set, write a scan folder.

The scan folder: ``scan.json`` (``{"unbackdoor_command": "scan", "kind", "sources", "verdict",
"results": [ScanResult...], "inputs": {scanner: {"scores", "flagged"}}, "calibration"}``) and one PNG
per scanner. A scanner sees the suspect model and the clean data only. ``--inputs`` (LMs) screens
prompts with each runtime filter against its threshold from the clean set.

Calibration: the model-level scores of clean models give each score a p-value. The shipped null
(``assets/scan/null.json``) comes from the tiny-world zoo (docs/results-scan-reactivation.md): it is
meaningful for models like those, not for any model; pass your own with ``null=``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core.errors import ConfigError, ModelError
from ..core.paths import MARKER_KEY, check_outputs
from ..core.runs import atomic_dir, atomic_write_json, read_json
from ..core.seeds import set_seed
from . import SCANNERS, scanners_of
from .spec import ScanResult

log = logging.getLogger("unbackdoor")

COMMAND = "scan"
NULL_FILE = Path(__file__).resolve().parent.parent / "assets" / "scan" / "null.json"


def detect_kind(model: str | Path) -> str:
    """``classify`` for a classifier folder (``model.json``), ``lm`` for a Hugging Face causal LM or adapter."""
    p = Path(model)
    if (p / "model.json").is_file() or p.name == "model.json":
        return "classify"
    if (p / "config.json").is_file() or (p / "adapter_config.json").is_file():
        return "lm"
    raise ModelError(f"cannot tell what kind of model {p} is", where=str(p),
                     fix="pass a classifier folder (model.json + model.safetensors) or a Hugging Face model folder")


def load_null(path: str | Path | None = None) -> dict[str, Any]:
    """The calibration sample per scanner (``{name: {"scores": [...], "source": ...}}``); empty if none."""
    f = Path(path) if path is not None else NULL_FILE
    if not f.is_file():
        if path is not None:
            raise ConfigError(f"null distribution file not found: {f}", where="--null",
                              fix="pass a JSON file {scanner: {\"scores\": [...]}} or leave --null out")
        return {}
    data = read_json(f)
    return {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("scores"), list)}


def _clean_data(kind: str, clean: str | Path, count: int | None, seed: int) -> Any:
    if kind == "classify":
        import torch

        from ..classify.data import stratified_subset
        from ..classify.sources import load_data

        data = load_data(clean, train=True)
        idx = stratified_subset(data, count, seed) if count else torch.arange(len(data))
        return data.subset(idx, name=f"{data.name}-clean")
    import random

    from ..lm.data import read_alpaca

    records = read_alpaca(clean)
    if count and count < len(records):
        records = [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), count))]
    return records


def run_scanners(kind: str, model: Any, clean: Any, names: Sequence[str] | None = None, *, tokenizer: Any = None,
                 seed: int = 0, settings: Mapping[str, Mapping[str, Any]] | None = None,
                 null: Mapping[str, Any] | None = None) -> list[ScanResult]:
    """Each scanner of ``kind`` (or those named) on ``model`` and ``clean``, in registration order."""
    names = list(names) if names else scanners_of(kind)
    results = []
    for name in names:
        spec = SCANNERS.get(name)
        if spec.kind != kind:
            raise ConfigError(f"scanner '{spec.name}' is for {spec.kind} models, this one is a {kind} model",
                              where="--scanners", fix=f"use one of: {', '.join(scanners_of(kind))}")
        cfg = spec.make_config((settings or {}).get(spec.name))
        ref = ((null or {}).get(spec.name) or {}).get("scores")
        set_seed(seed)
        kw = {"tokenizer": tokenizer} if kind == "lm" else {}
        results.append(spec.run(model, clean, cfg, seed=seed, null=ref, **kw))
    return results


def screen_inputs(model: Any, records: Sequence[Mapping[str, Any]], results: Sequence[ScanResult], *,
                  tokenizer: Any, settings: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Per-input scores and flags of every runtime filter among ``results`` (LM scanners)."""
    out: dict[str, Any] = {}
    for res in results:
        spec = SCANNERS.get(res.scanner)
        if not spec.filters_inputs or res.input_threshold is None:
            continue
        cfg = spec.make_config((settings or {}).get(spec.name))
        scores = spec.score_inputs(model, records, cfg, tokenizer=tokenizer)
        cut = res.input_threshold
        flags = [s >= cut if res.scanner == "confguard" else s > cut for s in scores]
        out[res.scanner] = {"scores": scores, "flagged": flags, "threshold": cut, "n_flagged": int(sum(flags))}
    return out


def scan(model: str | Path, clean: str | Path, out: str | Path, *, kind: str | None = None,
         scanners: Sequence[str] | None = None, clean_count: int | None = None, seed: int = 0,
         inputs: str | Path | None = None, settings: Mapping[str, Mapping[str, Any]] | None = None,
         null: str | Path | None = None, template: str = "alpaca", trust_remote_code: bool = False,
         overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Scan a model folder with clean data; write the scan folder ``out``; return it and its record."""
    from ..classify.flow import _paths

    kind = kind or detect_kind(model)
    if kind not in ("lm", "classify"):
        raise ConfigError(f"unknown kind {kind!r}", where="--kind", fix="use lm or classify")
    if inputs is not None and kind != "lm":
        raise ConfigError("--inputs screens prompts with the LM runtime filters", where="--inputs",
                          fix="leave --inputs out for classifiers")
    out = check_outputs([out], [model, *_paths(clean), inputs, null], command=COMMAND, overwrite=overwrite)[0]
    settings = {SCANNERS.canonical(k): v for k, v in (settings or {}).items()}
    scanners = [SCANNERS.canonical(n) for n in scanners] if scanners else scanners_of(kind)
    if kind == "lm":  # the prompt template is the model's, shared by every LM scanner
        settings = {n: {"template": template, **settings.get(n, {})} for n in scanners}
    calibration = load_null(null)
    data = _clean_data(kind, clean, clean_count, seed)
    tokenizer = None
    class_names = None
    if kind == "classify":
        from ..classify.model_io import load_classifier

        net = load_classifier(model)
        class_names = list(getattr(data, "class_names", []) or []) or None
    else:
        from ..lm.models import load_causal_lm

        net, tokenizer = load_causal_lm(model, trust_remote_code=trust_remote_code)
    results = run_scanners(kind, net, data, scanners, tokenizer=tokenizer, seed=seed, settings=settings,
                           null=calibration)
    screened: dict[str, Any] = {}
    if inputs is not None:
        from ..lm.data import read_alpaca

        screened = screen_inputs(net, read_alpaca(inputs), results, tokenizer=tokenizer, settings=settings)
    verdicts = [r.verdict for r in results if r.verdict is not None]
    record = {MARKER_KEY: COMMAND, "kind": kind,
              "sources": {"model": str(model), "clean": str(clean), "inputs": str(inputs) if inputs else None,
                          "clean_count": clean_count, "seed": seed},
              "verdict": (any(verdicts) if verdicts else None),
              "results": [r.to_json() for r in results], "inputs": screened,
              "calibration": {n: {k: v for k, v in c.items() if k != "scores"} | {"n": len(c["scores"])}
                              for n, c in calibration.items()},
              "class_names": class_names,
              "note": "the scanners saw the model and the clean data only (no trigger, no target, no triggered input)"}
    from .plots import plot_result

    with atomic_dir(out) as tmp:
        images = []
        for r in results:
            png = plot_result(r, tmp, inputs=screened.get(r.scanner), class_names=class_names)
            if png is not None:
                images.append(png.name)
        record["images"] = images
        atomic_write_json(tmp / "scan.json", record)
        atomic_write_json(tmp / "config.json", {MARKER_KEY: COMMAND, "kind": "scan", "sources": record["sources"],
                                                "scanners": [r.scanner for r in results],
                                                "config": {r.scanner: r.config for r in results}})
    return out, record


def format_scan(record: Mapping[str, Any]) -> str:
    """The terminal summary: the overall verdict, one line per scanner, the screened inputs."""
    v = {True: "BACKDOORED (at least one scanner flags it)", False: "no backdoor found by any scanner",
         None: "no verdict"}[record.get("verdict")]
    lines = [f"verdict: {v}"]
    for r in record.get("results", []):
        lines.append("  " + ScanResult(**r).line())
    for name, s in (record.get("inputs") or {}).items():
        lines.append(f"  {name} runtime filter: {s['n_flagged']} of {len(s['flagged'])} inputs flagged "
                     f"(threshold {s['threshold']:.3g})")
    if record.get("images"):
        lines.append("plots: " + ", ".join(record["images"]))
    return "\n".join(lines)


def read_scan(folder: str | Path) -> dict[str, Any]:
    """A scan folder's ``scan.json``."""
    return json.loads((Path(folder) / "scan.json").read_text())


__all__ = ["COMMAND", "detect_kind", "format_scan", "load_null", "read_scan", "run_scanners", "scan",
           "screen_inputs"]
