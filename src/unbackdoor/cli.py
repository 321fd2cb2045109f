"""The ``unbackdoor`` command: a thin layer over the Python API.

    unbackdoor lm        poison | attack | defend | evaluate | tinyworld   (generative LMs, CROW)
    unbackdoor classify  poison | attack | defend | evaluate | tinyworld   (classifiers, ULRL)
    unbackdoor report    run folders -> HTML + Markdown report
    unbackdoor sweep     one defense over several seeds (and attacks), aggregated
    unbackdoor demo      the end-to-end demo on the built-in tiny worlds

Each domain module exposes ``register(subparsers)``; each subcommand sets ``func(args)``.
User-fixable problems are ``UnbackdoorError``s, printed without a traceback (``--debug`` shows it).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .core.errors import UnbackdoorError
from .core.progress import set_quiet

# modules that contribute subcommands, in the order of the data flow
_COMMAND_MODULES = ("unbackdoor.lm.cli", "unbackdoor.classify.cli", "unbackdoor.report", "unbackdoor.sweep",
                    "unbackdoor.demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unbackdoor",
        description="Remove backdoors from trained models with a small clean dataset, and measure it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  unbackdoor demo --out runs/demo\n  unbackdoor lm defend --help\n"
               "  unbackdoor classify defend --help\n  unbackdoor report runs/demo --out runs/demo/report",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet:
        set_quiet(True)
    logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING,
                        format="%(levelname)s %(message)s", stream=sys.stderr)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
        return int(rc or 0)
    except UnbackdoorError as e:
        if args.debug:
            raise
        print(f"error: {e.format()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed outputs are kept; rerun with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
