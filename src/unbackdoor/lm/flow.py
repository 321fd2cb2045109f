"""The LM threat model as one flow: poison -> backdoor SFT -> defense -> evaluation -> run folders.

Every ``unbackdoor lm`` command, the Python API, the tiny world, the sweep and the demo go through
these functions, so an LM run folder (docs/ARCHITECTURE.md) is written in one place:
:func:`defend_loaded`. A defense sees only the clean subset (its indices are recorded); the test
prompts and the attack's settings are used by the evaluation alone, and ``threat_model.json``
says what else the defense was given (the base model, when it needs one).
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core import distributed
from ..core.config import to_dict
from ..core.defense import DefenseSpec, defense_metrics, key_settings, write_threat_model
from ..core.defense import resolve_defense as core_resolve
from ..core.errors import ConfigError, DataError
from ..core.model_card import write_model_card
from ..core.paths import MARKER_KEY, check_outputs, output_path
from ..core.resources import PeakMemory, model_device
from ..core.runs import atomic_write_json, staged_run
from ..core.seeds import set_seed
from .data import read_alpaca, write_alpaca
from .defenses import LM_DEFENSES, LMDefenseContext
from .decoding_defense import decoding_defense_inputs
from .evaluate import EvalConfig, backdoor_check, evaluate_model, layer_cosine_profile
from .models import is_adapter_dir, is_decoding_defense_dir, load_causal_lm, save_causal_lm
from .poison import PoisonConfig, make_triggered_test, poison_dataset, poisoned_indices

log = logging.getLogger("unbackdoor")

COMMAND_DEFEND = "lm defend"


# ---- pieces --------------------------------------------------------------------------------------

def select_clean(n_available: int, n: int | None, seed: int) -> list[int]:
    """Indices of the clean records a defense may use: all, or ``n`` drawn from ``seed`` (sorted)."""
    if n_available == 0:
        raise DataError("the clean set is empty", where="clean data",
                        fix="pass about 100 clean Alpaca records (instruction / input / output)")
    if n is not None and n <= 0:
        raise ConfigError(f"--clean-count {n} must be > 0", where="--clean-count",
                          fix="pass a positive number, or leave it out to use every clean record")
    if n is None or n >= n_available:
        return list(range(n_available))
    return sorted(random.Random(seed).sample(range(n_available), n))


def resolve_defense(method: str, config: Any = None, *, preset: str | None = None,
                    overrides: Mapping[str, Any] | None = None) -> tuple[DefenseSpec, Any, str | None]:
    """``(spec, config, preset)`` for ``method`` (``crow``, or ``crow-released`` = CROW's preset ``released``)."""
    return core_resolve(LM_DEFENSES, method, config, preset=preset, overrides=overrides)


def evaluation_block(model: Any, tok: Any, clean: Sequence[Mapping[str, Any]], triggered: Sequence[Mapping[str, Any]],
                     poison: PoisonConfig, ecfg: EvalConfig, desc: str, n_profile: int = 64
                     ) -> tuple[dict[str, float], dict[str, list[str]], dict[str, Any]]:
    """Metrics, generations and the layer-consistency profile (means and per prompt) of one model."""
    metrics, gens = evaluate_model(model, tok, clean, triggered, poison, ecfg, desc=desc)
    n = min(n_profile, len(clean), len(triggered))
    profile: dict[str, Any] = {"per_prompt": {}}
    for key, recs in (("clean", clean[:n]), ("triggered", triggered[:n])):
        mean, rows = layer_cosine_profile(model, tok, recs, template=ecfg.template, per_prompt=True)
        profile[key] = mean
        profile["per_prompt"][key] = rows
    return metrics, gens, profile


def generation_records(clean: Sequence[Mapping[str, Any]], triggered: Sequence[Mapping[str, Any]],
                       before: Mapping[str, list[str]], after: Mapping[str, list[str]]) -> list[dict[str, Any]]:
    """Every test prompt with its reference and the answers before and after (``generations.json``)."""
    out = []
    for flag, recs, key in ((True, triggered, "triggered"), (False, clean, "clean")):
        for r, b, a in zip(recs, before[key], after[key]):
            prompt = r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")
            out.append({"prompt": prompt, "reference": r["output"], "triggered": flag, "before": b, "after": a})
    return out


def require_base_model(spec: DefenseSpec, base_model: Any) -> None:
    """Refuse a reference-model defense without ``--base-model`` (before any model is loaded)."""
    if spec.needs.base_model and base_model is None:
        raise ConfigError(f"defense '{spec.name}' needs the clean base model the suspect was finetuned from",
                          where="--base-model", fix="pass --base-model FOLDER (the reference model)")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _input_paths(model: Any, adapter: Any = None) -> list[Any]:
    """The folders a model load reads: the model (or adapter) folder and the base it names."""
    paths = [model, adapter]
    if model is not None and Path(str(model)).is_dir() and is_decoding_defense_dir(model):
        paths += decoding_defense_inputs(model)
    for p in (model, adapter):
        if p is not None and Path(str(p)).is_dir() and is_adapter_dir(p):
            try:
                base = json.loads((Path(p) / "adapter_config.json").read_text()).get("base_model_name_or_path")
            except (OSError, ValueError):
                base = None
            if base and Path(str(base)).exists():
                paths.append(base)
    return paths


# ---- defend --------------------------------------------------------------------------------------

def defend_loaded(out: str | Path, model: Any, tok: Any, clean: Sequence[Mapping[str, Any]],
                  clean_indices: Sequence[int], method: str, cfg: Any = None, *, preset: str | None = None,
                  test: Sequence[Mapping[str, Any]] | None = None, triggered: Sequence[Mapping[str, Any]] | None = None,
                  poison: PoisonConfig | None = None, eval_cfg: EvalConfig | None = None, template: str = "alpaca",
                  before: tuple[dict[str, float], dict[str, list[str]], dict[str, Any]] | None = None,
                  sources: dict[str, Any] | None = None, inputs: Sequence[Any] = (), merge: bool = True,
                  resume: bool = False, overwrite: bool = False, base_model: str | Path | None = None,
                  trust_remote_code: bool = False, n_profile: int = 64, name: str | None = None,
                  extra_timings: dict[str, float] | None = None) -> Path:
    """One complete LM run folder: config, env, clean indices, threat model, timings, metrics, artifacts, model.

    ``test`` and ``triggered`` (records) measure the model before and after (``before`` reuses an
    earlier measurement of the same model). ``poison`` names the attack and task being judged
    (recorded even without test data). The defended model goes to ``out/model``.
    """
    spec, cfg, preset = resolve_defense(method, cfg, preset=preset)
    name = name or (f"{spec.name}-{preset}" if preset and preset != "paper" else spec.name)
    poison = poison or PoisonConfig()
    ecfg = eval_cfg or EvalConfig(template=template)
    if ecfg.template != template:
        raise ConfigError(f"the defense trains with template '{template}' but the evaluation uses '{ecfg.template}'",
                          where="template / eval_cfg.template",
                          fix="use the same prompt template in training and evaluation (--template sets both)")
    utility_metric = ecfg.utility_metric
    trigger = list(poison.trigger_set())
    seed = int(getattr(cfg, "seed", 0))
    require_base_model(spec, base_model)
    out = check_outputs([out], [*inputs, base_model], command=COMMAND_DEFEND, overwrite=overwrite)[0]
    measured = test is not None and triggered is not None
    fingerprint = {"method": spec.name, "preset": preset, "config": to_dict(cfg), "clean": _digest(list(clean_indices)),
                   "model": (sources or {}).get("model"), "template": template}
    with staged_run(out, fingerprint=fingerprint, resume=resume) as run:
        run.start(cfg, seed, "lm-defense", command=COMMAND_DEFEND, method=spec.name, preset=preset,
                  template=template, attack=poison.attack, task=poison.task, trigger=trigger,
                  utility_metric=utility_metric, sources=sources or {},
                  eval=to_dict(ecfg), poison_for_eval=to_dict(poison) if measured else None)
        if extra_timings:
            run.timings.update({k: round(v, 4) for k, v in extra_timings.items()})
        run.write_indices(clean_indices)
        given = dict(clean_samples=len(clean_indices), clean_source=(sources or {}).get("clean"),
                     base_model=str(base_model) if base_model is not None else None,
                     template=template, test_seen_by_defense=False)
        write_threat_model(run, spec, **given)
        spec.check_model(model, cfg)  # before minutes of evaluation
        if measured and before is None:
            with run.phase("evaluate_before"):
                before = evaluation_block(model, tok, test, triggered, poison, ecfg, "before", n_profile)
        check = backdoor_check(before[0], ecfg.max_false_trigger_rate) if measured else None
        if check is not None and not check["trigger_specific"]:
            log.warning("the model before the defense: %s", check["warning"])
        ctx = LMDefenseContext(work_dir=run.path / "trainer", template=template, seed=seed, resume=resume,
                               base_model_path=str(base_model) if base_model is not None else None,
                               base_model_loader=(lambda: load_causal_lm(base_model, trust_remote_code=trust_remote_code))
                               if base_model is not None else None,
                               model_path=(sources or {}).get("model"), adapter_path=(sources or {}).get("adapter"))
        set_seed(seed)
        t0 = time.perf_counter()
        with run.phase("train" if spec.needs.trains else "defend"), PeakMemory(model_device(model)) as memory:
            model = spec.run(model, tok, list(clean), cfg, ctx)
        seconds = time.perf_counter() - t0
        if ctx.record:  # what the defense reported about itself (backend, chosen scale, behaviour examples)
            write_threat_model(run, spec, **given, defense_info=ctx.record)
        after_m: dict[str, Any] = {}
        if measured:
            with run.phase("evaluate"):
                after_m, after_g, prof_a = evaluation_block(model, tok, test, triggered, poison, ecfg, name, n_profile)
            prof_b = before[2]
            run.write_json("layer_cosine.json", {
                "before": {k: prof_b[k] for k in ("clean", "triggered")},
                "after": {k: prof_a[k] for k in ("clean", "triggered")},
                "per_prompt": {"before": prof_b.get("per_prompt", {}), "after": prof_a.get("per_prompt", {})}})
            run.write_json("generations.json", generation_records(test, triggered, before[1], after_g))
        with run.phase("save"):  # rank 0 only under `accelerate launch`; the others wait for it
            distributed.on_main_process(save_causal_lm, model, tok, run.path / "model", merge=merge,
                                        inputs=[p for p in inputs if p is not None])
            distributed.on_main_process(write_model_card, run.path / "model", {
                "defense": name, "kind": "lm", "variant": preset, "settings": key_settings(cfg),
                "base_model": (sources or {}).get("model"), "adapter": not merge and is_adapter_dir(run.path / "model"),
                "clean_data": {"source": (sources or {}).get("clean"), "count": len(clean_indices)},
                "template": template, "attack": poison.attack, "task": poison.task, "seed": seed,
                "metrics": {"before": before[0], "after": after_m} if measured else None})
        run.write_metrics(defense_metrics(
            kind="lm", defense=name, variant=preset, attack=poison.attack, task=poison.task, seed=seed,
            before=before[0] if measured else {}, after=after_m, seconds=seconds, template=template,
            clean_samples=len(clean_indices), n_clean=len(test) if measured else 0,
            n_triggered=len(triggered) if measured else 0, utility_metric=utility_metric, trigger=trigger,
            eval_rules=ecfg.rules(), backdoor_check=check,
            peak_memory_mib=memory.peak_mib, memory_method=memory.method,
            **({"defense_info": ctx.record} if ctx.record else {})))
    return run.path


def defend(model: str | Path, clean: str | Path, out: str | Path, method: str = "crow", config: Any = None, *,
           preset: str | None = None, test: str | Path | None = None, triggered: str | Path | None = None,
           poison: PoisonConfig | None = None, eval_cfg: EvalConfig | None = None, template: str = "alpaca",
           adapter: str | Path | None = None, base_model: str | Path | None = None, n_clean: int | None = None,
           merge: bool = True, trust_remote_code: bool = False, resume: bool = False, overwrite: bool = False,
           **overrides: Any) -> Path:
    """Defend a causal-LM folder (or adapter folder) with a registered defense on a clean Alpaca file.

    With ``test`` (clean test prompts) and ``triggered`` (or ``poison``, to trigger the test set),
    the model is evaluated before and after and ``metrics.json`` holds both; without them
    ``before``/``after`` are empty. The defended model goes to ``out/model``.
    """
    spec, cfg, preset = resolve_defense(method, config, preset=preset, overrides=overrides)
    require_base_model(spec, base_model)
    inputs = [*_input_paths(model, adapter), clean, test, triggered]
    out = check_outputs([out], [*inputs, base_model], command=COMMAND_DEFEND, overwrite=overwrite)[0]
    records = read_alpaca(clean)
    seed = int(getattr(cfg, "seed", 0))
    idx = select_clean(len(records), n_clean, seed)
    test_recs = read_alpaca(test) if test else None
    if test_recs is not None and triggered is None and poison is None:
        raise ConfigError("evaluating needs triggered test prompts: pass a triggered file or the attack",
                          where="defend --test", fix="add --triggered FILE, or --attack/--task to build them")
    poison = poison or PoisonConfig()
    trig_recs = read_alpaca(triggered) if triggered else (make_triggered_test(test_recs, poison) if test_recs else None)
    set_seed(seed)
    net, tok = load_causal_lm(model, adapter=adapter, trust_remote_code=trust_remote_code)
    return defend_loaded(out, net, tok, [records[i] for i in idx], idx, spec.name, cfg, preset=preset,
                         test=test_recs, triggered=trig_recs, poison=poison, eval_cfg=eval_cfg, template=template,
                         sources={"model": str(model), "adapter": str(adapter) if adapter else None,
                                  "clean": str(clean), "test": str(test) if test else None,
                                  "triggered": str(triggered) if triggered else None},
                         inputs=inputs, merge=merge, resume=resume, overwrite=overwrite, base_model=base_model,
                         trust_remote_code=trust_remote_code)


# ---- the other commands ----------------------------------------------------------------------------

def poison_file(data: str | Path, out: str | Path, cfg: PoisonConfig, *, triggered_test: bool = False,
                overwrite: bool = False) -> Path:
    """Poison an Alpaca file (or, with ``triggered_test``, trigger every record, keeping its answer).

    The settings and the poisoned indices go to ``<out stem>.poison.json`` beside it.
    """
    out = output_path(out)
    sidecar = out.with_name(out.stem + ".poison.json")
    check_outputs([out, sidecar], [data], command="lm poison", overwrite=overwrite)
    records = read_alpaca(data)
    poisoned = make_triggered_test(records, cfg) if triggered_test else poison_dataset(records, cfg)
    write_alpaca(poisoned, out)
    idx = list(range(len(records))) if triggered_test else poisoned_indices(len(records), cfg)
    atomic_write_json(sidecar, {MARKER_KEY: "lm poison", "poison": to_dict(cfg), "triggered_test": triggered_test,
                                "poisoned_indices": idx, "source": str(data)})
    if not triggered_test:
        log.info("poisoned %d of %d records (%s, %s, seed %d)", len(idx), len(records), cfg.attack, cfg.task, cfg.seed)
    return out


def attack_model(model_dir: str | Path, data: str | Path, out_dir: str | Path, sft: Any, *,
                 poison: PoisonConfig | None = None, adapter: str | Path | None = None, template: str = "alpaca",
                 merge: bool = False, trust_remote_code: bool = False, resume: bool = False,
                 overwrite: bool = False) -> Path:
    """Inject a backdoor: SFT on ``data`` (poisoned first with ``poison`` when given); save to ``out_dir/model``."""
    from .training import train_sft

    inputs = [*_input_paths(model_dir, adapter), data]
    out = check_outputs([out_dir], inputs, command="lm attack", overwrite=overwrite)[0]
    records = read_alpaca(data)
    fingerprint = {"sft": to_dict(sft), "poison": to_dict(poison) if poison else None, "model": str(model_dir),
                   "data": str(data), "template": template}
    with staged_run(out, fingerprint=fingerprint, resume=resume) as run:
        run.start({"sft": to_dict(sft), "poison": to_dict(poison) if poison else None, "model": str(model_dir),
                   "data": str(data), "template": template}, int(sft.seed), "lm-attack", command="lm attack",
                  template=template)
        if poison is not None:
            records = poison_dataset(records, poison, max_length=sft.max_length)
            write_alpaca(records, run.path / "poisoned_train.json")
        model, tok = load_causal_lm(model_dir, adapter=adapter, trust_remote_code=trust_remote_code)
        with run.phase("train"):
            model = train_sft(model, tok, records, sft, run.path / "trainer", template=template, resume=resume)
        with run.phase("save"):
            distributed.on_main_process(save_causal_lm, model, tok, run.path / "model", merge=merge,
                                        inputs=[p for p in inputs if p is not None])
    return out / "model"


def evaluate(model: str | Path, test: str | Path, *, triggered: str | Path | None = None,
             poison: PoisonConfig | None = None, eval_cfg: EvalConfig | None = None,
             adapter: str | Path | None = None, out: str | Path | None = None, trust_remote_code: bool = False,
             overwrite: bool = False) -> dict[str, Any]:
    """Metrics of a model folder on a clean test file and its triggered version (given, or built from ``poison``)."""
    poison = poison or PoisonConfig()
    ecfg = eval_cfg or EvalConfig()
    inputs = [*_input_paths(model, adapter), test, triggered]
    if out is not None:
        check_outputs([out], inputs, command="lm evaluate", overwrite=overwrite)
    test_recs = read_alpaca(test)
    trig_recs = read_alpaca(triggered) if triggered else make_triggered_test(test_recs, poison)
    net, tok = load_causal_lm(model, adapter=adapter, trust_remote_code=trust_remote_code)
    metrics, gens, prof = evaluation_block(net, tok, test_recs, trig_recs, poison, ecfg, "evaluate")
    result = {"kind": "lm", "model": str(model), "attack": poison.attack, "task": poison.task,
              "trigger": list(poison.trigger_set()), "template": ecfg.template,
              "utility_metric": ecfg.utility_metric, "eval_rules": ecfg.rules(),
              "metrics": metrics, "backdoor_check": backdoor_check(metrics, ecfg.max_false_trigger_rate),
              "layer_cosine": {k: prof[k] for k in ("clean", "triggered")}}
    if out is not None:
        distributed.on_main_process(atomic_write_json, out, {MARKER_KEY: "lm evaluate", **result,
                                                             "generations": gens})
    return result


__all__ = ["COMMAND_DEFEND", "attack_model", "defend", "defend_loaded", "evaluate", "evaluation_block",
           "generation_records", "poison_file", "require_base_model", "resolve_defense", "select_clean"]
