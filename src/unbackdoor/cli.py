"""The ``unbackdoor`` command: a thin layer over the Python API.

    unbackdoor lm        poison | attack | defend | evaluate | tinyworld   (generative LMs, CROW)
    unbackdoor classify  poison | attack | defend | evaluate | tinyworld   (classifiers, ULRL)
    unbackdoor report    run folders -> HTML + Markdown report
    unbackdoor sweep     one defense over several seeds (and attacks), aggregated
    unbackdoor demo      the end-to-end demo on the built-in tiny worlds

Each domain module exposes ``register(subparsers)``; each subcommand sets ``func(args)``.
User-fixable problems are ``UnbackdoorError``s, printed without a traceback (exit code 2), and so
are ``OSError``s (read-only or full disk, a file where a folder belongs: ``core.errors.os_error``);
anything else is a bug, reported in one line with a hint to rerun with ``--debug``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from . import __version__
from .core import logs
from .core.cli_util import Parser, set_argv
from .core.errors import UnbackdoorError, os_error
from .core.progress import set_quiet

# command -> (module with register(subparsers), one-line help), in the order of the data flow.
# Only the module of the command being run is imported, so `unbackdoor report` does not pay for
# importing transformers; `unbackdoor --help` lists all of them from these lines.
COMMANDS: dict[str, tuple[str, str]] = {
    "lm": ("unbackdoor.lm.cli", "generative LMs: tiny world, poison, attack, defend (CROW, finetune), evaluate"),
    "classify": ("unbackdoor.classify.cli", "classifiers: tiny world, poison, attack, defend (ULRL, FT, FP, NAD), "
                                            "evaluate"),
    "scan": ("unbackdoor.scan.cli", "is a model backdoored? verdict, suspected target, calibrated score (ULRL, "
                                    "layer consistency, ConfGuard scanners)"),
    "report": ("unbackdoor.report", "run folders -> HTML + Markdown report with plots"),
    "sweep": ("unbackdoor.sweep", "run a tiny-world pipeline over seeds/attacks and aggregate"),
    "demo": ("unbackdoor.demo", "the end-to-end demo on the tiny worlds (CPU, a few minutes)"),
}
_COMMAND_MODULES = tuple(m for m, _ in COMMANDS.values())

EXIT_USER_ERROR = 2
EXIT_BUG = 1


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser that runs a command (so ``--debug`` also works after the subcommand)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    if not subs:
        return [parser]
    out = []
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
            out += _leaf_parsers(child)
    return out


def _add_global_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # below the top level the defaults are SUPPRESS, so a flag given before the subcommand is kept
    default = False if top else argparse.SUPPRESS
    for flag, text in (("--debug", "show full tracebacks on errors"),
                       ("--quiet", "no progress bars and fewer log lines")):
        try:
            parser.add_argument(flag, action="store_true", default=default, help=text)
        except argparse.ArgumentError:
            pass  # the subcommand defines it itself


def _module_available(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


def build_parser(*, debug: bool = False, only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (``only``) one with just that command's module imported and the others listed."""
    parser = Parser(
        prog="unbackdoor",
        description="Remove backdoors from trained models with a small clean dataset, and measure it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  unbackdoor demo --out runs/demo\n  unbackdoor lm defend --help\n"
               "  unbackdoor classify defend --help\n  unbackdoor sweep --kind lm --seeds 0 1 2 --out runs/sweep\n"
               "  unbackdoor report runs/demo --out runs/demo/report",
    )
    parser.add_argument("--version", action="version", version=f"unbackdoor {__version__}")
    _add_global_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command, (name, text) in COMMANDS.items():
        if only is not None and command != only:
            if _module_available(name):
                sub.add_parser(command, help=text, add_help=False)  # listed; imported only when run
            continue
        try:
            mod = importlib.import_module(name)
        except UnbackdoorError:
            if only is not None:  # the command asked for cannot run: say why, as an error
                raise
            print(f"warning: the commands of {name} are unavailable; run one of them to see why", file=sys.stderr)
            continue
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # this part of the toolkit is not installed
            if debug:
                raise
            print(f"warning: the commands of {name} are unavailable ({type(e).__name__}: {e}); "
                  "rerun with --debug for the traceback", file=sys.stderr)
            continue
        except Exception as e:  # a broken plug-in must not take the other commands down with it
            if debug:
                raise
            print(f"warning: the commands of {name} are unavailable ({type(e).__name__}: {e}); "
                  "rerun with --debug for the traceback", file=sys.stderr)
            continue
        mod.register(sub)
    for leaf in _leaf_parsers(parser):
        if leaf is not parser:
            _add_global_flags(leaf, top=False)
    return parser


def _log_to_stderr(level: int) -> None:
    """Log lines on stderr at ``level``; the handler filters, so run folders' log.txt still gets INFO.

    Under a multi-process launch only rank 0's lines pass (and every rank's errors).
    """
    handler = logs.install(logging.StreamHandler(sys.stderr))
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.WARNING, level))


def _command_in(argv: list[str]) -> str:
    """The subcommand named on the command line ('' when none: then only the top-level help is needed)."""
    for a in argv:
        if not a.startswith("-"):
            return a
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    set_argv(argv)  # commands whose flags depend on --method / --attack read them while building the parser
    try:
        parser = build_parser(debug="--debug" in argv, only=command if command in COMMANDS else "")
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, already printed with a suggestion)
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USER_ERROR
    except UnbackdoorError as e:  # an unknown --method; a dependency below its floor (core.requirements)...
        if "--debug" in argv:
            raise
        print(f"error: {e.format()}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        set_argv(None)  # a parser built later (another main() in the same process) reads its own command line
    if args.quiet:
        set_quiet(True)
        os.environ["UNBACKDOOR_QUIET"] = "1"  # child processes too
    _log_to_stderr(logging.WARNING if args.quiet else logging.INFO)
    if not args.debug:  # libraries' deprecation notices are for developers, not for users of the command
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        with logs.main_process_stdout():  # one summary per job, not one per process
            rc = args.func(args)
        return int(rc or 0)
    except UnbackdoorError as e:
        if args.debug:
            raise
        rank = logs.process_rank()
        print(f"error{f' (rank {rank})' if rank else ''}: {e.format()}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:  # read-only or full disk, a file where a folder belongs...: the user's to fix
        if args.debug:
            raise
        print(f"error: {os_error(e).format()}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: completed outputs are kept; rerun the same command to continue", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a user error: one line, the traceback on request
        if args.debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"error: unexpected {type(e).__name__}: {first}\n"
              "  this is probably a bug in unbackdoor; rerun with --debug for the traceback and report it",
              file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
