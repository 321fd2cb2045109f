"""Config dataclasses as command-line options, so the CLI stays a thin layer.

Every field of a config becomes ``--field-name``; the Hugging Face spelling ``--field_name`` and
the config's own aliases (``ALIASES``, e.g. ``--lr`` for ``learning_rate``) work too. Booleans get
``--x/--no-x``. ``--config FILE.yaml`` and ``--set key=value`` reach nested keys. Precedence:
defaults < preset < YAML file < ``--set`` < explicit flags.

Which config a command takes can depend on another option (``--method crow`` vs ``--method
finetune``; ``--attack blended``): :func:`peek` reads that option from the command line before the
parser is built, so ``--help`` and the flags are those of the chosen method.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import typing
from typing import Any, Literal, Sequence, get_args, get_origin

from .config import aliases_of, from_dict, merge, parse_overrides, read_yaml

_PREFIX = "cfg__"
_ARGV: list[str] | None = None


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose 'unrecognized arguments' error suggests the closest known flag."""

    def error(self, message: str) -> typing.NoReturn:  # noqa: D401
        m = re.search(r"unrecognized arguments: (.+)", message)
        if m:
            known = [s for a in self._actions for s in a.option_strings]
            hints = []
            for arg in m.group(1).split():
                if arg.startswith("-"):
                    flag = arg.split("=", 1)[0]
                    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
                    if close:
                        hints.append(f"{flag}: did you mean {close[0]}?")
            if hints:
                message += "\n  " + "\n  ".join(hints)
        super().error(message)


def set_argv(argv: Sequence[str] | None) -> None:
    """The command line the parser is being built for (what :func:`peek` reads)."""
    global _ARGV
    _ARGV = list(argv) if argv is not None else None


def peek(flags: Sequence[str], default: str) -> str:
    """The value of the first of ``flags`` on the command line (``--x V`` or ``--x=V``), else ``default``."""
    argv = _ARGV if _ARGV is not None else sys.argv[1:]
    for i, arg in enumerate(argv):
        for flag in flags:
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return default


def _scalar_parser(tp: Any):
    origin = get_origin(tp)
    if origin is typing.Union or (hasattr(__import__("types"), "UnionType") and origin is __import__("types").UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        scalars = [_scalar_parser(a) for a in args]
        scalars = [s for s in scalars if s is not None]
        if len(args) == 1 or (scalars and all(s is str for s in scalars)):
            return scalars[0] if scalars else None
        if len(scalars) == 1:  # e.g. IntervalStrategy | str: the str member parses it
            return scalars[0]
        return None
    if tp in (int, float, str):
        return tp
    if origin is Literal:
        return str
    if isinstance(tp, type) and issubclass(tp, str):  # str-valued enums (transformers' strategies)
        return str
    return None


def add_config_options(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                       title: str | None = None, groups: dict[str, tuple[str, ...]] | None = None) -> None:
    """Add ``--config``, ``--set`` and one flag per scalar field of ``cls`` (with its aliases).

    ``groups`` puts fields in named help groups ({title: field names}); the rest go under ``title``.
    """
    parser.add_argument("--config", metavar="YAML", help="YAML file of config values (flags override it)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, dotted for nested ones (repeatable)")
    main = parser.add_argument_group(title or f"{cls.__name__} options")
    by_field: dict[str, argparse._ArgumentGroup] = {}
    for gtitle, names in (groups or {}).items():
        g = parser.add_argument_group(gtitle)
        by_field.update({n: g for n in names})
    aliases: dict[str, list[str]] = {}
    for alias, target in aliases_of(cls).items():
        aliases.setdefault(target, []).append(alias)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp = hints[f.name]
        group = by_field.get(f.name, main)
        flags = ["--" + f.name.replace("_", "-")] + ["--" + a.replace("_", "-") for a in aliases.get(f.name, [])]
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and not dataclasses.is_dataclass(default):
            help_text += f" (default: {default})"
        underscored = "--" + f.name if "_" in f.name else None
        if tp is bool:
            group.add_argument(*flags, dest=_PREFIX + f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
            if underscored:
                group.add_argument(underscored, dest=_PREFIX + f.name, action=argparse.BooleanOptionalAction,
                                   default=None, help=argparse.SUPPRESS)
            continue
        conv = _scalar_parser(tp)
        if conv is None:
            continue  # lists, nested configs: via --config or --set
        kw: dict[str, Any] = {}
        if get_origin(tp) is Literal:
            kw["choices"] = list(get_args(tp))
        metavar = None if "choices" in kw else f.name.upper()
        group.add_argument(*flags, dest=_PREFIX + f.name, type=conv, default=None, help=help_text, metavar=metavar,
                           **kw)
        if underscored:
            group.add_argument(underscored, dest=_PREFIX + f.name, type=conv, default=None, help=argparse.SUPPRESS,
                               metavar=metavar, **kw)


def overrides_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """``(values, source)``: --config < --set < flags merged into one dict, and where they came from."""
    data: dict[str, Any] = {}
    source = "defaults"
    if getattr(args, "config", None):
        data = merge(data, read_yaml(args.config))
        source = args.config
    if getattr(args, "overrides", None):
        data = merge(data, parse_overrides(args.overrides))
        source += " + --set"
    flags = {k[len(_PREFIX):]: v for k, v in vars(args).items() if k.startswith(_PREFIX) and v is not None}
    if flags:
        data = merge(data, flags)
        source += " + flags"
    return data, source


def config_from_args(cls: type, args: argparse.Namespace, base: dict[str, Any] | None = None):
    """Resolve the config: defaults < ``base`` < --config < --set < flags."""
    data, source = overrides_from_args(args)
    return from_dict(cls, merge(dict(base or {}), data), source=source)
