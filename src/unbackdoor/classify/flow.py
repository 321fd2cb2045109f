"""The classifier threat model as one flow: poison -> train the victim -> defend -> evaluate.

Every command of ``unbackdoor classify``, the Python API, the sweep and the demo go through these
functions, so a run folder (docs/ARCHITECTURE.md) is written in one place: :func:`defend_loaded`.
A defense sees only the clean subset (its indices are recorded); the test set and the attack's
settings are used by the evaluation alone, and the run's ``threat_model.json`` says so.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..core.config import to_dict
from ..core.defense import DefenseSpec, defense_metrics, key_settings, write_threat_model
from ..core.defense import resolve_defense as core_resolve
from ..core.errors import ConfigError
from ..core.model_card import write_model_card
from ..core.paths import MARKER_KEY, check_outputs, output_path
from ..core.resources import PeakMemory
from ..core.runs import atomic_write_json, staged_run
from ..core.seeds import set_seed
from .attacks import AttackConfig, attack_config_from_dict, attack_targets, build_attack, poison_full
from .data import ImageData, stratified_subset
from .defenses import CLASSIFY_DEFENSES
from .batching import model_device
from .evaluate import evaluate_attack, with_der
from .model_io import load_model, save_model
from . import models
from .sources import load_data, save_data

log = logging.getLogger("unbackdoor")

COMMAND_DEFEND = "classify defend"


def resolve_defense(method: str, config: Any = None, *, preset: str | None = None,
                    overrides: dict[str, Any] | None = None) -> tuple[DefenseSpec, Any, str | None]:
    """``(spec, config, preset)`` for ``method`` (``ulrl``, or ``ulrl-kept`` = ULRL with preset ``kept``)."""
    return core_resolve(CLASSIFY_DEFENSES, method, config, preset=preset, overrides=overrides)


def check_images_fit(model: nn.Module, clean: Any) -> None:
    """Refuse clean images the model cannot take (channels, size) before any training starts."""
    models.check_images_fit(model, getattr(clean, "images", None), "clean data")


def run_defense(model: nn.Module, clean: Any, spec: DefenseSpec, cfg: Any, run_dir: Any = None, *, seed: int = 0,
                num_classes: int | None = None) -> tuple[nn.Module, Any]:
    """One defense on a copy of ``model`` with the clean data only (no run folder of its own)."""
    spec.check_model(model, cfg)
    check_images_fit(model, clean)
    set_seed(seed)
    return spec.run(model, clean, cfg, run_dir, num_classes=num_classes, seed=seed)


def attack_of(meta: dict[str, Any], **defaults: Any) -> AttackConfig:
    """The attack a model folder records in ``model.json`` (``defaults`` fill what it lacks)."""
    return attack_config_from_dict(meta.get("attack"), **defaults)


def _predictions_json(test: ImageData, triggered: ImageData, before: dict[str, Any], after: dict[str, Any],
                      target: Any) -> dict[str, Any]:
    return {"class_names": list(test.class_names),
            "clean": {"labels": test.labels.tolist(), "before": before["clean"], "after": after["clean"]},
            "triggered": {"labels": triggered.labels.tolist(), "target": target,
                          "before": before["triggered"], "after": after["triggered"]}}


def _digest(indices: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps([int(i) for i in indices]).encode()).hexdigest()[:16]


def defend_loaded(out: str | Path, model: nn.Module, clean: ImageData, clean_indices: Sequence[int], method: str,
                  cfg: Any = None, *, test: ImageData | None, attack: AttackConfig | None, seed: int,
                  preset: str | None = None, before: tuple[dict[str, Any], dict[str, Any]] | None = None,
                  triggered: ImageData | None = None, model_meta: dict[str, Any] | None = None,
                  sources: dict[str, Any] | None = None, inputs: Sequence[str | Path | None] = (),
                  overwrite: bool = False, name: str | None = None,
                  clean_pool: int | None = None) -> tuple[Path, dict[str, Any]]:
    """One complete run folder: config, env, clean indices, threat model, timings, metrics, predictions, model.

    ``test``/``attack`` (optional) measure the model before and after; ``before`` (metrics,
    predictions) reuses a measurement of the same model. ``sources`` are recorded as where the
    model and data came from; ``inputs`` are the paths the output may not touch. ``clean_pool`` (the
    size of the set the clean subset was drawn from) records the budget as a fraction too.
    """
    spec, cfg, preset = resolve_defense(method, cfg, preset=preset)
    name = name or (f"{spec.name}-{preset}" if preset and preset != "paper" else spec.name)
    out = check_outputs([out], inputs, command=COMMAND_DEFEND, overwrite=overwrite)[0]
    fingerprint = {"method": spec.name, "preset": preset, "config": to_dict(cfg), "seed": seed,
                   "clean": _digest(clean_indices)}
    with staged_run(out, fingerprint=fingerprint) as run:
        run.start(cfg, seed, "classify-defense", command=COMMAND_DEFEND, method=spec.name, preset=preset,
                  sources=sources or {})
        run.write_indices(clean_indices)
        budget = {"clean_pool": clean_pool, "clean_fraction": round(len(clean_indices) / clean_pool, 6)} \
            if clean_pool else {}
        write_threat_model(run, spec, clean_samples=len(clean_indices), clean_source=(sources or {}).get("clean"),
                           test_seen_by_defense=False, **budget)
        run.write_json("data.json", {"clean": {"name": clean.name, "samples": len(clean),
                                               "class_counts": clean.class_counts().tolist()},
                                     "test": {"name": test.name, "samples": len(test)} if test is not None else None,
                                     "note": "the defense saw only the clean samples listed in clean_indices.json"})
        t0 = time.perf_counter()
        spec.check_model(model, cfg)  # refuse an unsuitable model before any compute
        check_images_fit(model, clean)
        measured = test is not None and attack is not None
        if measured and triggered is None:
            triggered = build_attack(attack).triggered_test_set(test)
        if measured and before is None:
            with run.phase("evaluate_before"):
                before = evaluate_attack(model, test, attack, triggered, with_predictions=True)
        num_classes = test.num_classes if test is not None else clean.num_classes
        with PeakMemory(model_device(model)) as memory:
            defended, report = run_defense(model, clean, spec, cfg, run, seed=seed, num_classes=num_classes)
        seconds = sum(v for k, v in run.timings.items() if not k.startswith("evaluate"))
        after_m: dict[str, Any] = {}
        before_m: dict[str, Any] = {}
        if measured:
            with run.phase("evaluate"):
                after = evaluate_attack(defended, test, attack, triggered, with_predictions=True)
            before_m, after_m = before[0], with_der(before[0], after[0])
            target = attack_targets(triggered.labels, attack, test.num_classes).tolist()
            run.write_json("predictions.json", _predictions_json(test, triggered, before[1], after[1], target))
        run.write_json("defense_report.json", report.to_json() if hasattr(report, "to_json") else report)
        save_model(defended, run / "model", model_meta)
        write_model_card(run / "model", {
            "defense": name, "kind": "classify", "variant": preset, "settings": key_settings(cfg),
            "base_model": (sources or {}).get("model"),
            "clean_data": {"source": (sources or {}).get("clean"), "count": len(clean_indices)},
            "attack": attack.name if attack else None, "seed": seed,
            "metrics": {"before": before_m, "after": after_m} if measured else None})
        counts = {}
        if measured:
            target = attack.target if attack.mode == "all2one" else None
            counts = {"clean": len(test), "triggered": int(len(triggered)),
                      **({"clean_target": int((test.labels == target).sum())} if target is not None else {})}
        metrics = defense_metrics(kind="classify", defense=name, variant=preset, attack=attack.name if attack else None,
                                  seed=seed, before=before_m, after=after_m, seconds=seconds,
                                  clean_samples=len(clean_indices), wall_seconds=round(time.perf_counter() - t0, 3),
                                  class_names=list(clean.class_names), n=counts, **_outcome(report), **budget,
                                  peak_memory_mib=memory.peak_mib, memory_method=memory.method)
        run.write_metrics(metrics)
    for warning in metrics.get("warnings", []):  # said last, so that it is not lost above the tables
        log.warning("%s: %s", name, warning)
    return run.path, metrics


def _outcome(report: Any) -> dict[str, Any]:
    """What a defense says about its own result (``status``, ``warnings``: e.g. ULRL that found no suspect
    and so ran plain finetuning), for metrics.json and the report."""
    out: dict[str, Any] = {"warnings": [str(w) for w in (getattr(report, "warnings", None) or [])]}
    status = getattr(report, "status", None)
    if status is not None:
        out["defense_status"] = str(status)
    return out


def open_model(model: str | Path, model_options: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """A classifier in any supported format (``model_formats``) and its metadata."""
    return load_model(model, model_options)


def open_data(spec: str | Path, meta: dict[str, Any], *, train: bool, text_options: Any = None) -> Any:
    """A data spec read for this model: images as they are; text labelled with the model's class names
    (when it has them) and tokenised by its tokenizer (``model_formats.load_tokenizer``)."""
    from .model_formats import load_tokenizer
    from .text import TextData

    data = load_data(spec, train=train, text=text_options, class_names=meta.get("class_names"))
    if isinstance(data, TextData):
        data = data.with_tokenizer(load_tokenizer(meta), getattr(text_options, "max_length", None))
    return data


def attack_for(meta: dict[str, Any], attack: AttackConfig | None, data: Any) -> AttackConfig:
    """The attack to measure against: the one given, else the one the model records (ours: badnets by default)."""
    if attack is not None:
        return attack
    if "attack" not in meta and (meta.get("format") not in (None, "unbackdoor") or hasattr(data, "texts")):
        raise ConfigError("the model does not record the attack it was given, so ASR cannot be measured",
                          where="model metadata (model.json 'attack')",
                          fix="name it: --attack NAME (e.g. text-badnet, badnets) with its settings via "
                              "--attack-set KEY=VALUE")
    return attack_of(meta)


def _keep_class_names(meta: dict[str, Any], data: Any) -> dict[str, Any]:
    """The model's metadata with the data's class names when the model has none (saved with the defended model)."""
    names = list(getattr(data, "class_names", []) or [])
    if names and not meta.get("class_names") and names != [str(i) for i in range(len(names))]:
        return {**meta, "class_names": names}
    return meta


def defend(model: str | Path, clean: str | Path, out: str | Path, method: str = "ulrl", config: Any = None, *,
           preset: str | None = None, test: str | Path | None = None, clean_count: int | None = None, seed: int = 0,
           overwrite: bool = False, model_options: Any = None, text_options: Any = None,
           attack: AttackConfig | None = None, **overrides: Any) -> Path:
    """Defend a classifier (any format of ``model_formats``) with the clean data ``clean`` (a data spec);
    write a run folder at ``out``; the defended model is saved in the format it came in.

    ``clean_count`` takes a class-stratified subset. With ``test``, metrics before and after are
    recorded against ``attack`` (default: the attack stored in the model's metadata).
    """
    spec, cfg, preset = resolve_defense(method, config, preset=preset, overrides=overrides)
    if clean_count is not None and clean_count <= 0:
        raise ConfigError(f"clean_count {clean_count} must be > 0", where="--clean-count",
                          fix="pass a positive number, or leave it out to use every clean sample")
    check_outputs([out], [model, *_paths(clean, test)], command=COMMAND_DEFEND, overwrite=overwrite)
    net, meta = open_model(model, model_options)
    spec.check_model(net, cfg)  # refuse an unsuitable model before reading data or spending compute
    data = open_data(clean, meta, train=True, text_options=text_options)
    idx = stratified_subset(data, clean_count, seed) if clean_count else torch.arange(len(data))
    subset = data.subset(idx, name=f"{data.name}-clean")
    test_data = open_data(test, meta, train=False, text_options=text_options) if test is not None else None
    attack = attack_for(meta, attack, test_data) if test_data is not None else None
    path, _ = defend_loaded(out, net, subset, idx.tolist(), spec.name, cfg, preset=preset, test=test_data,
                            attack=attack, seed=seed, model_meta=_keep_class_names(meta, data), overwrite=overwrite,
                            clean_pool=len(data),
                            sources={"model": str(model), "clean": str(clean), "test": str(test) if test else None,
                                     "model_format": meta.get("format")},
                            inputs=[model, *_paths(clean, test)])
    return path


def _paths(*specs: Any) -> list[str | Path]:
    """The data specs that are paths on disk (``tinyworld:SEED`` is not)."""
    named = ("fashion-mnist", "fashion_mnist", "fashionmnist")
    return [s for s in specs if s is not None and not str(s).startswith("tinyworld:") and str(s).lower() not in named]


def evaluate(model: str | Path, test: str | Path, *, attack: AttackConfig | None = None,
             out: str | Path | None = None, overwrite: bool = False, model_options: Any = None,
             text_options: Any = None) -> dict[str, Any]:
    """ACC, ASR, RA, target recall, per-class accuracy of a model (any format; attack: given, or its own)."""
    if out is not None:
        check_outputs([out], [model, *_paths(test)], command="classify evaluate", overwrite=overwrite)
    net, meta = open_model(model, model_options)
    data = open_data(test, meta, train=False, text_options=text_options)
    cfg = attack_for(meta, attack, data)
    metrics = evaluate_attack(net, data, cfg)
    result = {"attack": cfg.name, "class_names": list(data.class_names), **metrics}
    if out is not None:
        atomic_write_json(out, {MARKER_KEY: "classify evaluate", **result})
    return result


def poison_data(data: str | Path, out: str | Path, attack: AttackConfig, *, overwrite: bool = False,
                text_options: Any = None) -> dict[str, Any]:
    """Write a poisoned copy of a training set (images: ``.safetensors``; text: ``.json`` / ``.jsonl``) and the
    poisoned indices beside it."""
    out = output_path(out)
    dataset = load_data(data, train=True, text=text_options)
    suffixes = (".json", ".jsonl") if hasattr(dataset, "texts") else (".safetensors",)
    if out.suffix not in suffixes:
        raise ConfigError(f"--out {out} must end in {' or '.join(suffixes)}", where="--out",
                          fix=f"e.g. --out poisoned{suffixes[0]}")
    sidecar = out.with_name(out.stem + ".poison.json")
    check_outputs([out, sidecar], _paths(data), command="classify poison", overwrite=overwrite)
    res = poison_full(dataset, attack)
    save_data(res.data, out, command="classify poison")
    atomic_write_json(sidecar, {MARKER_KEY: "classify poison", "attack": to_dict(res.config or attack),
                                "poisoned_indices": res.poisoned.tolist(), "noise_indices": res.noise.tolist(),
                                "source": str(data)})
    return {"poisoned": len(res.poisoned), "samples": len(res.data), "out": out, "indices": sidecar}


def train_victim(data: str | Path, out: str | Path, attack: AttackConfig, *, arch: str = "preact_resnet_tiny",
                 train: Any = None, model_kwargs: dict[str, Any] | None = None, normalize: str = "tinyworld",
                 overwrite: bool = False, init_model: str | Path | None = None, model_options: Any = None,
                 text_options: Any = None) -> Path:
    """Poison ``data`` with ``attack`` and train a backdoored model on it; save it to ``out``.

    Without ``init_model`` a fresh ``arch`` is trained (images). With it, that model (any format, e.g.
    a pretrained Hugging Face encoder: a classification head is added for the data's classes) is
    finetuned on the poisoned data and saved in its own format, with the attack recorded.
    """
    from ..core.runs import atomic_dir
    from .loop import TrainConfig
    from .transforms import NORMALIZATION
    from .victim import train_backdoored

    if init_model is not None:
        return _finetune_victim(data, out, attack, init_model, train or TrainConfig(seed=attack.seed),
                                model_options, text_options, overwrite)

    if normalize != "none" and normalize not in NORMALIZATION:
        raise ConfigError(f"unknown normalisation '{normalize}'", where="--normalize",
                          fix=f"use one of: {', '.join(NORMALIZATION)}, none")
    out = check_outputs([out], _paths(data), command="classify attack", overwrite=overwrite)[0]
    tcfg = train or TrainConfig(seed=attack.seed)
    dataset = load_data(data, train=True)
    with atomic_dir(out) as tmp:
        train_backdoored(dataset, attack, arch, tcfg, tmp, model_kwargs=model_kwargs,
                         normalization=None if normalize == "none" else NORMALIZATION[normalize],
                         init_seed=attack.seed, extra={MARKER_KEY: "classify attack"})
    return out


def _finetune_victim(data: str | Path, out: str | Path, attack: AttackConfig, init_model: str | Path, train: Any,
                     model_options: Any, text_options: Any, overwrite: bool) -> Path:
    """Finetune an existing model on ``data`` poisoned by ``attack``; save it in its own format."""
    import dataclasses as dc

    from .loop import fit
    from .model_formats import ModelOptions
    from .text import TextData

    out = check_outputs([out], [init_model, *_paths(data)], command="classify attack", overwrite=overwrite)[0]
    opts = model_options or ModelOptions()
    raw = load_data(data, train=True, text=text_options, class_names=getattr(text_options, "label_names", None))
    if opts.num_classes is None:
        opts = dc.replace(opts, num_classes=raw.num_classes)
    net, meta = open_model(init_model, opts)
    dataset = open_data(data, meta, train=True, text_options=text_options) if isinstance(raw, TextData) else raw
    res = poison_full(dataset, attack)
    set_seed(train.seed)
    result = fit(net, res.data if not isinstance(dataset, TextData) else _batches_of(res.data, train), train,
                 desc=f"backdoor {meta.get('format')}")
    meta = {**_keep_class_names(meta, dataset), "num_classes": dataset.num_classes, MARKER_KEY: "classify attack",
            "attack": to_dict(attack), "train": to_dict(train), "dataset": dataset.name,
            "poisoned_indices": res.poisoned.tolist(), "train_seconds": result.seconds}
    save_model(net, out, meta)
    return out


def _batches_of(data: Any, train: Any) -> Any:
    """``epoch -> batches`` of a tokenised text set (fit's callable form)."""
    from .batching import clean_batches, model_inputs

    return clean_batches(model_inputs(data), data.labels, train.batch_size, train.seed)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The before/after table: one line per (attack, defense)."""
    head = f"{'attack':<9} {'defense':<10} {'ACC':>13} {'ASR':>13} {'RA':>13} {'recall[t]':>13} {'DER':>6} {'sec':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        b, a = r["before"], r["after"]
        if not b or not a:
            lines.append(f"{str(r['attack']):<9} {r['defense']:<10} (not measured: no test data) {r['seconds']:>6.1f}")
            continue
        pair = lambda k: f"{b[k]:.3f}->{a[k]:.3f}"  # noqa: E731
        lines.append(f"{r['attack']:<9} {r['defense']:<10} {pair('acc'):>13} {pair('asr'):>13} {pair('ra'):>13} "
                     f"{pair('target_recall'):>13} {a['der']:>6.3f} {r['seconds']:>6.1f}")
    return "\n".join(lines)


__all__ = ["COMMAND_DEFEND", "attack_of", "check_images_fit", "defend", "defend_loaded", "evaluate", "format_table",
           "poison_data", "resolve_defense", "run_defense", "train_victim"]
