"""``unbackdoor classify retune RUN_DIR``: the retuning attack on a classifier run folder, from the command line."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..core.cli_util import add_config_options
from ..core.reactivation import print_record

_RAW = argparse.RawDescriptionHelpFormatter


def add_retune_command(sub: Any) -> None:
    from .reactivation import RetuneConfig

    p = sub.add_parser("retune", help="re-activation test: does the defended model's backdoor come back after a few "
                                      "poisoned finetuning steps? (writes RUN_DIR/reactivation.json)",
                       formatter_class=_RAW,
                       description="The retuning attack of Min et al. (NeurIPS 2024) on a defense run folder: the "
                                   "defended model, the clean model (--clean-model, the floor) and the backdoored "
                                   "model "
                                   "(the ceiling) are finetuned on the same small set with a few poisoned samples, and "
                                   "ASR is measured along the way. It is the evaluator's attack: it uses the trigger, "
                                   "which no defense sees.",
                       epilog="Examples:\n  unbackdoor classify retune runs/ulrl --test tinyworld:1 "
                              "--clean-model models/clean1\n"
                              "  unbackdoor classify retune runs/ft --poisoned 10 --epochs 10 --eval-every 4")
    p.add_argument("run_dir", type=Path, help="a run folder written by 'unbackdoor classify defend'")
    p.add_argument("--data", default=None,
                   help="where the retuning samples come from (default: the run's clean source)")
    p.add_argument("--test", default=None, help="test data for ASR/ACC (default: the run's test source)")
    p.add_argument("--clean-model", type=Path, default=None, help="a clean model of the same task: the floor")
    p.add_argument("--backdoored-model", type=Path, default=None,
                   help="the ceiling (default: the model the run defended, when it is still there)")
    p.add_argument("--overwrite", action="store_true", help="replace a reactivation.json another command wrote")
    add_config_options(p, RetuneConfig, title="retuning attack settings (RetuneConfig)")
    p.set_defaults(func=_cmd_retune)


def _cmd_retune(a: argparse.Namespace) -> int:
    from .. import api
    from ..core.cli_util import overrides_from_args

    settings, _ = overrides_from_args(a)
    path = api.retune_classifier(a.run_dir, data=a.data, test=a.test, clean_model=a.clean_model,
                                 backdoored_model=a.backdoored_model, overwrite=a.overwrite, **settings)
    print_record(path)
    return 0


__all__ = ["add_retune_command"]
