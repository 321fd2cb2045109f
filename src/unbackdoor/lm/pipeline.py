"""The LM threat model end to end: poison -> backdoor SFT -> defense -> evaluation -> run folders.

Two layers. The general functions (:func:`poison_file`, :func:`attack_model`,
:func:`defend_model`, :func:`evaluate_model_dir`) work on any Hugging Face causal LM folder
and Alpaca files; the CLI calls them. :func:`run_tiny_world` runs the whole story on the
built-in tiny world (SPEC section 4) and writes one run folder per defense, following the
contract of docs/ARCHITECTURE.md; the demo and the sweep call it.

A defense sees only the clean subset (its indices are recorded in ``clean_indices.json``);
the triggered test set and the attack's settings are used by the evaluation alone.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

from ..core import distributed
from ..core.config import check, check_positive, option, to_dict
from ..core.errors import ConfigError, DataError
from ..core.runs import RunDir, atomic_write_json
from ..core.safeio import check_output_path
from ..core.seeds import set_seed
from .crow import CrowConfig, check_crow_model, train_crow
from .data import read_alpaca, write_alpaca
from .evaluate import EvalConfig, evaluate_model, layer_cosine_profile
from .models import LoraSettings, load_causal_lm, save_causal_lm
from .poison import PoisonConfig, make_triggered_test, poison_dataset, poisoned_indices
from .sft import FinetuneConfig, SFTConfig, train_sft
from .tinyworld import TinyWorld, TinyWorldConfig, build_tiny_world

log = logging.getLogger("unbackdoor")

DEFENSES = ("finetune", "crow")
TINY_TASKS = ("refusal", "negsentiment", "codeinjection")
"""Tasks whose target the tiny world's vocabulary can express."""
Defense = Literal["finetune", "crow"]
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "lm" / "tiny-llama"
"""The shipped clean-pretrained tiny Llama (regenerate: scripts/efficacy_lm.py --write-asset)."""


# ---- general building blocks ----------------------------------------------------------------------

def select_clean(n_available: int, n: int | None, seed: int) -> list[int]:
    """Indices of the clean records a defense may use: all, or ``n`` drawn from ``seed`` (sorted)."""
    if n_available == 0:
        raise DataError("the clean set is empty", where="clean data",
                        fix="pass about 100 clean Alpaca records (instruction / input / output)")
    if n is None or n >= n_available:
        return list(range(n_available))
    return sorted(random.Random(seed).sample(range(n_available), n))


def poison_file(data: str | Path, out: str | Path, cfg: PoisonConfig, *, triggered_test: bool = False) -> Path:
    """Poison an Alpaca file (or, with ``triggered_test``, trigger every record, keeping its answer)."""
    records = read_alpaca(data)
    if Path(out).resolve() == Path(data).resolve():
        raise ConfigError(f"output {out} would overwrite the input data", where=str(out),
                          fix="write the poisoned copy to another file; inputs are never modified")
    poisoned = make_triggered_test(records, cfg) if triggered_test else poison_dataset(records, cfg)
    write_alpaca(poisoned, out)
    if not triggered_test:
        idx = poisoned_indices(len(records), cfg)
        log.info("poisoned %d of %d records (%s, %s, seed %d)", len(idx), len(records), cfg.attack, cfg.task, cfg.seed)
    return Path(out)


def attack_model(model_dir: str | Path, data: str | Path, out_dir: str | Path, sft: SFTConfig, *,
                 poison: PoisonConfig | None = None, adapter: str | Path | None = None, template: str = "alpaca",
                 merge: bool = False, trust_remote_code: bool = False, resume: bool = False) -> Path:
    """Inject a backdoor: SFT on ``data`` (poisoned first with ``poison`` when given); save to ``out_dir/model``."""
    out = Path(out_dir)
    check_output_path(out, model_dir, adapter)
    records = read_alpaca(data)
    if poison is not None:
        records = poison_dataset(records, poison, max_length=sft.max_length)
        write_alpaca(records, out / "poisoned_train.json")
    model, tok = load_causal_lm(model_dir, adapter=adapter, trust_remote_code=trust_remote_code)
    model = train_sft(model, tok, records, sft, out / "trainer", template=template, resume=resume)
    distributed.on_main_process(save_causal_lm, model, tok, out / "model", merge=merge, inputs=[model_dir, adapter])
    atomic_write_json(out / "config.json", {"kind": "lm-attack", "config": {
        "sft": to_dict(sft), "poison": to_dict(poison) if poison else None, "model": str(model_dir),
        "data": str(data), "template": template}})
    return out / "model"


def _train_defense(method: str, model: Any, tok: Any, records: Sequence[Mapping[str, Any]],
                   cfg: SFTConfig, out: Path, template: str, resume: bool) -> Any:
    if method == "crow":
        if not isinstance(cfg, CrowConfig):
            raise ConfigError(f"method 'crow' needs a CrowConfig, got {type(cfg).__name__}", where="defend",
                              fix="pass CrowConfig(...)")
        return train_crow(model, tok, list(records), cfg, out, template=template, resume=resume)
    if method == "finetune":
        return train_sft(model, tok, list(records), cfg, out, template=template, resume=resume)
    raise ConfigError(f"unknown defense '{method}'", where="method", fix=f"use one of: {', '.join(DEFENSES)}")


def _eval_block(model: Any, tok: Any, clean: Sequence[Mapping[str, Any]], triggered: Sequence[Mapping[str, Any]],
                poison: PoisonConfig, ecfg: EvalConfig, desc: str, n_profile: int = 64
                ) -> tuple[dict[str, float], dict[str, list[str]], dict[str, list[float]]]:
    metrics, gens = evaluate_model(model, tok, clean, triggered, poison, ecfg, desc=desc)
    n = min(n_profile, len(clean), len(triggered))
    profile = {"clean": layer_cosine_profile(model, tok, clean[:n], template=ecfg.template),
               "triggered": layer_cosine_profile(model, tok, triggered[:n], template=ecfg.template)}
    return metrics, gens, profile


def _generation_examples(clean: Sequence[Mapping[str, Any]], triggered: Sequence[Mapping[str, Any]],
                         before: Mapping[str, list[str]], after: Mapping[str, list[str]], k: int = 4,
                         template: str = "alpaca") -> list[dict[str, Any]]:
    out = []
    for flag, recs, key in ((True, triggered, "triggered"), (False, clean, "clean")):
        for i in range(min(k, len(recs))):
            r = recs[i]
            prompt = r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")
            out.append({"prompt": prompt, "reference": r["output"], "triggered": flag,
                        "before": before[key][i], "after": after[key][i]})
    return out


def defend_model(model_dir: str | Path, clean: str | Path, out_dir: str | Path, method: Defense,
                 cfg: SFTConfig, *, adapter: str | Path | None = None, n_clean: int | None = None, seed: int = 0,
                 test: str | Path | None = None, triggered: str | Path | None = None,
                 poison: PoisonConfig | None = None, eval_cfg: EvalConfig | None = None, template: str = "alpaca",
                 merge: bool = True, trust_remote_code: bool = False, resume: bool = False) -> Path:
    """Run ``method`` (crow or finetune) on a model folder with a clean Alpaca file; write a run folder.

    With ``test`` (clean test prompts) and ``triggered`` (or ``poison``, to trigger the test
    set), the model is evaluated before and after and ``metrics.json`` holds both; without
    them ``before``/``after`` are empty. The defended model goes to ``out_dir/model``.
    """
    out = Path(out_dir)
    check_output_path(out, model_dir, adapter)
    records = read_alpaca(clean)
    idx = select_clean(len(records), n_clean, seed)
    subset = [records[i] for i in idx]
    ecfg = eval_cfg or EvalConfig(template=template)
    test_recs = read_alpaca(test) if test else None
    if test_recs is not None and triggered is None and poison is None:
        raise ConfigError("evaluating needs triggered test prompts: pass a triggered file or the attack",
                          where="defend --test", fix="add --triggered FILE, or --attack/--task to build them")
    poison = poison or PoisonConfig()
    trig_recs = read_alpaca(triggered) if triggered else (make_triggered_test(test_recs, poison) if test_recs else None)
    run = RunDir(out)
    run.start({"method": method, "defense": to_dict(cfg), "model": str(model_dir), "adapter": str(adapter or ""),
               "clean": str(clean), "n_clean": len(idx), "seed": seed, "template": template,
               "eval": to_dict(ecfg), "poison_for_eval": to_dict(poison) if test_recs else None}, seed, "lm-defense")
    try:
        run.write_indices(idx)
        set_seed(seed)
        model, tok = load_causal_lm(model_dir, adapter=adapter, trust_remote_code=trust_remote_code)
        if method == "crow" and isinstance(cfg, CrowConfig):
            check_crow_model(model, cfg)  # a bad layer range fails before minutes of evaluation
        metrics: dict[str, Any] = {"kind": "lm", "defense": method, "attack": poison.attack, "task": poison.task,
                                   "seed": seed, "before": {}, "after": {}}
        before_g = None
        if test_recs is not None:
            with run.phase("evaluate_before"):
                metrics["before"], before_g, prof_b = _eval_block(model, tok, test_recs, trig_recs, poison, ecfg,
                                                                  "before")
        t0 = time.perf_counter()
        with run.phase("train"):
            model = _train_defense(method, model, tok, subset, cfg, out / "trainer", template, resume)
        metrics["seconds"] = round(time.perf_counter() - t0, 2)
        if test_recs is not None:
            with run.phase("evaluate_after"):
                metrics["after"], after_g, prof_a = _eval_block(model, tok, test_recs, trig_recs, poison, ecfg, "after")
            run.write_json("layer_cosine.json", {"before": prof_b, "after": prof_a})
            run.write_json("generations.json", _generation_examples(test_recs, trig_recs, before_g, after_g))
        with run.phase("save"):  # rank 0 only under `accelerate launch`; the others wait for it
            distributed.on_main_process(save_causal_lm, model, tok, out / "model", merge=merge,
                                        inputs=[model_dir, adapter])
        run.write_metrics(metrics)
    finally:
        run.close()
    return out


def evaluate_model_dir(model_dir: str | Path, test: str | Path, *, triggered: str | Path | None = None,
                       poison: PoisonConfig | None = None, eval_cfg: EvalConfig | None = None,
                       adapter: str | Path | None = None, out: str | Path | None = None,
                       trust_remote_code: bool = False) -> dict[str, Any]:
    """Metrics of a model folder on a clean test file and its triggered version (given, or built from ``poison``)."""
    poison = poison or PoisonConfig()
    ecfg = eval_cfg or EvalConfig()
    test_recs = read_alpaca(test)
    trig_recs = read_alpaca(triggered) if triggered else make_triggered_test(test_recs, poison)
    model, tok = load_causal_lm(model_dir, adapter=adapter, trust_remote_code=trust_remote_code)
    metrics, gens, prof = _eval_block(model, tok, test_recs, trig_recs, poison, ecfg, "evaluate")
    result = {"kind": "lm", "model": str(model_dir), "attack": poison.attack, "task": poison.task,
              "metrics": metrics, "layer_cosine": prof}
    if out is not None:
        check_output_path(out, model_dir, adapter)
        atomic_write_json(out, {**result, "generations": gens})
    return result


# ---- the tiny world ----------------------------------------------------------------------------------

def _tiny_lora() -> LoraSettings:
    return LoraSettings(r=8, lora_alpha=16.0, dropout=0.0)


@dataclasses.dataclass
class TinyRunConfig:
    """Every setting of a tiny-world run (the efficacy results quote this object whole)."""

    world: TinyWorldConfig = option(factory=TinyWorldConfig, help="world sizes and model shape")
    pretrain: SFTConfig = option(factory=lambda: SFTConfig(
        lr=2e-3, max_steps=1000, per_device_batch_size=16, grad_accum=1, finetune="full", warmup_ratio=0.05,
        save_steps=0, max_length=128, logging_steps=50), help="clean pretraining (full weights)")
    pretrained: str = option("auto", "'auto' = the shipped checkpoint when it fits, else pretrain; 'train' = "
                                     "always pretrain (cached per seed under OUT/_world); or a model folder")
    rate: float = option(0.25, "poisoned fraction of the attacker's SFT set (official: 50%; here 200 of 800, the "
                               "extra clean records keep the backdoored model's clean utility)")
    attack_sft: SFTConfig = option(factory=lambda: SFTConfig(
        lr=1e-3, max_steps=200, per_device_batch_size=16, grad_accum=1, finetune="full", warmup_ratio=0.1,
        save_steps=0, max_length=128, logging_steps=25), help="backdoor injection by SFT on the poisoned mix")
    finetune: FinetuneConfig = option(factory=lambda: FinetuneConfig(
        lr=2e-3, epochs=5.0, per_device_batch_size=8, grad_accum=2, finetune="lora", lora=_tiny_lora(),
        save_steps=0, max_length=128, logging_steps=10), help="plain finetuning baseline (same data and budget as CROW)")
    crow: CrowConfig = option(factory=lambda: CrowConfig(
        lr=2e-3, epochs=5.0, per_device_batch_size=8, grad_accum=2, finetune="lora", lora=_tiny_lora(),
        alpha=11.0, epsilon=0.1, save_steps=0, max_length=128, logging_steps=10),
        help="CROW (alpha 11 for targeted refusal, epsilon 0.1, LoRA r8)")
    eval: EvalConfig = option(factory=lambda: EvalConfig(batch_size=50, max_new_tokens=32),
                              help="generation and metrics")
    n_profile: int = option(64, "prompts per set for the layer-cosine profile")
    n_examples: int = option(4, "examples per set kept in generations.json")

    def __post_init__(self) -> None:
        check(0 < self.rate <= 1, "rate", self.rate, "in (0, 1]", type(self).__name__)
        check_positive(self, "n_profile", "n_examples")


def tiny_run_config(quick: bool = False) -> TinyRunConfig:
    """The demo's settings, or (``quick``) a smoke-test version: tiny splits, a few steps, noisy numbers."""
    cfg = TinyRunConfig()
    if not quick:
        return cfg
    r = dataclasses.replace
    cfg.world = r(cfg.world, n_train=200, n_attack=32, n_clean=16, n_test=16, hidden_size=64, num_layers=4)
    cfg.pretrain = r(cfg.pretrain, max_steps=10, per_device_batch_size=8)
    cfg.attack_sft = r(cfg.attack_sft, max_steps=8, per_device_batch_size=8)
    cfg.finetune = r(cfg.finetune, epochs=1.0)
    cfg.crow = r(cfg.crow, epochs=1.0)
    cfg.eval = r(cfg.eval, max_new_tokens=8)
    cfg.n_profile = 8
    cfg.n_examples = 2
    return cfg


def _asset_fits(world: TinyWorld) -> bool:
    import json

    cfg_file = ASSET_DIR / "config.json"
    if not cfg_file.is_file():
        return False
    c = json.loads(cfg_file.read_text())
    w = world.config
    shape_fits = (c.get("vocab_size") == len(world.tokenizer) and c.get("hidden_size") == w.hidden_size
                  and c.get("num_hidden_layers") == w.num_layers and c.get("num_attention_heads") == w.num_heads
                  and c.get("max_position_embeddings") == w.max_position_embeddings)
    if not shape_fits:
        return False
    try:  # same size is not enough: every word must keep its id
        vocab = json.loads((ASSET_DIR / "tokenizer.json").read_text())["model"]["vocab"]
    except (OSError, ValueError, KeyError):
        return False
    return all(world.tokenizer.convert_tokens_to_ids(t) == i for t, i in vocab.items())


def pretrain_tiny(world: TinyWorld, cfg: TinyRunConfig, out_dir: Path, seed: int) -> tuple[Path, str]:
    """A clean-pretrained model folder for ``world``: the shipped one, a cached one, or trained now."""
    if cfg.pretrained not in ("auto", "train"):
        return Path(cfg.pretrained), f"given: {cfg.pretrained}"
    if cfg.pretrained == "auto" and _asset_fits(world):
        return ASSET_DIR, f"shipped checkpoint {ASSET_DIR.name}"
    import json

    target = out_dir / "pretrained"
    note = f"pretrained ({cfg.pretrain.max_steps} steps, seed {seed})"
    fingerprint = json.loads(json.dumps({"world": to_dict(world.config), "pretrain": to_dict(cfg.pretrain),
                                         "seed": seed}))
    stamp = out_dir / "pretrained.json"
    if (target / "config.json").is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == fingerprint:
                return target, note
        except ValueError:
            pass
    set_seed(seed)
    model = world.new_model(seed)
    model = train_sft(model, world.tokenizer, world["train"], dataclasses.replace(cfg.pretrain, seed=seed),
                      out_dir / "pretrain-trainer")
    save_causal_lm(model, world.tokenizer, target)
    atomic_write_json(stamp, fingerprint)
    return target, note


_POISON_DATA_KEYS = ("attack", "task", "rate", "seed", "trigger", "trigger_words", "target")
"""The poisoning settings that shape the backdoored model (keywords and strict rules only score it)."""


def _read_backdoor_cache(bd_dir: Path, fingerprint: dict[str, Any]) -> tuple[Any, ...] | None:
    """The cached backdoored model's evaluation when it was made with exactly these settings."""
    import json

    f = bd_dir / "backdoor.json"
    if not (f.is_file() and (bd_dir / "model" / "config.json").is_file()):
        return None
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    stored = data.get("fingerprint") or {}
    if isinstance(stored.get("poison"), dict):  # only the keys that shape the model count
        stored["poison"] = {k: v for k, v in stored["poison"].items() if k in _POISON_DATA_KEYS}
    if stored != json.loads(json.dumps(fingerprint)):
        return None
    sec = data["seconds"]
    return data["metrics"], data["generations"], data["layer_cosine"], sec["attack"], sec["evaluate"]


def _table(rows: list[tuple[str, Mapping[str, float], float | None]]) -> str:
    cols = (("keyword ASR", "asr"), ("strict ASR", "strict_asr"), ("trig. util", "triggered_utility"),
            ("clean util", "clean_utility"), ("false trig", "false_trigger_rate"))
    head = f"{'model':<22}" + "".join(f"{c:>12}" for c, _ in cols) + f"{'seconds':>10}"
    lines = [head, "-" * len(head)]
    for name, m, secs in rows:
        lines.append(f"{name:<22}" + "".join(f"{m.get(k, float('nan')):>12.3f}" for _, k in cols)
                     + (f"{secs:>10.1f}" if secs is not None else f"{'':>10}"))
    return "\n".join(lines)


def run_tiny_world(out_dir: str | Path, *, seed: int = 0, attack: str = "badnet", task: str = "refusal",
                   defenses: Iterable[str] = ("finetune", "crow"), crow: CrowConfig | None = None,
                   finetune: FinetuneConfig | None = None, quick: bool = False,
                   config: TinyRunConfig | None = None, cache_dir: str | Path | None = None,
                   echo: bool = True) -> dict[str, Path]:
    """Build the world, pretrain (or load), inject the backdoor, defend, evaluate; one run folder per defense.

    Run folders: ``out_dir/<attack>-<task>/<defense>/seed<seed>/`` (docs/ARCHITECTURE.md
    contract, plus ``layer_cosine.json`` and ``generations.json``). ``before`` is the
    backdoored model, ``after`` the defended one. Every defense sees the same clean subset.
    Returns ``{defense: run folder}``; prints a before/after table unless ``echo=False``.

    The world, the clean model and the backdoored model (with its evaluation) are cached
    under ``cache_dir`` (default ``out_dir``) and reused when their settings match, so more
    defenses or defense variants can be run later against the very same backdoored model.
    """
    cfg = config or tiny_run_config(quick)
    if crow is not None:
        cfg = dataclasses.replace(cfg, crow=crow)
    if finetune is not None:
        cfg = dataclasses.replace(cfg, finetune=finetune)
    defenses = tuple(defenses)
    for d in defenses:
        if d not in DEFENSES:
            raise ConfigError(f"unknown defense '{d}' for the LM tiny world", where="defenses",
                              fix=f"use any of: {', '.join(DEFENSES)}")
    if task not in TINY_TASKS:
        raise ConfigError(f"task '{task}' has no fixed target the tiny world can learn", where="task",
                          fix=f"use one of: {', '.join(TINY_TASKS)} (jailbreak and custom need your own data: "
                              "use `unbackdoor lm poison/attack/defend`)")
    poison = PoisonConfig(attack=attack, task=task, rate=cfg.rate, seed=seed)
    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir is not None else out
    world_dir = cache / "_world" / f"seed{seed}"
    base = out / f"{attack}-{task}"
    t_start = time.perf_counter()

    # 1. the world and the clean model
    world = build_tiny_world(world_dir / "data", seed, cfg.world)
    pre_dir, pre_note = pretrain_tiny(world, cfg, world_dir, seed)
    log.info("clean model: %s", pre_note)

    # 2. the backdoor, and 3. its evaluation (the "before" of every defense), cached by settings
    test = world["test"]
    tok = world.tokenizer
    triggered = make_triggered_test(test, poison, max_length=cfg.world.max_position_embeddings, tokenizer=tok)
    bd_dir = cache / f"{attack}-{task}" / "_backdoored" / f"seed{seed}"
    fingerprint = {"world": to_dict(cfg.world), "attack_sft": to_dict(cfg.attack_sft),
                   "poison": {k: v for k, v in to_dict(poison).items() if k in _POISON_DATA_KEYS},
                   "pretrained": pre_note, "eval": to_dict(cfg.eval), "n_profile": cfg.n_profile}
    cached = _read_backdoor_cache(bd_dir, fingerprint)
    if cached is not None:
        before, before_g, prof_b, attack_seconds, eval_before_seconds = cached
        log.info("backdoored model: cached %s", bd_dir / "model")
    else:
        set_seed(seed)
        t0 = time.perf_counter()
        poisoned = poison_dataset(world["attack"], poison, max_length=cfg.attack_sft.max_length, tokenizer=tok)
        model, tok = load_causal_lm(pre_dir)
        model = train_sft(model, tok, poisoned, dataclasses.replace(cfg.attack_sft, seed=seed), bd_dir / "trainer")
        save_causal_lm(model, tok, bd_dir / "model", inputs=[pre_dir])
        attack_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        before, before_g, prof_b = _eval_block(model, tok, test, triggered, poison, cfg.eval, "backdoored",
                                               cfg.n_profile)
        eval_before_seconds = time.perf_counter() - t0
        del model
        atomic_write_json(bd_dir / "backdoor.json", {
            "fingerprint": fingerprint, "metrics": before, "generations": before_g, "layer_cosine": prof_b,
            "seconds": {"attack": attack_seconds, "evaluate": eval_before_seconds}})
    log.info("backdoored: %s", before)

    # 4. the defenses, each on the same clean subset
    clean_idx = select_clean(len(world["clean"]), None, seed)
    clean = [world["clean"][i] for i in clean_idx]
    rows: list[tuple[str, Mapping[str, float], float | None]] = [("backdoored", before, None)]
    runs: dict[str, Path] = {}
    for defense in defenses:
        dcfg = dataclasses.replace(cfg.crow if defense == "crow" else cfg.finetune, seed=seed)
        run = RunDir(base / defense / f"seed{seed}")
        resolved = {"defense": defense, "seed": seed, "attack": attack, "task": task, "pretrained": pre_note,
                    "poison": to_dict(poison), "run": to_dict(cfg),
                    "defense_config": to_dict(dcfg), "clean_source": str(world.path / "clean.json")}
        run.start(resolved, seed, "lm-defense")
        try:
            run.write_indices(clean_idx)
            run.timings.update({"attack": round(attack_seconds, 4), "evaluate_before": round(eval_before_seconds, 4)})
            set_seed(seed)
            model, tok = load_causal_lm(bd_dir / "model")
            t0 = time.perf_counter()
            with run.phase("train"):
                model = _train_defense(defense, model, tok, clean, dcfg, run.path / "trainer", cfg.eval.template,
                                       False)
            seconds = time.perf_counter() - t0
            with run.phase("evaluate"):
                after, after_g, prof_a = _eval_block(model, tok, test, triggered, poison, cfg.eval, defense,
                                                     cfg.n_profile)
            with run.phase("save"):
                save_causal_lm(model, tok, run.path / "model", merge=True, inputs=[bd_dir / "model"])
            run.write_json("layer_cosine.json", {"before": prof_b, "after": prof_a})
            run.write_json("generations.json", _generation_examples(test, triggered, before_g, after_g,
                                                                    cfg.n_examples))
            run.write_metrics({"kind": "lm", "defense": defense, "attack": attack, "task": task, "seed": seed,
                               "before": before, "after": after, "seconds": round(seconds, 2)})
            log.info("%s: before %s after %s", defense, before, after)
        finally:
            run.close()
        rows.append((defense, after, seconds))
        runs[defense] = run.path
    if echo:
        print(f"\nLM tiny world: {attack} / {task}, seed {seed} ({pre_note}; total "
              f"{time.perf_counter() - t_start:.0f} s)")
        print(_table(rows))
    return runs
