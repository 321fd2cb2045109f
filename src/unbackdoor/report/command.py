"""``unbackdoor report``: the command-line face of :func:`build_report`."""
from __future__ import annotations

import argparse

from ..core.cli_util import add_config_options, config_from_args

EXAMPLES = """examples:
  unbackdoor report runs/demo --out runs/demo/report
  unbackdoor report runs/sweep-a runs/sweep-b --out report --title "CROW vs finetuning"
  unbackdoor report runs/ --out report --set max_generations=4 --skip-invalid
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from .build import ReportConfig

    p = subparsers.add_parser(
        "report", help="run folders -> HTML + Markdown report with plots",
        description="Find every run folder (a folder with metrics.json) under RUN_DIR..., group the runs by "
                    "(kind, attack, task, defense), and write report.html (self-contained), report.md, "
                    "summary.json and the PNG plots to --out.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, or folders that contain them")
    p.add_argument("--out", required=True, metavar="DIR", help="where the report is written")
    p.add_argument("--overwrite", action="store_true", help="write into an existing folder that holds no report")
    add_config_options(p, ReportConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..core import distributed
    from .build import ReportConfig, build_report

    if distributed.info().rank != 0:
        # a report is one writer's job: under a multi-process launch the other ranks would race rank 0
        # into the same folder (and find it half-written, as someone else's)
        return 0

    cfg = config_from_args(ReportConfig, args)
    res = build_report(args.run_dirs, args.out, cfg, overwrite=args.overwrite)
    n_runs = sum(len(g.runs) for g in res.groups)
    print(f"report: {res.html}\n        {res.markdown}\n        {len(res.images)} plot(s), {n_runs} run(s)"
          + (f", {len(res.warnings)} warning(s)" if res.warnings else ""))
    return 0
