"""Typed configuration: dataclasses in, validated values out.

Every method has a config dataclass whose fields carry the paper's defaults and a one-line
``help``. Values come from Python, a YAML file, or ``key=value`` command-line overrides
(dotted keys reach nested configs); an unknown or ill-typed key is a ``ConfigError`` that
names it and suggests the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
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


def aliases_of(cls: type) -> dict[str, str]:
    """Other names a config accepts for its fields (``cls.ALIASES``: alias -> field), e.g. ``lr``."""
    return dict(getattr(cls, "ALIASES", {}) or {})


def _resolve_aliases(cls: type, data: dict[str, Any], source: str, prefix: str) -> dict[str, Any]:
    """``data`` with alias keys renamed to their fields (a dotted target reaches a nested config)."""
    aliases = aliases_of(cls)
    if not aliases or not any(isinstance(k, str) and k in aliases for k in data):
        return data
    out: dict[str, Any] = {k: v for k, v in data.items() if not (isinstance(k, str) and k in aliases)}
    for key, value in data.items():
        if not (isinstance(key, str) and key in aliases):
            continue
        *parents, leaf = aliases[key].split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                child = node[part] = to_dict(child) if dataclasses.is_dataclass(child) else child
            node = child
        if leaf in node:
            raise ConfigError(f"config keys '{prefix}{key}' and '{prefix}{aliases[key]}' name the same setting",
                              where=source, fix=f"give only '{prefix}{aliases[key]}'")
        node[leaf] = value
    return out


def from_dict(cls: type[C], data: dict[str, Any], *, source: str = "config", prefix: str = "") -> C:
    """Build ``cls`` from a plain dict, rejecting unknown keys and wrong types by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping of keys to values, got {type(data).__name__}", where=source,
                          fix="write the config as 'key: value' lines")
    data = _resolve_aliases(cls, data, source, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in fields:
            close = difflib.get_close_matches(str(key), list(fields) + list(aliases_of(cls)), n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown config key '{prefix}{key}' for {cls.__name__}", where=source,
                              fix=f"remove it or correct the spelling; {hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key, source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if e.where in (None, "config", cls.__name__) and source != "config":
            e.where = f"{source} ({cls.__name__})"  # say which file/flags held the bad value
            e.args = (e.format(),)
        raise
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{cls.__name__}: {e}", where=source, fix="provide every required key") from None
    except ValueError as e:  # a __post_init__ check that does not use check_*
        raise ConfigError(f"{cls.__name__}: {e}", where=source, fix="correct the value named above") from None


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


_KEY_RE = re.compile(r"[^\s.=]+(\.[^\s.=]+)*")  # non-empty dotted segments


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-3", "lora.r=8"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    if isinstance(items, str):
        items = [items]
    for item in items or []:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value", where="command line",
                              fix="write overrides as key=value, e.g. alpha=5.5")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not _KEY_RE.fullmatch(key):
            raise ConfigError(f"override {item!r} has an invalid key {key!r}", where="command line",
                              fix="keys are field names, dotted for nested configs, e.g. lora.r=8")
        value = _parse_scalar(raw)
        node = out
        parts = key.split(".")
        for depth, p in enumerate(parts[:-1]):
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {item!r} conflicts with an earlier override of '{prefix}'",
                                  where="command line", fix=f"set either '{prefix}' or its nested keys, not both")
            node = child
        if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
            raise ConfigError(f"override {item!r} conflicts with earlier overrides of '{key}.*'",
                              where="command line", fix=f"set either '{key}' or its nested keys, not both")
        node[parts[-1]] = value
    return out


def _parse_scalar(raw: str) -> Any:
    """A command-line value as YAML would read it; anything YAML cannot read stays a string."""
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError):
        value = raw
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        value = float(value)  # YAML 1.1 reads "1e-3" as a string
    return value


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; every way the file can be wrong is a ``ConfigError`` naming it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config path is a folder, not a file: {path}", where=str(path),
                          fix="pass the YAML file itself to --config")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", where=str(path), fix="check the path given to --config")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file is not UTF-8 text (byte {e.start})", where=str(path),
                          fix="save the config as UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror or e}", where=str(path),
                          fix="check the file's permissions") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file is not valid YAML: {e}", where=str(path), fix="fix the YAML syntax") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:  # e.g. a bad !!timestamp, deep nesting
        raise ConfigError(f"config file has a value YAML cannot read: {type(e).__name__}: {str(e)[:200]}",
                          where=str(path), fix="quote the value or simplify the YAML") from None
    if data is None:
        return {}
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


def _finite_number(v: Any) -> bool:
    """A real number that is not NaN or infinite (bools are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            import numpy as np

            if not isinstance(v, (np.integer, np.floating)):
                return False
        except ImportError:  # pragma: no cover
            return False
    if isinstance(v, int) or (hasattr(v, "dtype") and getattr(v.dtype, "kind", "") in "iu"):
        return True  # integers are finite (and float() of a huge one would overflow)
    return math.isfinite(float(v))


def check_positive(cfg: Any, *keys: str) -> None:
    for k in keys:
        v = getattr(cfg, k)
        check(_finite_number(v) and v > 0, k, v, "a finite number > 0", type(cfg).__name__)


def check_non_negative(cfg: Any, *keys: str) -> None:
    for k in keys:
        v = getattr(cfg, k)
        check(_finite_number(v) and v >= 0, k, v, "a finite number >= 0", type(cfg).__name__)


def check_fraction(cfg: Any, *keys: str, open_low: bool = False) -> None:
    for k in keys:
        v = getattr(cfg, k)
        ok = _finite_number(v) and (0 < v <= 1 if open_low else 0 <= v <= 1)
        check(ok, k, v, "in (0, 1]" if open_low else "in [0, 1]", type(cfg).__name__)


def check_choice(cfg: Any, key: str, choices: Any) -> None:
    """Raise a ConfigError unless ``cfg.key`` is one of ``choices`` (for values built in Python)."""
    v = getattr(cfg, key)
    choices = tuple(choices)
    check(v in choices, key, v, "one of " + ", ".join(repr(c) for c in choices), type(cfg).__name__)
