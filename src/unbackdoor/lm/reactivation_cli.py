"""``unbackdoor lm retune RUN_DIR``: the LoRA retuning attack on an LM run folder, from the command line."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core.cli_util import add_config_options
from ..core.reactivation import print_record

_RAW = argparse.RawDescriptionHelpFormatter


def add_retune_command(sub: Any) -> None:
    from .reactivation import LMRetuneConfig

    p = sub.add_parser("retune", help="re-activation test: does the defended model's backdoor come back after a short "
                                      "poisoned LoRA finetuning? (writes RUN_DIR/reactivation.json)",
                       formatter_class=_RAW,
                       description="The retuning attack (Min et al., NeurIPS 2024) transposed to causal LMs: a fresh "
                                   "LoRA adapter on clean records with a few poisoned ones, on the defended model, the "
                                   "clean model (--clean-model, the floor) and the backdoored model (the ceiling). The "
                                   "evaluator's attack: it uses the trigger and the target, which no defense sees.",
                       epilog="Examples:\n"
                              "  unbackdoor lm retune runs/crow --test test.json --clean-model models/clean\n"
                              "  unbackdoor lm retune runs/crow --poisoned 10 --lr 2e-3 --max-steps 40 --eval-every 10")
    p.add_argument("run_dir", type=Path, help="a run folder written by 'unbackdoor lm defend'")
    p.add_argument("--data", default=None, help="clean Alpaca records to retune on (default: the run's clean source)")
    p.add_argument("--test", default=None, help="clean test prompts (default: the run's test source)")
    p.add_argument("--triggered", default=None, help="triggered test prompts (default: the test prompts triggered "
                                                     "with the run's attack)")
    p.add_argument("--clean-model", type=Path, default=None, help="a clean model of the same task: the floor")
    p.add_argument("--backdoored-model", type=Path, default=None,
                   help="the ceiling (default: the model the run defended, when it is still there)")
    p.add_argument("--overwrite", action="store_true", help="replace a reactivation.json another command wrote")
    from .cli import TRAINER_SKIP, _trainer_groups

    add_config_options(p, LMRetuneConfig, title="retuning attack settings (LMRetuneConfig)", skip=TRAINER_SKIP,
                       groups=_trainer_groups(LMRetuneConfig))
    p.set_defaults(func=_cmd_retune)


def _cmd_retune(a: argparse.Namespace) -> int:
    from .. import api
    from ..core.cli_util import overrides_from_args

    settings, _ = overrides_from_args(a)
    path = api.retune_lm(a.run_dir, data=a.data, test=a.test, triggered=a.triggered, clean_model=a.clean_model,
                         backdoored_model=a.backdoored_model, overwrite=a.overwrite, **settings)
    print_record(path)
    return 0


__all__ = ["add_retune_command"]
