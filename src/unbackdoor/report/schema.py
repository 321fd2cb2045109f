"""JSON Schemas (draft 2020-12) of ``summary.json`` (every report) and ``aggregate.json`` (every sweep),
and a small validator for the subset of the standard they use (no dependency needed).

docs/report-schema.md explains each field; a test checks that a real summary validates, and
(when the ``jsonschema`` package happens to be installed) that it agrees with this validator.
"""
from __future__ import annotations

import math
from typing import Any

_NUMBER = {"type": "number"}  # NaN (written as the literal NaN) marks a metric a run did not give

_DEFS: dict[str, Any] = {
    "interval": {
        "type": "object", "required": ["low", "high", "method", "level"], "additionalProperties": False,
        "properties": {"low": _NUMBER, "high": _NUMBER, "level": _NUMBER,
                       "method": {"enum": ["wilson", "t"],
                                  "description": "wilson: one run's rate over its n test inputs; t: Student-t "
                                                 "interval of the mean over seeds"}},
    },
    "metric": {
        "type": "object", "required": ["mean", "std", "n", "values", "n_inputs", "ci"],
        "properties": {
            "mean": _NUMBER, "std": _NUMBER,
            "n": {"type": "integer", "minimum": 0, "description": "seeds that gave a number"},
            "values": {"type": "array", "items": {"type": ["number", "null"]}, "description": "one per seed"},
            "n_inputs": {"type": ["array", "null"], "items": {"type": ["integer", "null"]},
                         "description": "test inputs behind the rate, one per seed (null: unknown or not a rate)"},
            "ci": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/interval"}]},
        },
    },
    "metrics": {"type": "object", "additionalProperties": {"$ref": "#/$defs/metric"}},
    "seconds": {"type": "object", "properties": {"mean": _NUMBER, "std": _NUMBER, "n": {"type": "integer"},
                                                  "values": {"type": "array"}}},
    "group": {
        "type": "object",
        "required": ["kind", "attack", "task", "defense", "settings", "variant", "seeds", "before", "after",
                     "seconds", "runs"],
        "properties": {
            "kind": {"enum": ["lm", "classify"]},
            "attack": {"type": "string"},
            "task": {"type": ["string", "null"]},
            "defense": {"type": "string"},
            "settings": {"type": "object", "additionalProperties": {"type": "string"},
                         "description": "what sets this group apart from other groups of the same defense"},
            "variant": {"type": ["string", "null"], "description": "the preset name the runs recorded"},
            "seeds": {"type": "array", "items": {"type": "integer"}},
            "before": {"$ref": "#/$defs/metrics"},
            "after": {"$ref": "#/$defs/metrics"},
            "seconds": {"$ref": "#/$defs/seconds"},
            "runs": {"type": "array", "items": {"type": "string"}},
        },
    },
}

SUMMARY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "unbackdoor report summary.json",
    "type": "object", "required": ["groups", "warnings"],
    "properties": {"groups": {"type": "array", "items": {"$ref": "#/$defs/group"}},
                   "warnings": {"type": "array", "items": {"type": "string"}}},
    "$defs": _DEFS,
}

AGGREGATE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "unbackdoor sweep aggregate.json",
    "type": "object", "required": ["kind", "seeds", "attacks", "defenses", "groups"],
    "properties": {
        "kind": {"enum": ["lm", "classify"]},
        "seeds": {"type": "array", "items": {"type": "integer"}},
        "attacks": {"type": "array", "items": {"type": "string"}},
        "defenses": {"type": "array", "items": {"type": "string"}},
        "task": {"type": ["string", "null"]},
        "quick": {"type": "boolean"},
        "groups": {"type": "array", "items": {"$ref": "#/$defs/group"}},
        "ran": {"type": "array", "items": {"type": "string"}},
        "skipped": {"type": "array", "items": {"type": "string"}},
    },
    "$defs": _DEFS,
}

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    node: Any = root
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def validate(instance: Any, schema: dict[str, Any], *, root: dict[str, Any] | None = None,
             path: str = "$") -> list[str]:
    """Every way ``instance`` breaks ``schema`` ("$.groups[0].seeds: expected array"); empty: valid.

    Supports what the schemas here use: type, enum, properties, required, additionalProperties,
    items, minimum, anyOf and local ``$ref``.
    """
    root = root or schema
    if "$ref" in schema:
        return validate(instance, _resolve(schema["$ref"], root), root=root, path=path)
    errors: list[str] = []
    if "anyOf" in schema:
        if all(validate(instance, s, root=root, path=path) for s in schema["anyOf"]):
            errors.append(f"{path}: matches none of the allowed forms")
        return errors
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_TYPES[t](instance) for t in names):
            return [f"{path}: expected {' or '.join(names)}, got {type(instance).__name__}"]
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} is not one of {schema['enum']}")
    if "minimum" in schema and _TYPES["number"](instance) and not math.isnan(instance) \
            and instance < schema["minimum"]:
        errors.append(f"{path}: {instance} is below the minimum {schema['minimum']}")
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{path}: missing '{key}'")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            if key in props:
                errors += validate(value, props[key], root=root, path=f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unexpected '{key}'")
            elif isinstance(extra, dict):
                errors += validate(value, extra, root=root, path=f"{path}.{key}")
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(instance):
            errors += validate(value, schema["items"], root=root, path=f"{path}[{i}]")
    return errors


if __name__ == "__main__":  # python -m unbackdoor.report.schema summary|aggregate > file.schema.json
    import json
    import sys

    which = sys.argv[1] if len(sys.argv) > 1 else "summary"
    if which not in ("summary", "aggregate"):
        sys.exit("usage: python -m unbackdoor.report.schema summary|aggregate")
    print(json.dumps(SUMMARY_SCHEMA if which == "summary" else AGGREGATE_SCHEMA, indent=2))
