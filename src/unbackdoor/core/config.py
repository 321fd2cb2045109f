"""Typed configuration: dataclasses in, validated values out.

Every method has a config dataclass whose fields carry the paper's defaults and a one-line
``help``. Values come from Python, a YAML file, or ``key=value`` command-line overrides
(dotted keys reach nested configs); an unknown or ill-typed key is a ``ConfigError`` that
names it and suggests the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .errors import ConfigError

C = TypeVar("C")


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING, **meta) -> Any:
    """A dataclass field with a help string (shown by ``--help`` and in the docs)."""
    metadata = {"help": help, **meta}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_help(cls: type, name: str) -> str:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    return ""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert the harmless cases (int->float, list->tuple)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(e)
        raise _type_error(key, value, tp, source)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise _type_error(key, value, tp, source)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _type_error(key, value, tp, source)
        return from_dict(tp, value, source=source, prefix=key + ".")
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise _type_error(key, value, tp, source)
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise _type_error(key, value, tp, source)
            items = [_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _type_error(key, value, tp, source)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, value, tp, source)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, value, tp, source)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, value, tp, source)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, value, tp, source)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _type_error(key, value, tp, source)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(key, value, tp, source)


def _type_error(key: str, value: Any, tp: Any, source: str) -> ConfigError:
    return ConfigError(
        f"config key '{key}' has value {value!r} ({type(value).__name__}), expected {_type_name(tp)}",
        where=source,
        fix=f"set '{key}' to a value of type {_type_name(tp)}",
    )


def from_dict(cls: type[C], data: dict[str, Any], *, source: str = "config", prefix: str = "") -> C:
    """Build ``cls`` from a plain dict, rejecting unknown keys and wrong types by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping of keys to values, got {type(data).__name__}", where=source,
                          fix="write the config as 'key: value' lines")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown config key '{prefix}{key}' for {cls.__name__}", where=source,
                              fix=f"remove it or correct the spelling; {hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key, source)
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{cls.__name__}: {e}", where=source, fix="provide every required key") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-friendly dict of a config (paths as strings, tuples as lists)."""
    def clean(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v
    return {k: clean(v) for k, v in dataclasses.asdict(cfg).items()}


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-3", "lora.r=8"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value", where="command line",
                              fix="write overrides as key=value, e.g. alpha=5.5")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value) if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value) else value
            except ValueError:
                pass
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", where=str(path), fix="check the path given to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file is not valid YAML: {e}", where=str(path), fix="fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise ConfigError("config file must hold a mapping of keys to values", where=str(path),
                          fix="write the config as 'key: value' lines")
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | dict | None = None,
                base: dict[str, Any] | None = None) -> C:
    """Defaults <- ``base`` <- YAML file <- overrides, then type-checked and validated."""
    data: dict[str, Any] = dict(base or {})
    source = "config"
    if path is not None:
        data = merge(data, read_yaml(path))
        source = str(path)
    if overrides:
        over = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        data = merge(data, over)
        source += " + command-line overrides"
    return from_dict(cls, data, source=source)


# ---- range checks used by the configs' __post_init__ ---------------------------------------

def check(condition: bool, key: str, value: Any, requirement: str, cls: str = "") -> None:
    """Raise a ConfigError naming ``key`` unless ``condition``."""
    if not condition:
        owner = f"{cls}." if cls else ""
        raise ConfigError(f"config key '{owner}{key}' = {value!r} is out of range: must be {requirement}",
                          where=cls or "config", fix=f"set '{key}' to a value that is {requirement}")


def check_positive(cfg: Any, *keys: str) -> None:
    for k in keys:
        v = getattr(cfg, k)
        check(v is not None and v > 0, k, v, "> 0", type(cfg).__name__)


def check_non_negative(cfg: Any, *keys: str) -> None:
    for k in keys:
        v = getattr(cfg, k)
        check(v is not None and v >= 0, k, v, ">= 0", type(cfg).__name__)


def check_fraction(cfg: Any, *keys: str, open_low: bool = False) -> None:
    for k in keys:
        v = getattr(cfg, k)
        ok = v is not None and (0 < v <= 1 if open_low else 0 <= v <= 1)
        check(ok, k, v, "in (0, 1]" if open_low else "in [0, 1]", type(cfg).__name__)
