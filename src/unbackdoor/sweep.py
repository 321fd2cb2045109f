"""Multi-seed (and multi-attack) runs of the tiny-world pipelines, aggregated and reported.

    unbackdoor sweep --kind lm --seeds 0 1 2 --out runs/sweep-lm

Each seed gets its own folder (``OUT/seed-<s>/``) handed to the domain pipeline
(``unbackdoor.lm.testbed.run_tiny_world`` or ``unbackdoor.classify.testbed.run_tiny_world``).
The sweep is resumable: a seed (an attack, for LMs) whose run folders already hold a complete
``metrics.json`` for every requested defense is not run again. At the end it writes
``OUT/aggregate.json`` (mean, std and per-seed values of every metric per group, via
:func:`unbackdoor.core.stats.aggregate`) and the report in ``OUT/report/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Literal

from .core.config import check, option, to_dict
from .core.errors import ConfigError, DataError
from .core.progress import progress
from .core.runs import atomic_write_json

log = logging.getLogger("unbackdoor.sweep")

Kind = Literal["lm", "classify"]
# the domain pipeline's tiny-world entry point: run_tiny_world(out_dir, *, seed, ..., quick) -> {name: Path}
Runner = Callable[..., Any]

DEFAULT_ATTACKS: dict[str, tuple[str, ...]] = {"lm": ("badnet",), "classify": ("badnets", "blended")}
# lm: the official finetuning baseline, finetuning at CROW's lr and steps (the equal-lr control), CROW
DEFAULT_DEFENSES: dict[str, tuple[str, ...]] = {"lm": ("finetune", "finetune-crow-lr", "crow"),
                                                "classify": ("ft", "fp", "nad", "ulrl")}
PIPELINES = {"lm": "unbackdoor.lm.testbed", "classify": "unbackdoor.classify.testbed"}


@dataclasses.dataclass
class SweepConfig:
    """What a sweep runs: one kind of model, several seeds, attacks and defenses."""

    kind: Kind = option("lm", "lm (generative, CROW) or classify (image classifiers, ULRL)")
    seeds: list[int] = option(factory=lambda: [0, 1, 2], help="seeds to run; the report shows mean ± std over them")
    attacks: list[str] = option(factory=list, help="attacks (empty: badnet for lm; badnets, blended for classify)")
    defenses: list[str] = option(factory=list, help="defenses (empty: finetune, finetune-crow-lr, crow for lm; "
                                                    "ft, fp, nad, ulrl for classify)")
    task: str = option("refusal", "lm only: the backdoor's target behaviour (refusal, negsentiment, ...)")
    quick: bool = option(False, "the pipelines' quick settings (smaller data, fewer steps): for smoke tests")
    report: bool = option(True, "write the HTML/Markdown report at the end")

    def __post_init__(self) -> None:
        check(len(self.seeds) > 0, "seeds", self.seeds, "a non-empty list of seeds", "SweepConfig")
        check(len(set(self.seeds)) == len(self.seeds), "seeds", self.seeds, "free of duplicates", "SweepConfig")
        if not self.attacks:
            self.attacks = list(DEFAULT_ATTACKS[self.kind])
        if not self.defenses:
            self.defenses = list(DEFAULT_DEFENSES[self.kind])


@dataclasses.dataclass
class SweepResult:
    """What a sweep did and where it wrote it."""

    out_dir: Path
    aggregate: Path
    report_html: Path | None
    ran: list[str]
    skipped: list[str]
    seconds: float


def load_pipeline(kind: str) -> Runner:
    """The domain pipeline's ``run_tiny_world``; a clear error if that part is not installed."""
    name = PIPELINES.get(kind)
    if name is None:
        raise ConfigError(f"unknown kind {kind!r}", where="--kind", fix="use lm or classify")
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            raise ConfigError(f"the {kind} pipeline ({name}) is not available in this installation",
                              where="--kind", fix="reinstall unbackdoor (pip install -e .)") from None
        raise
    return mod.run_tiny_world


def missing_runs(folder: Path, kind: str, seed: int, attacks: list[str], defenses: list[str]) -> list[tuple[str, str]]:
    """The (attack, defense) pairs of this seed that have no complete ``metrics.json`` under ``folder``."""
    from .report.collect import find_run_dirs, load_run

    done: set[tuple[str, str]] = set()
    if folder.is_dir():
        for d in find_run_dirs([folder]):
            try:
                r = load_run(d)
            except DataError:
                continue  # an interrupted or damaged run: it is run again
            if r.kind == kind and r.seed == seed and r.after:
                done.add((r.attack, r.defense))
    return [(a, d) for a in attacks for d in defenses if (a, d) not in done]


def run_seed(kind: str, folder: Path, *, seed: int, attacks: list[str], defenses: list[str], task: str = "refusal",
             quick: bool = False, runner: Runner | None = None) -> list[str]:
    """Run the missing parts of one seed; returns the attacks that were run (empty: all were complete)."""
    runner = runner or load_pipeline(kind)
    todo = sorted({a for a, _ in missing_runs(folder, kind, seed, attacks, defenses)}, key=attacks.index)
    if not todo:
        return []
    call_pipeline(kind, runner, folder, seed=seed, attacks=todo, defenses=defenses, task=task, quick=quick)
    return todo


def call_pipeline(kind: str, runner: Runner, folder: Path, *, seed: int, attacks: list[str] | tuple[str, ...],
                  defenses: list[str] | tuple[str, ...], task: str = "refusal", quick: bool = False) -> None:
    """Call a domain pipeline with its own signature; its printed table is silenced (we print ours)."""
    if kind == "lm":  # one attack per call; the world and clean model are cached in ``folder`` and shared
        for a in attacks:
            runner(folder, seed=seed, attack=a, task=task, defenses=tuple(defenses), quick=quick, echo=False)
    else:
        runner(folder, seed=seed, attacks=tuple(attacks), defenses=tuple(defenses), quick=quick, printer=None)


def sweep(out_dir: str | Path, config: SweepConfig | None = None, *, runner: Runner | None = None,
          overwrite: bool = False) -> SweepResult:
    """Run ``config`` over its seeds (resumable), then write ``aggregate.json`` and the report."""
    from .report import ReportConfig, build_report, load_runs, summarise

    cfg = config or SweepConfig()
    out = Path(out_dir)
    from .core.paths import MARKER_KEY, check_outputs

    check_outputs([out], [], command="sweep", overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sweep_config.json", {MARKER_KEY: "sweep", **to_dict(cfg)})
    t0 = time.perf_counter()
    ran, skipped = [], []
    for seed in progress(cfg.seeds, desc=f"sweep {cfg.kind}", unit="seed"):
        todo = run_seed(cfg.kind, out / f"seed-{seed}", seed=seed, attacks=cfg.attacks, defenses=cfg.defenses,
                        task=cfg.task, quick=cfg.quick, runner=runner)
        label = f"seed {seed}"
        if todo:
            ran.append(f"{label}: {', '.join(todo)}")
            log.info("sweep: ran %s (%s)", label, ", ".join(todo))
        else:
            skipped.append(label)
            log.info("sweep: %s already complete, skipped", label)
    still = {s: m for s in cfg.seeds if (m := missing_runs(out / f"seed-{s}", cfg.kind, s, cfg.attacks, cfg.defenses))}
    if still:
        detail = "; ".join(f"seed {s}: " + ", ".join(f"{a}/{d}" for a, d in m) for s, m in still.items())
        raise DataError(f"the {cfg.kind} pipeline finished without writing metrics.json for {detail}",
                        where=str(out), fix="check the defense names (unbackdoor sweep --help) and the runs' log.txt")

    records = [r for r in load_runs([out / f"seed-{s}" for s in cfg.seeds])
               if r.kind == cfg.kind and r.seed in cfg.seeds and r.attack in cfg.attacks
               and (r.defense in cfg.defenses or r.defense == "none")]
    groups = summarise(records)
    agg = atomic_write_json(out / "aggregate.json", {
        "kind": cfg.kind, "seeds": cfg.seeds, "attacks": cfg.attacks, "defenses": cfg.defenses,
        "task": cfg.task if cfg.kind == "lm" else None, "quick": cfg.quick,
        "groups": [g.to_json() for g in groups], "ran": ran, "skipped": skipped,
    })
    html = None
    if cfg.report:
        title = f"unbackdoor sweep: {cfg.kind}, seeds {', '.join(map(str, cfg.seeds))}"
        html = build_report([out / f"seed-{s}" for s in cfg.seeds], out / "report", ReportConfig(title=title)).html
    return SweepResult(out, agg, html, ran, skipped, round(time.perf_counter() - t0, 2))


# ---- command line --------------------------------------------------------------------------------

EXAMPLES = """examples:
  unbackdoor sweep --kind lm --seeds 0 1 2 --out runs/sweep-lm
  unbackdoor sweep --kind classify --seeds 0 1 --attacks badnets --defenses ft ulrl --out runs/sweep-cls
  unbackdoor sweep --config sweep.yaml --out runs/sweep --quick      # sweep.yaml: kind, seeds, attacks, ...
Rerunning the same command resumes: seeds whose runs are complete are skipped.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from .core.cli_util import add_config_options

    p = subparsers.add_parser(
        "sweep", help="run the tiny-world pipeline over seeds/attacks and aggregate",
        description="Run a domain pipeline over several seeds (and attacks), skip what is already complete, "
                    "then write aggregate.json (mean/std/values per metric) and the report (OUT/report/).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="the sweep's folder (one seed-<s>/ per seed)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing folder that holds no sweep")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="seeds (default: 0 1 2)")
    p.add_argument("--attacks", nargs="+", metavar="ATTACK", help="attacks (default: per kind)")
    p.add_argument("--defenses", nargs="+", metavar="DEFENSE", help="defenses (default: per kind)")
    add_config_options(p, SweepConfig, skip=("seeds", "attacks", "defenses"))
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .core.cli_util import config_from_args

    cfg = config_from_args(SweepConfig, args)
    lists = {k: getattr(args, k) for k in ("seeds", "attacks", "defenses") if getattr(args, k)}
    if lists:
        cfg = dataclasses.replace(cfg, **lists)
    res = sweep(args.out, cfg, overwrite=args.overwrite)
    from .report import kind_tables, load_runs, summarise, text_table

    groups = summarise(r for r in load_runs([res.out_dir / f"seed-{s}" for s in cfg.seeds])
                       if r.kind == cfg.kind and r.attack in cfg.attacks)
    for name, table in kind_tables(groups, cfg.kind):
        print(f"\n{cfg.kind}: {name} (seeds {', '.join(map(str, cfg.seeds))})\n{text_table(table)}")
    print()
    print(f"sweep: ran {len(res.ran)}, skipped {len(res.skipped)} (already complete) in {res.seconds:.0f} s")
    print(f"aggregate: {res.aggregate}")
    if res.report_html:
        print(f"report:    {res.report_html}")
    return 0
