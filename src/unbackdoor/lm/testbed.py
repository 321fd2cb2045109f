"""The LM tiny world as a testbed: pretrain (or load), backdoor, every defense on one clean subset, run folders.

:func:`run_tiny_world` runs the whole story of SPEC section 4 and writes one run folder per defense
through :func:`unbackdoor.lm.flow.defend_loaded` (the same writer as ``unbackdoor lm defend``). The
world, the clean model and the backdoored model (with its evaluation) are cached by settings, so
more defenses can be run later against the very same backdoored model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..core.config import check, check_positive, from_dict, merge, option, to_dict
from ..core.defense import resolve_links
from ..core.errors import ConfigError
from ..core.registry import split_variant
from ..core.runs import atomic_write_json
from ..core.seeds import set_seed
from .defenses import LM_DEFENSES
from .evaluate import EvalConfig
from .flow import defend_loaded, evaluation_block, select_clean
from .models import load_causal_lm, save_causal_lm
from .poison import PoisonConfig, make_triggered_test, poison_dataset
from .tinyworld import TinyWorld, TinyWorldConfig, build_tiny_world
from .training import SFTConfig, train_sft

log = logging.getLogger("unbackdoor")

TINY_TASKS = ("refusal", "negsentiment", "codeinjection")
"""Tasks whose target the tiny world's vocabulary can express."""
DEFAULT_DEFENSES = ("finetune", "finetune-crow-lr", "crow")
"""Every CROW comparison: the official finetuning baseline, finetuning at CROW's lr and steps (the control), CROW."""
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "lm" / "tiny-llama"
"""The shipped clean-pretrained tiny Llama (regenerate: scripts/efficacy_lm.py --write-asset)."""


def tiny_defense_training() -> dict[str, Any]:
    """What every training defense uses on the tiny world (LoRA r8, lr 2e-3, 5 epochs, batch 8 x 2)."""
    return {"learning_rate": 2e-3, "num_train_epochs": 5.0, "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 2, "finetune": "lora", "lora": {"r": 8, "lora_alpha": 16.0, "dropout": 0.0},
            "save_strategy": "no", "max_length": 128, "logging_steps": 10}


@dataclasses.dataclass
class TinyRunConfig:
    """Every setting of a tiny-world run (the efficacy results quote this object whole)."""

    world: TinyWorldConfig = option(factory=TinyWorldConfig, help="world sizes and model shape")
    pretrain: SFTConfig = option(factory=lambda: SFTConfig(
        learning_rate=2e-3, max_steps=1000, per_device_train_batch_size=16, gradient_accumulation_steps=1,
        finetune="full", warmup_steps=0.05, save_strategy="no", max_length=128, logging_steps=50),
        help="clean pretraining (full weights)")
    pretrained: str = option("auto", "'auto' = the shipped checkpoint when it fits, else pretrain; 'train' = "
                                     "always pretrain (cached per seed under OUT/_world); or a model folder")
    rate: float = option(0.25, "poisoned fraction of the attacker's SFT set (official: 50%; here 200 of 800, the "
                               "extra clean records keep the backdoored model's clean utility)")
    attack_sft: SFTConfig = option(factory=lambda: SFTConfig(
        learning_rate=1e-3, max_steps=200, per_device_train_batch_size=16, gradient_accumulation_steps=1,
        finetune="full", warmup_steps=0.1, save_strategy="no", max_length=128, logging_steps=25),
        help="backdoor injection by SFT on the poisoned mix")
    training: dict[str, Any] = option(factory=tiny_defense_training,
                                      help="settings every training defense gets on this world (CROW's and "
                                           "finetuning's budget: the same data, steps and learning rate)")
    defense: dict[str, dict[str, Any]] = option(factory=dict, help="per-defense overrides, e.g. "
                                                                   "defense.crow.alpha=5.5 (after the defense's "
                                                                   "own tiny-world budget)")
    eval: EvalConfig = option(factory=lambda: EvalConfig(batch_size=50, max_new_tokens=32),
                              help="generation and metrics")
    n_profile: int = option(64, "prompts per set for the layer-cosine profile")

    def __post_init__(self) -> None:
        check(0 < self.rate <= 1, "rate", self.rate, "in (0, 1]", type(self).__name__)
        check_positive(self, "n_profile")

    def defense_config(self, name: str, budget: str) -> tuple[Any, Any, str | None]:
        """``(spec, config, preset)`` of defense ``name`` (``crow``, ``finetune-crow-lr``...) on this world.

        Precedence, low to high: the defense's defaults < the world's ``training`` (for defenses that
        train with the Trainer) < the defense's own ``budget`` < its preset < this config's
        ``defense`` overrides (by method name, then by the full name). A :class:`Linked` value takes
        another defense's setting as resolved here (``finetune-crow-lr`` follows this world's CROW).
        """
        return self._defense_config(name, budget, ())

    def _defense_config(self, name: str, budget: str, seen: tuple[str, ...]) -> tuple[Any, Any, str | None]:
        method, preset = split_variant(name, LM_DEFENSES)
        if method in seen:
            raise ConfigError(f"the settings of '{name}' link back to themselves ({' -> '.join([*seen, method])})",
                              where="defense presets / budgets", fix="link a setting to a defense that does not "
                                                                     "link back")
        spec = LM_DEFENSES.get(method)

        def settings_of(other: str) -> dict[str, Any]:
            return to_dict(self._defense_config(other, budget, (*seen, method))[1])

        values = to_dict(spec.config())
        if issubclass(spec.config, SFTConfig):
            values = merge(values, self.training)
        values = merge(values, resolve_links(spec.budget(budget), settings_of, f"{budget} budget of '{method}'"))
        if preset is not None:
            values = merge(values, resolve_links(spec.preset(preset), settings_of,
                                                 f"preset '{preset}' of '{method}'"))
        for key in dict.fromkeys((spec.name, name)):
            values = merge(values, self.defense.get(key, {}))
        return spec, from_dict(spec.config, values, source=f"tiny-world settings of '{name}'"), preset


def tiny_run_config(quick: bool = False) -> TinyRunConfig:
    """The demo's settings, or (``quick``) a smoke-test version: tiny splits, a few steps, noisy numbers."""
    cfg = TinyRunConfig()
    if not quick:
        return cfg
    r = dataclasses.replace
    cfg.world = r(cfg.world, n_train=200, n_attack=32, n_clean=16, n_test=16, hidden_size=64, num_layers=4)
    cfg.pretrain = r(cfg.pretrain, max_steps=10, per_device_train_batch_size=8)
    cfg.attack_sft = r(cfg.attack_sft, max_steps=8, per_device_train_batch_size=8)
    cfg.training = {**cfg.training, "num_train_epochs": 1.0}
    cfg.eval = r(cfg.eval, max_new_tokens=8)
    cfg.n_profile = 8
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


def behaviour_examples(world_dir: Path, clean: list[dict[str, Any]], poison: PoisonConfig) -> Path:
    """The tiny world's behaviour examples (BEEAR): each clean defense record with its answer as the desired
    behaviour and the task's target response as the unwanted one.

    This is the defender knowing the unwanted behaviour exactly (here: the attack's target text), but not
    the trigger; every run that uses it records the file in ``threat_model.json``.
    """
    from .data import write_alpaca
    from .poison import target_string

    target = target_string(poison)
    if target is None:
        raise ConfigError(f"task '{poison.task}' has no fixed target to serve as the unwanted behaviour",
                          where="tiny world behaviour examples", fix="pass --set defense.beear.behaviour=FILE")
    path = world_dir / f"behaviour-{poison.task}.json"
    write_alpaca([{**r, "unwanted": target} for r in clean], path)
    return path


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
                   defenses: Iterable[str] = DEFAULT_DEFENSES, quick: bool = False,
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
    budget = "smoke" if quick else "demo"
    defenses = tuple(defenses)
    resolved = {d: cfg.defense_config(d, budget) for d in defenses}  # unknown names fail before any work
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
        before, before_g, prof_b = evaluation_block(model, tok, test, triggered, poison, cfg.eval, "backdoored",
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
        spec, dcfg, preset = resolved[defense]
        dcfg = dataclasses.replace(dcfg, seed=seed) if hasattr(dcfg, "seed") else dcfg
        if spec.needs.behaviour_examples and not getattr(dcfg, "behaviour", None):
            dcfg = dataclasses.replace(dcfg, behaviour=str(behaviour_examples(world_dir, clean, poison)))
        set_seed(seed)
        model, tok = load_causal_lm(bd_dir / "model")
        path = defend_loaded(base / defense / f"seed{seed}", model, tok, clean, clean_idx, spec.name, dcfg,
                             preset=preset, test=test, triggered=triggered, poison=poison, eval_cfg=cfg.eval,
                             template=cfg.eval.template, before=(before, before_g, prof_b), n_profile=cfg.n_profile,
                             sources={"model": str(bd_dir / "model"), "clean": str(world.path / "clean.json"),
                                      "pretrained": pre_note, "world_seed": seed},
                             inputs=[bd_dir / "model"], name=defense,
                             base_model=pre_dir if spec.needs.base_model else None,
                             extra_timings={"attack": attack_seconds, "evaluate_before": eval_before_seconds})
        m = json.loads((path / "metrics.json").read_text())
        log.info("%s: before %s after %s", defense, before, m["after"])
        rows.append((defense, m["after"], m["seconds"]))
        runs[defense] = path
    if echo:
        print(f"\nLM tiny world: {attack} / {task}, seed {seed} ({pre_note}; total "
              f"{time.perf_counter() - t_start:.0f} s)")
        print(_table(rows))
    return runs
