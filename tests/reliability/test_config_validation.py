"""Hyperparameters out of range are refused at the boundary, in every ``*Config`` of the package.

The configs are discovered by walking ``unbackdoor.*``; each field whose name says what it is
(alpha, epsilon, learning rate, epochs, batch size, momentum, weight decay) gets the values a
user could plausibly mistype. Each must be a ``ConfigError`` that names the key, where the
value came from, and a fix, whether the config is built from a dict (YAML, ``--set``) or in
Python.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing

import pytest

from .rel_helpers import config_classes
from unbackdoor.core.config import from_dict, load_config, to_dict
from unbackdoor.core.errors import ConfigError

NAN, INF = float("nan"), float("inf")

# (field-name pattern, bad values): the table this file is driven by
RULES: list[tuple[str, tuple[float, ...]]] = [
    (r"(^|_)(alpha|epsilon|eps)$", (-1.0, NAN, INF)),
    (r"(^|_)(lr|learning_rate)$", (0.0, -1e-3, NAN, INF)),
    (r"^(?!warmup_)(\w+_)?(max_)?epochs$", (0, -1)),
    (r"(^|_)batch_size$|^grad_accum$", (0, -1)),
    (r"(^|_)(momentum|weight_decay)$", (-0.1, NAN)),
]

# Known gaps in domain configs: {(class name, field, repr(value)): reason}. Each is an
# xfail(strict=True), so the test starts failing (and this entry must go) once it is fixed.
KNOWN_GAPS: dict[tuple[str, str, str], str] = {}

# Values a rule would refuse but a config documents as meaningful: {(class name, field, repr(value)): why}.
DOCUMENTED_EXCEPTIONS: dict[tuple[str, str, str], str] = {
    ("FPConfig", "epochs", "0"): "fine-pruning with 0 epochs prunes without fine-tuning (documented in FPConfig)",
}


def _numeric(tp: typing.Any) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return all(a in (int, float) for a in args)


def _cases() -> list[typing.Any]:
    cases = []
    for cls in config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or not _numeric(hints[f.name]):
                continue
            for pattern, values in RULES:
                if not re.search(pattern, f.name):
                    continue
                for v in values:
                    if isinstance(v, float) and math.isnan(v) and float not in typing.get_args(hints[f.name]) \
                            and hints[f.name] is not float:
                        continue  # NaN cannot reach an int field
                    if hints[f.name] is int and not float(v).is_integer():
                        continue
                    v = int(v) if hints[f.name] is int and math.isfinite(v) else v
                    if hints[f.name] is int and not math.isfinite(v):
                        continue
                    key = (cls.__name__, f.name, repr(v))
                    if key in DOCUMENTED_EXCEPTIONS:
                        continue
                    marks = [pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[key])] if key in KNOWN_GAPS else []
                    cases.append(pytest.param(cls, f.name, v, id=f"{cls.__name__}.{f.name}={v!r}", marks=marks))
    return cases


CASES = _cases()


def test_every_config_is_discovered():
    names = {c.__name__ for c in config_classes()}
    assert {"ULRLConfig", "TrainConfig", "SFTConfig", "PoisonConfig"} <= names, names
    assert len(CASES) >= 40


@pytest.mark.parametrize("cls,key,value", CASES)
def test_out_of_range_hyperparameter_is_refused(cls, key, value, tally, tmp_path):
    tally("bad_input_cases")
    with pytest.raises(ConfigError) as e:
        from_dict(cls, {key: value}, source="my.yaml")
    msg = str(e.value)
    assert key in msg, f"the message does not name '{key}': {msg}"
    assert e.value.where and e.value.fix, msg
    # the same value from a YAML file names the file
    y = tmp_path / "bad.yaml"
    y.write_text(f"{key}: {'.nan' if value != value else ('.inf' if value == INF else value)}\n")
    with pytest.raises(ConfigError) as e2:
        load_config(cls, y)
    assert key in str(e2.value) and str(y) in str(e2.value)
    # and in Python
    with pytest.raises(ConfigError):
        cls(**{key: value})


@pytest.mark.parametrize("cls", config_classes(), ids=lambda c: c.__name__)
def test_defaults_are_valid_and_round_trip(cls):
    cfg = from_dict(cls, {})
    again = from_dict(cls, to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("cls", config_classes(), ids=lambda c: c.__name__)
def test_unknown_and_ill_typed_keys_are_named(cls, tally):
    tally("bad_input_cases", 2)
    with pytest.raises(ConfigError) as e:
        from_dict(cls, {"no_such_key_xyz": 1})
    assert "no_such_key_xyz" in str(e.value) and e.value.fix
    hints = typing.get_type_hints(cls)
    field = next((f.name for f in dataclasses.fields(cls) if f.init and _numeric(hints[f.name])), None)
    if field is None:
        return
    with pytest.raises(ConfigError) as e:
        from_dict(cls, {field: "not a number"})
    assert field in str(e.value)
