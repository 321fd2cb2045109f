"""The classifier tiny world as a testbed: backdoored models, every defense on one clean subset, run folders.

Training a backdoored tiny-world model takes minutes on a CPU, so small fixed-seed checkpoints ship
in ``unbackdoor/assets/classify/`` (regenerate them with ``python scripts/efficacy_classify.py
--make-assets``); any other seed is trained on demand and cached. :func:`run_tiny_world` writes one
run folder per (attack, defense) through :func:`unbackdoor.classify.flow.defend_loaded`, the same
writer as ``unbackdoor classify defend``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from ..core.config import option
from ..core.errors import ConfigError, ModelError
from ..core.runs import atomic_dir, read_json
from ..core.seeds import set_seed
from .attacks import attack_config, attack_config_from_dict, build_attack
from .data import ImageData, stratified_subset
from .evaluate import evaluate_attack
from .tinyworld import make_tiny_world

log = logging.getLogger("unbackdoor")


ASSETS = Path(__file__).resolve().parent.parent / "assets" / "classify"
BUDGETS = ("paper", "demo", "smoke")
"""Epoch budgets of run_tiny_world, each defense's own (DefenseSpec.budgets). "paper" is the configs'
defaults, what scripts/efficacy_classify.py measures; "demo" fits the classifier half of the demo in about
150 s on 2 CPU cores; "smoke" (quick=True) is for tests."""


@dataclass
class TinySettings:
    """How the tiny-world classifiers are built (fixed, so shipped checkpoints stay valid)."""

    n_train: int = option(5000, "training images")
    n_test: int = option(2000, "test images")
    model: str = option("preact_resnet_tiny", "architecture (models.MODELS)")
    width: int = option(8, "network width (8: 78k parameters; a 2-core CPU trains it in minutes)")
    epochs: int = option(25, "backdoor training epochs (15 left the Blended backdoor under ASR 0.9 on 2 of 5 seeds)")
    lr: float = option(0.05, "backdoor training learning rate (cosine schedule)")
    flip: bool = option(False, "horizontal flips while training (off: a flip moves the BadNets patch to the other "
                               "corner and halves the trigger's consistency in a short budget)")
    clean_count: int = option(500, "clean samples the defender gets (10% of the training set: the tiny world's "
                                    "counterpart of CIFAR-10's 500 images)")


TINY = TinySettings()


def tiny_world(seed: int, settings: TinySettings = TINY) -> tuple[ImageData, ImageData]:
    return make_tiny_world(seed, settings.n_train, settings.n_test)


def tiny_asset_dir(attack: str, seed: int) -> Path:
    return ASSETS / f"tinyworld-{attack}-seed{seed}"


def train_tiny_backdoored(attack: str, seed: int, out_dir: str | Path | None, *, settings: TinySettings = TINY,
                          data: tuple[ImageData, ImageData] | None = None) -> nn.Module:
    """Train the tiny world's backdoored model for ``attack`` and ``seed`` (BackdoorBench defaults:
    all-to-one, target 0, 10% poisoned) and save it to ``out_dir`` (``model.json`` + safetensors)."""
    from .loop import TrainConfig
    from .transforms import TINY_WORLD_MEAN, TINY_WORLD_STD
    from .victim import train_backdoored

    train, _ = data or tiny_world(seed, settings)
    set_seed(seed)
    cfg = TrainConfig(epochs=settings.epochs, lr=settings.lr, flip=settings.flip, seed=seed)
    return train_backdoored(train, attack_config(attack, seed=seed), settings.model, cfg, out_dir,
                            model_kwargs={"width": settings.width},
                            normalization=(TINY_WORLD_MEAN, TINY_WORLD_STD), init_seed=seed)


def tiny_backdoored(attack: str, seed: int, cache_dir: str | Path | None = None, *,
                    settings: TinySettings = TINY, data: tuple[ImageData, ImageData] | None = None
                    ) -> tuple[nn.Module, Path]:
    """The backdoored tiny-world model: the shipped checkpoint, else a cached one, else trained now."""
    from .model_io import load_classifier

    for folder in [tiny_asset_dir(attack, seed)] + ([Path(cache_dir) / f"tinyworld-{attack}-seed{seed}"] if cache_dir else []):
        if (folder / "model.json").is_file():
            return load_classifier(folder), folder
    if cache_dir is None:
        raise ModelError(f"no shipped tiny-world checkpoint for attack '{attack}', seed {seed}",
                         where=str(tiny_asset_dir(attack, seed)), fix="pass cache_dir= to train one (a few CPU minutes)")
    folder = Path(cache_dir) / f"tinyworld-{attack}-seed{seed}"
    log.info("training the backdoored tiny-world model %s (a few CPU minutes; cached in %s)", folder.name, folder)
    with atomic_dir(folder) as tmp:  # a killed run leaves no half-written cache entry
        train_tiny_backdoored(attack, seed, tmp, settings=settings, data=data)
    return load_classifier(folder), folder


def run_tiny_world(out_dir: str | Path, *, seed: int = 0, attacks: Sequence[str] = ("badnets", "blended"),
                   defenses: Sequence[str] = ("ft", "fp", "nad", "ulrl"), ulrl: Any = None,
                   quick: bool = False, cache_dir: str | Path | None = None, clean_count: int | None = None,
                   budget: str | None = None, printer: Callable[[str], None] | None = print) -> dict[str, Path]:
    """The classifier demo: backdoored tiny-world models, every defense on ONE clean subset, run folders.

    Writes ``out_dir/<attack>/<defense>/seed<seed>/`` per pair and returns ``{"<attack>/<defense>": path}``.
    Backdoored models come from the shipped checkpoints (seed 0) or are trained and cached in
    ``cache_dir`` (default ``out_dir/models``). Epoch budgets: ``demo`` by default
    (about 150 s for two attacks and four defenses on 2 CPU cores), ``smoke`` with ``quick=True``
    (also 200 clean images and 500 test images), or ``budget="paper"`` for the configs' own (paper) epochs.
    ``ulrl`` is the config (or preset name) for the ``ulrl`` entry; ``<method>-<preset>`` entries
    run a named preset (e.g. ``ulrl-kept``). Budgets come from each defense's spec.
    """
    from .flow import defend_loaded, format_table, resolve_defense

    out_dir = Path(out_dir)
    budget = budget or ("smoke" if quick else "demo")
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget '{budget}'", where="run_tiny_world", fix=f"use one of: {', '.join(BUDGETS)}")
    specs = []
    for name in defenses:
        preset = ulrl if name == "ulrl" and isinstance(ulrl, str) else None
        config = ulrl if name == "ulrl" and not isinstance(ulrl, str) else None
        spec, cfg, preset = resolve_defense(name, config, preset=preset)
        specs.append((name, spec, spec.make_config(cfg, overrides=spec.budget(budget)), preset))
    train, test = tiny_world(seed)
    if quick:  # smoke runs judge on 500 test images, not 2000
        test = test.subset(stratified_subset(test, min(500, len(test)), seed), name=test.name)
    n_clean = clean_count or (200 if quick else TINY.clean_count)
    clean_idx = stratified_subset(train, int(n_clean), seed)
    clean = train.subset(clean_idx, name=f"{train.name}-clean")
    paths: dict[str, Path] = {}
    rows: list[dict[str, Any]] = []
    for attack_name in attacks:
        model, folder = tiny_backdoored(attack_name, seed, cache_dir or out_dir / "models", data=(train, test))
        meta = read_json(folder / "model.json")
        attack = attack_config_from_dict(meta.get("attack"), name=attack_name, seed=seed)
        triggered = build_attack(attack).triggered_test_set(test)
        before = evaluate_attack(model, test, attack, triggered, with_predictions=True)
        for name, spec, cfg, preset in specs:
            path, metrics = defend_loaded(out_dir / attack_name / name / f"seed{seed}", model, clean,
                                          clean_idx.tolist(), spec.name, cfg, preset=preset, test=test, attack=attack,
                                          seed=seed, before=before, triggered=triggered, model_meta=meta, name=name,
                                          clean_pool=len(train),
                                          sources={"model": str(folder), "clean": f"tinyworld:{seed}"})
            paths[f"{attack_name}/{name}"] = path
            rows.append(metrics)
            if printer is not None:
                printer(format_table([metrics]).splitlines()[-1])
    if printer is not None and rows:
        printer("\n" + format_table(rows))
    return paths
