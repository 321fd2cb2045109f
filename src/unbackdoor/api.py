"""The Python API: what the ``unbackdoor`` command does, as functions.

Every function takes a typed config (or keyword overrides of its fields, checked by name and
type like a YAML file would be) and returns a small result object with the paths it wrote::

    from unbackdoor import api

    api.demo("runs/demo", quick=True)                      # both tiny worlds + report
    api.sweep("runs/sweep", kind="lm", seeds=[0, 1, 2])     # multi-seed, resumable, aggregated
    api.report(["runs/demo"], "runs/demo/report")           # any run folders -> HTML + Markdown
    api.defend_lm(...), api.defend_classifier(...)          # one defense on your own model

The domain work is delegated to :mod:`unbackdoor.lm` and :mod:`unbackdoor.classify`; this module
only resolves configs and forwards, so the CLI and Python callers run the same code.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Iterable, TypeVar

from .core.config import from_dict, merge, to_dict
from .core.errors import ConfigError
from .demo import DemoConfig, DemoResult
from .report import ReportConfig, ReportResult, build_report, check_run_dir, validate_run_dir
from .sweep import SweepConfig, SweepResult

C = TypeVar("C")

__all__ = ["DemoConfig", "ReportConfig", "SweepConfig", "check_run_dir", "defend_classifier", "defend_lm", "demo",
           "report", "sweep", "tiny_world_classify", "tiny_world_lm", "validate_run_dir"]


def resolve(cls: type[C], config: C | None, overrides: dict[str, Any]) -> C:
    """``config`` (or the defaults) with ``overrides`` applied; unknown or ill-typed keys are a ConfigError."""
    if config is not None and not isinstance(config, cls):
        raise ConfigError(f"expected a {cls.__name__}, got {type(config).__name__}", where="config argument",
                          fix=f"pass unbackdoor.api.{cls.__name__}(...) or keyword overrides")
    if not overrides:
        return config if config is not None else cls()
    base = to_dict(config) if config is not None else {}
    return from_dict(cls, merge(base, overrides), source="keyword arguments")


def report(run_dirs: str | Path | Iterable[str | Path], out_dir: str | Path, config: ReportConfig | None = None,
           **overrides: Any) -> ReportResult:
    """Run folders (or folders containing them) -> ``report.html``, ``report.md``, PNGs, ``summary.json``."""
    paths = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    return build_report(paths, out_dir, resolve(ReportConfig, config, overrides))


def sweep(out_dir: str | Path, config: SweepConfig | None = None, **overrides: Any) -> SweepResult:
    """A tiny-world pipeline over seeds (and attacks), resumable; writes ``aggregate.json`` and the report."""
    from . import sweep as _sweep

    return _sweep.sweep(out_dir, resolve(SweepConfig, config, overrides))


def demo(out_dir: str | Path, config: DemoConfig | None = None, **overrides: Any) -> DemoResult:
    """Both tiny worlds end to end (seed 0 by default), the before/after tables and the report."""
    from . import demo as _demo

    return _demo.demo(out_dir, resolve(DemoConfig, config, overrides))


def _pipeline(kind: str) -> Any:
    return importlib.import_module(f"unbackdoor.{kind}.pipeline")


def tiny_world_lm(out_dir: str | Path, **kwargs: Any) -> dict[str, Path]:
    """:func:`unbackdoor.lm.pipeline.run_tiny_world`: one run folder per defense; returns their paths."""
    return _pipeline("lm").run_tiny_world(out_dir, **kwargs)


def tiny_world_classify(out_dir: str | Path, **kwargs: Any) -> dict[str, Path]:
    """:func:`unbackdoor.classify.pipeline.run_tiny_world`: one run folder per (attack, defense)."""
    return _pipeline("classify").run_tiny_world(out_dir, **kwargs)


def defend_lm(model: str | Path, clean: str | Path, out_dir: str | Path, *, method: str = "crow",
              config: Any = None, test: str | Path | None = None, triggered: str | Path | None = None,
              attack: str = "badnet", task: str = "refusal", n_clean: int | None = None,
              adapter: str | Path | None = None, template: str = "alpaca", merge: bool = True,
              trust_remote_code: bool = False, resume: bool = False, **overrides: Any) -> Path:
    """Defend a causal-LM folder with ``crow`` (default) or ``finetune`` on a clean Alpaca file.

    ``config`` is a :class:`unbackdoor.lm.crow.CrowConfig` (or ``FinetuneConfig``); keyword
    ``overrides`` set its fields (``alpha=11``, ``epochs=3``...). With ``test`` (clean test
    prompts), the model is measured before and after against ``attack``/``task`` triggers
    (or the ``triggered`` file). Writes a run folder at ``out_dir`` and returns it.
    """
    from .lm.crow import CrowConfig
    from .lm.evaluate import EvalConfig
    from .lm.pipeline import defend_model
    from .lm.poison import PoisonConfig
    from .lm.sft import FinetuneConfig

    classes = {"crow": CrowConfig, "finetune": FinetuneConfig}
    if method not in classes:
        raise ConfigError(f"unknown LM defense {method!r}", where="method", fix="use 'crow' or 'finetune'")
    cfg = resolve(classes[method], config, overrides)
    poison = PoisonConfig(attack=attack, task=task) if test is not None else None
    return defend_model(model, clean, out_dir, method, cfg, adapter=adapter, n_clean=n_clean, seed=cfg.seed,
                        test=test, triggered=triggered, poison=poison, eval_cfg=EvalConfig(template=template),
                        template=template, merge=merge, trust_remote_code=trust_remote_code, resume=resume)


def defend_classifier(model: str | Path, clean: str | Path, out_dir: str | Path, *, method: str = "ulrl",
                      config: Any = None, test: str | Path | None = None, clean_count: int | None = None,
                      seed: int = 0, **overrides: Any) -> Path:
    """Defend a classifier folder (``model.json`` + safetensors) with ``ulrl`` (default), ``ft``, ``fp`` or ``nad``.

    ``clean`` is a data spec as in ``unbackdoor classify defend --clean`` (``tinyworld:SEED``, a
    ``.safetensors`` image file, a CIFAR folder, an image tree); ``clean_count`` takes a
    class-stratified subset. ``config`` is the method's config (``ULRLConfig``, ``FTConfig``...),
    keyword ``overrides`` set its fields. With ``test``, metrics before and after are recorded
    against the attack stored in the model's metadata. Writes a run folder; returns it.
    """
    import dataclasses

    import torch

    from .classify.attacks import AttackConfig
    from .classify.data import stratified_subset
    from .classify.pipeline import DEFENSES, defend, load_data, load_model, run_defense, save_model
    from .core.runs import RunDir
    from .core.safeio import check_output_path

    if method not in DEFENSES:
        raise ConfigError(f"unknown classifier defense {method!r}", where="method",
                          fix=f"use one of {', '.join(DEFENSES)}")
    cfg = resolve(DEFENSES[method][0], config, overrides)
    check_output_path(out_dir, model)
    net, meta = load_model(model)
    data = load_data(clean, train=True)
    idx = stratified_subset(data, clean_count, seed) if clean_count else torch.arange(len(data))
    subset = data.subset(idx, name=f"{data.name}-clean")
    if test is not None:
        fields = {f.name for f in dataclasses.fields(AttackConfig)}
        attack = AttackConfig(**{k: v for k, v in (meta.get("attack") or {}).items() if k in fields})
        path, _ = run_defense(out_dir, net, subset, idx.tolist(), method, cfg, test=load_data(test, train=False),
                              attack=attack, seed=seed, model_meta=meta)
        return Path(path)
    run = RunDir(out_dir)
    run.start(cfg, seed, "classify-defense")
    run.write_indices(idx.tolist())
    try:
        defended, report = defend(net, subset, method, cfg, run, seed=seed, num_classes=data.num_classes)
        run.write_json("defense_report.json", report.to_json() if hasattr(report, "to_json") else report)
        save_model(defended, run / "model", meta)
    finally:
        run.close()
    return run.path
