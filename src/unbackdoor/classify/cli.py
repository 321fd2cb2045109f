"""``unbackdoor classify``: poison, attack, defend, evaluate, tinyworld (a thin layer over pipeline.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..core.cli_util import add_config_options, config_from_args
from ..core.errors import ConfigError

_RAW = argparse.RawDescriptionHelpFormatter

DATA_HELP = ("tinyworld:SEED, a .safetensors image set (written by 'classify poison'), a CIFAR-10/100 python "
             "folder, or a class-per-folder image tree")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("classify", help="image/text classifiers: ULRL, FT, FP, NAD, attacks, metrics",
                              description="Backdoor attacks on classifiers and their removal with ULRL.",
                              formatter_class=_RAW,
                              epilog="Examples:\n"
                                     "  unbackdoor classify tinyworld --out runs/tiny --quick\n"
                                     "  unbackdoor classify attack --data tinyworld:1 --attack blended --out models/blended1\n"
                                     "  unbackdoor classify defend --model models/blended1 --clean tinyworld:1 "
                                     "--clean-count 500 --method ulrl --out runs/ulrl1\n"
                                     "  unbackdoor classify evaluate --model runs/ulrl1/model --test tinyworld:1")
    sub = p.add_subparsers(dest="classify_command", metavar="COMMAND")
    p.set_defaults(func=lambda _a: p.print_help() or 2)
    _tinyworld(sub)
    _poison(sub)
    _attack(sub)
    _defend(sub)
    _evaluate(sub)


# ---- tinyworld ------------------------------------------------------------------------------------

def _tinyworld(sub: Any) -> None:
    p = sub.add_parser("tinyworld", help="backdoored tiny-world models, every defense, one clean subset, a table",
                       formatter_class=_RAW,
                       epilog="Examples:\n  unbackdoor classify tinyworld --out runs/tiny --quick\n"
                              "  unbackdoor classify tinyworld --out runs/tiny --seed 1 --defenses ulrl ulrl-kept ft "
                              "--cache-dir models/")
    p.add_argument("--out", required=True, type=Path, help="output folder (one run folder per attack and defense)")
    p.add_argument("--seed", type=int, default=0, help="world, clean subset and defense seed (default: 0)")
    p.add_argument("--attacks", nargs="+", default=["badnets", "blended"], help="attacks (default: badnets blended)")
    p.add_argument("--defenses", nargs="+", default=["ft", "fp", "nad", "ulrl"],
                   help="defenses: ft fp nad ulrl, or ulrl-<preset> such as ulrl-kept (default: ft fp nad ulrl)")
    p.add_argument("--ulrl-preset", default=None, help="preset for the 'ulrl' entry (paper, kept, cifar100, ...)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="smoke-test budgets: 200 clean images, 2-3 epochs per phase")
    p.add_argument("--budget", choices=["demo", "paper", "smoke"], default=None,
                   help="epoch budgets: demo (default, ~150 s on 2 CPU cores), paper (the configs' own epochs), smoke")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where backdoored models for seeds without a shipped checkpoint are trained and cached "
                        "(default: OUT/models)")
    p.add_argument("--clean-count", type=int, default=None, help="clean samples for the defenses (default: 500)")
    p.set_defaults(func=_cmd_tinyworld)


def _cmd_tinyworld(a: argparse.Namespace) -> int:
    from .pipeline import run_tiny_world

    paths = run_tiny_world(a.out, seed=a.seed, attacks=tuple(a.attacks), defenses=tuple(a.defenses), ulrl=a.ulrl_preset,
                           quick=a.quick, cache_dir=a.cache_dir, clean_count=a.clean_count,
                           budget=a.budget)
    print(f"\n{len(paths)} run folders under {a.out}")
    return 0


# ---- poison ---------------------------------------------------------------------------------------

def _poison(sub: Any) -> None:
    from .attacks import AttackConfig

    p = sub.add_parser("poison", help="write a poisoned copy of a training set (and the poisoned indices)",
                       formatter_class=_RAW,
                       epilog="Examples:\n  unbackdoor classify poison --data tinyworld:0 --attack-name blended "
                              "--out data/blended.safetensors\n"
                              "  unbackdoor classify poison --data cifar10/ --attack-name badnets --rate 0.05 "
                              "--out data/badnets.safetensors")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    p.add_argument("--attack-name", dest="attack_name", default=None, help="shorthand for --name")
    add_config_options(p, AttackConfig)
    p.set_defaults(func=_cmd_poison)


def _attack_config(a: argparse.Namespace, base: dict[str, Any] | None = None):
    from .attacks import AttackConfig

    base = dict(base or {})
    if getattr(a, "attack_name", None):
        base["name"] = a.attack_name
    return config_from_args(AttackConfig, a, base)


def _cmd_poison(a: argparse.Namespace) -> int:
    from ..core.runs import atomic_write_json
    from .attacks import poison_full
    from .pipeline import load_data, save_data

    if a.out.suffix != ".safetensors":
        raise ConfigError(f"--out {a.out} must end in .safetensors", where="--out", fix="e.g. --out poisoned.safetensors")
    cfg = _attack_config(a)
    res = poison_full(load_data(a.data, train=True), cfg)
    save_data(res.data, a.out)
    from ..core.config import to_dict

    atomic_write_json(a.out.with_suffix(".json"), {"attack": to_dict(cfg), "poisoned_indices": res.poisoned.tolist(),
                                                   "noise_indices": res.noise.tolist(), "source": str(a.data)})
    print(f"poisoned {len(res.poisoned)} of {len(res.data)} samples -> {a.out} (indices in {a.out.with_suffix('.json')})")
    return 0


# ---- attack (train a backdoored model) ------------------------------------------------------------

def _attack(sub: Any) -> None:
    from .attacks import AttackConfig

    p = sub.add_parser("attack", help="poison a training set and train a backdoored model on it",
                       formatter_class=_RAW,
                       epilog="Examples:\n  unbackdoor classify attack --data tinyworld:1 --attack-name badnets "
                              "--out models/badnets1\n"
                              "  unbackdoor classify attack --data cifar10/ --arch preactresnet18 --epochs 100 "
                              "--out models/cifar-badnets")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, type=Path, help="output model folder (model.json + model.safetensors)")
    p.add_argument("--arch", default="preact_resnet_tiny", help="architecture: preact_resnet_tiny, preactresnet18, vgg16_bn")
    p.add_argument("--width", type=int, default=None, help="network width (default: the architecture's)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default: 20)")
    p.add_argument("--lr", type=float, default=0.02, help="SGD learning rate, cosine schedule (default: 0.02)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    p.add_argument("--normalize", default="tinyworld", help="input statistics: tinyworld, cifar10, cifar100, gtsrb, none")
    p.add_argument("--attack-name", dest="attack_name", default=None, help="shorthand for --name")
    add_config_options(p, AttackConfig)
    p.set_defaults(func=_cmd_attack)


def _cmd_attack(a: argparse.Namespace) -> int:
    from .pipeline import load_data
    from .train import TrainConfig, train_backdoored
    from .transforms import NORMALIZATION

    cfg = _attack_config(a)
    if a.normalize != "none" and a.normalize not in NORMALIZATION:
        raise ConfigError(f"unknown normalisation '{a.normalize}'", where="--normalize",
                          fix=f"use one of: {', '.join(NORMALIZATION)}, none")
    data = load_data(a.data, train=True)
    kw = {"width": a.width} if a.width else {}
    tcfg = TrainConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=cfg.seed)
    train_backdoored(data, cfg, a.arch, tcfg, a.out, model_kwargs=kw,
                     normalization=None if a.normalize == "none" else NORMALIZATION[a.normalize], init_seed=cfg.seed)
    print(f"backdoored model -> {a.out}")
    return 0


# ---- defend ---------------------------------------------------------------------------------------

def _defend(sub: Any) -> None:
    from .ulrl import ULRLConfig

    p = sub.add_parser("defend", help="remove a backdoor with ULRL (or FT / FP / NAD) using clean data only",
                       formatter_class=_RAW,
                       description="Runs a defense on a copy of the model and writes a run folder (config, env, "
                                   "clean indices, timings, ULRL selection/trace, model, and metrics when --test is given).\n"
                                   "ULRL settings have their own flags; FT/FP/NAD settings go through --set key=value "
                                   "or --config FILE.yaml.",
                       epilog="Examples:\n  unbackdoor classify defend --model models/b1 --clean tinyworld:1 "
                              "--clean-count 500 --out runs/ulrl --test tinyworld:1\n"
                              "  unbackdoor classify defend --model models/b1 --clean clean.safetensors --method ulrl "
                              "--preset kept --out runs/kept\n"
                              "  unbackdoor classify defend --model models/b1 --clean tinyworld:1 --clean-count 500 "
                              "--method fp --set acc_ratio=0.8 --out runs/fp")
    p.add_argument("--model", required=True, type=Path, help="model folder (model.json + model.safetensors)")
    p.add_argument("--clean", required=True, help="the defender's clean data: " + DATA_HELP)
    p.add_argument("--clean-count", type=int, default=None,
                   help="use a class-stratified random subset of this many clean samples (default: all of --clean)")
    p.add_argument("--method", choices=["ulrl", "ft", "fp", "nad"], default="ulrl", help="defense (default: ulrl)")
    p.add_argument("--preset", default=None, help="ULRL preset: paper (default), kept, orthogonal, cifar100, gtsrb, tiny-imagenet")
    p.add_argument("--out", required=True, type=Path, help="run folder to write (never inside --model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the clean-subset choice and of the defense")
    p.add_argument("--test", default=None, help="test data to measure ACC/ASR/RA before and after: " + DATA_HELP)
    add_config_options(p, ULRLConfig)
    p.set_defaults(func=_cmd_defend)


def _cmd_defend(a: argparse.Namespace) -> int:
    import torch

    from ..core import safeio
    from ..core.config import to_dict
    from .attacks import AttackConfig
    from .data import stratified_subset
    from .pipeline import DEFENSES, defend, load_data, load_model, run_defense, save_model
    from .ulrl import ULRLConfig
    from ..core.runs import RunDir
    import dataclasses

    safeio.check_output_path(a.out, a.model)
    model, meta = load_model(a.model)
    cls = DEFENSES[a.method][0]
    if a.preset is not None and a.method != "ulrl":
        raise ConfigError("--preset is for ULRL only", where="--preset", fix="drop --preset or use --method ulrl")
    base = dict(to_dict(ULRLConfig.preset(a.preset))) if a.preset else {}
    if a.method != "ulrl":
        ulrl_flags = [k for k, v in vars(a).items() if k.startswith("cfg__") and v is not None]
        if ulrl_flags:
            raise ConfigError(f"ULRL flags {['--' + k[5:].replace('_', '-') for k in ulrl_flags]} given with "
                              f"--method {a.method}", where="command line",
                              fix=f"set {a.method.upper()} options with --set key=value (see {cls.__name__})")
    cfg = config_from_args(cls, a, base)
    data = load_data(a.clean, train=True)
    idx = stratified_subset(data, a.clean_count, a.seed) if a.clean_count else torch.arange(len(data))
    clean = data.subset(idx, name=f"{data.name}-clean")
    if a.test:
        test = load_data(a.test, train=False)
        fields = {f.name for f in dataclasses.fields(AttackConfig)}
        attack = AttackConfig(**{k: v for k, v in (meta.get("attack") or {}).items() if k in fields})
        _, metrics = run_defense(a.out, model, clean, idx.tolist(), a.method, cfg, test=test, attack=attack,
                                 seed=a.seed, model_meta=meta)
        from .pipeline import format_table

        print(format_table([metrics]))
    else:
        run = RunDir(a.out)
        run.start(cfg, a.seed, "classify-defense")
        run.write_indices(idx.tolist())
        try:
            defended, report = defend(model, clean, a.method, cfg, run, seed=a.seed, num_classes=data.num_classes)
            run.write_json("defense_report.json", report.to_json())
            save_model(defended, run / "model", meta)
        finally:
            run.close()
    print(f"defended model -> {a.out / 'model'}")
    return 0


# ---- evaluate -------------------------------------------------------------------------------------

def _evaluate(sub: Any) -> None:
    from .attacks import AttackConfig

    p = sub.add_parser("evaluate", help="ACC, ASR, RA, target-class recall and per-class accuracy of a model",
                       formatter_class=_RAW,
                       epilog="Examples:\n  unbackdoor classify evaluate --model runs/ulrl/model --test tinyworld:1\n"
                              "  unbackdoor classify evaluate --model models/b1 --test cifar10/ --name blended "
                              "--out metrics.json")
    p.add_argument("--model", required=True, type=Path, help="model folder")
    p.add_argument("--test", required=True, help="test data: " + DATA_HELP)
    p.add_argument("--out", type=Path, default=None, help="write the metrics as JSON here")
    p.add_argument("--attack-name", dest="attack_name", default=None, help="shorthand for --name")
    add_config_options(p, AttackConfig)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from ..core.runs import atomic_write_json
    from .pipeline import evaluate_attack, load_data, load_model

    model, meta = load_model(a.model)
    from .attacks import AttackConfig
    import dataclasses

    fields = {f.name for f in dataclasses.fields(AttackConfig)}
    cfg = _attack_config(a, {k: v for k, v in (meta.get("attack") or {}).items() if k in fields})
    metrics = evaluate_attack(model, load_data(a.test, train=False), cfg)
    text = json.dumps({"attack": cfg.name, **metrics}, indent=2)
    print(text)
    if a.out:
        atomic_write_json(a.out, {"attack": cfg.name, **metrics})
    return 0
