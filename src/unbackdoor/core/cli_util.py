"""Config dataclasses as command-line options, so the CLI stays a thin layer.

Every field of a config becomes ``--field-name`` (booleans get ``--x/--no-x``), plus
``--config FILE.yaml`` and ``--set key=value`` for nested keys. Precedence:
defaults < YAML file < ``--set`` < explicit flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Literal, get_args, get_origin

from .config import load_config, merge, parse_overrides, read_yaml, from_dict

_PREFIX = "cfg__"


def _scalar_parser(tp: Any):
    origin = get_origin(tp)
    if origin is typing.Union or (hasattr(__import__("types"), "UnionType") and origin is __import__("types").UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _scalar_parser(args[0])
        return None
    if tp in (int, float, str):
        return tp
    if origin is Literal:
        return str
    return None


def add_config_options(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add ``--config``, ``--set`` and one flag per scalar field of ``cls``."""
    parser.add_argument("--config", metavar="YAML", help="YAML file of config values (flags override it)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, dotted for nested ones (repeatable)")
    group = parser.add_argument_group(f"{cls.__name__} options")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and not dataclasses.is_dataclass(default):
            help_text += f" (default: {default})"
        if tp is bool:
            group.add_argument(flag, dest=_PREFIX + f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
            continue
        conv = _scalar_parser(tp)
        if conv is None:
            continue  # lists, nested configs: via --config or --set
        kw: dict[str, Any] = {}
        if get_origin(tp) is Literal:
            kw["choices"] = list(get_args(tp))
        group.add_argument(flag, dest=_PREFIX + f.name, type=conv, default=None, help=help_text,
                           metavar=None if "choices" in kw else f.name.upper(), **kw)


def config_from_args(cls: type, args: argparse.Namespace, base: dict[str, Any] | None = None):
    """Resolve the config: defaults < ``base`` < --config < --set < flags."""
    data: dict[str, Any] = dict(base or {})
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
    return from_dict(cls, data, source=source)
