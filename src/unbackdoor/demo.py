"""The end-to-end demo on the built-in tiny worlds: attack, defend, measure, report.

    unbackdoor demo --out runs/demo            # both kinds, seed 0, a few CPU minutes

LM: a tiny Llama pretrained on templated tasks, a BadNets refusal backdoor, then plain
finetuning at the official learning rate and at CROW's (the equal-lr control), and CROW. Classifier: procedurally generated images, BadNets and Blended
backdoors, then FT, FP, NAD and ULRL. One before/after table per kind is printed (read back
from the runs' metrics.json, so it shows exactly what was saved) and the report is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path
from typing import Literal

from .core.config import check_non_negative, option, to_dict
from .core.runs import atomic_write_json
from .sweep import Runner, call_pipeline, load_pipeline

log = logging.getLogger("unbackdoor.demo")

# finetune: the official baseline (lr 0.2 x CROW's); finetune-crow-lr: CROW's lr and steps (the control)
LM_SETUP = {"attack": "badnet", "task": "refusal", "defenses": ("finetune", "finetune-crow-lr", "crow")}
CLASSIFY_SETUP = {"attacks": ("badnets", "blended"), "defenses": ("ft", "fp", "nad", "ulrl", "ulrl-kept")}


@dataclasses.dataclass
class DemoConfig:
    """Which tiny worlds the demo runs, and how big."""

    only: Literal["all", "lm", "classify"] = option("all", "run both kinds, or only lm or only classify")
    quick: bool = option(False, "the pipelines' quick settings: smaller, faster, noisier (smoke tests)")
    seed: int = option(0, "the seed of every run")

    def __post_init__(self) -> None:
        check_non_negative(self, "seed")


@dataclasses.dataclass
class DemoResult:
    """Where the demo wrote its runs and report, the tables it printed, and how long each part took."""

    out_dir: Path
    report_html: Path
    report_markdown: Path
    tables: str
    seconds: dict[str, float]


def demo(out_dir: str | Path, config: DemoConfig | None = None, *,
         runners: dict[str, Runner] | None = None, echo: bool = True, overwrite: bool = False) -> DemoResult:
    """Run the tiny worlds, print one before/after table per kind, write the report to ``OUT/report``."""
    from .report import ReportConfig, build_report, kind_tables, load_runs, summarise, text_table

    cfg = config or DemoConfig()
    out = Path(out_dir)
    from .core.paths import MARKER_KEY, check_outputs

    check_outputs([out], [], command="demo", overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "demo_config.json", {MARKER_KEY: "demo", **to_dict(cfg)})
    kinds = ["lm", "classify"] if cfg.only == "all" else [cfg.only]
    runners = runners or {}
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    for kind in kinds:
        t0 = time.perf_counter()
        run = runners.get(kind) or load_pipeline(kind)
        if echo:
            print(f"[demo] {kind}: running the tiny world (seed {cfg.seed}{', quick' if cfg.quick else ''}) ...",
                  flush=True)
        if kind == "lm":
            call_pipeline("lm", run, out / "lm", seed=cfg.seed, quick=cfg.quick, attacks=[LM_SETUP["attack"]],
                          task=LM_SETUP["task"], defenses=LM_SETUP["defenses"])
        else:
            call_pipeline("classify", run, out / "classify", seed=cfg.seed, quick=cfg.quick, **CLASSIFY_SETUP)
        seconds[kind] = round(time.perf_counter() - t0, 1)

    blocks = []
    for kind in kinds:
        groups = summarise(load_runs([out / kind]))
        for name, table in kind_tables(groups, kind):
            blocks.append(f"{kind}: {name} (seed {cfg.seed}; {seconds[kind]:.0f} s)\n{text_table(table)}")
    tables = "\n\n".join(blocks)
    t0 = time.perf_counter()
    rep = build_report([out / k for k in kinds], out / "report",
                       ReportConfig(title=f"unbackdoor demo (seed {cfg.seed}{', quick' if cfg.quick else ''})"))
    seconds["report"] = round(time.perf_counter() - t0, 1)
    seconds["total"] = round(time.perf_counter() - t_all, 1)
    atomic_write_json(out / "demo_timings.json", seconds)
    if echo:
        print("\n" + tables + "\n")
        print(f"runs:    {', '.join(str(out / k) for k in kinds)}")
        print(f"report:  {rep.html}\n         {rep.markdown} (+ {len(rep.images)} PNG plots beside it)")
        print(f"time:    {seconds['total']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items() if k != 'total')})")
    return DemoResult(out, rep.html, rep.markdown, tables, seconds)


EXAMPLES = """examples:
  unbackdoor demo --out runs/demo
  unbackdoor demo --out runs/demo-lm --only lm
  unbackdoor demo --out runs/smoke --quick --seed 1
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from .core.cli_util import add_config_options

    p = subparsers.add_parser(
        "demo", help="the end-to-end demo on the tiny worlds (CPU, a few minutes)",
        description="Backdoor a tiny LM (BadNets refusal) and a tiny image classifier (BadNets, Blended), defend "
                    "them (finetuning at the official and at CROW's lr + CROW; FT, FP, NAD + ULRL), print the before/after tables and write the "
                    "report to OUT/report/.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="where the runs and the report go")
    p.add_argument("--overwrite", action="store_true", help="write into an existing folder that holds no demo")
    add_config_options(p, DemoConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .core.cli_util import config_from_args

    demo(args.out, config_from_args(DemoConfig, args), overwrite=args.overwrite)
    return 0
