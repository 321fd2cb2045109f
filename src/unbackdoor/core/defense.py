"""What a defense is, for the registries: its config, its code, and what it needs (the threat model).

Every defense of either kind is described by one :class:`DefenseSpec` in its own folder and
registered by name in one line (``lm/defenses/__init__.py``, ``classify/defenses/__init__.py``).
The CLI's choices and flags, the API, the tiny worlds' budgets, sweeps and the report's method
names all read the spec; the run folder records :meth:`Needs.ledger` so that every result says
what the defender had to hold to get it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

from .config import from_dict, merge, to_dict
from .errors import ConfigError

SettingsOf = Callable[[str], Mapping[str, Any]]
"""``settings_of(defense) -> its resolved config as a dict``, in the context a config is being made in."""


@dataclass(frozen=True)
class Linked:
    """A preset or budget value taken from another defense's settings in the same context (times ``scale``).

    A fair control must follow the method it controls for: plain finetuning "at CROW's learning
    rate and steps" is ``Linked("crow", "learning_rate")``, whatever CROW's learning rate is where
    it runs (its paper default for ``unbackdoor lm defend``, the world's on a tiny world, a user's
    override). Resolved by :func:`resolve_links` when the config is made.
    """

    defense: str
    field: str
    scale: float = 1.0

    def resolve(self, settings_of: SettingsOf | None, where: str = "preset") -> Any:
        if settings_of is None:
            raise ConfigError(f"{where} takes '{self.field}' from defense '{self.defense}', but no settings of other "
                              "defenses were given to resolve it", where=where,
                              fix="make the config through the flow (resolve_defense / the tiny world), or pass "
                                  "settings_of=")
        settings = settings_of(self.defense)
        if self.field not in settings:
            raise ConfigError(f"{where} takes '{self.field}' from defense '{self.defense}', whose settings have no "
                              "such field", where=where, fix=f"link to one of: {', '.join(sorted(settings))}")
        value = settings[self.field]
        if self.scale == 1.0:
            return value
        return float(f"{value * self.scale:.12g}")  # 0.2 x 1e-3 is 2e-4, not 2.0000000000000004e-4


def resolve_links(values: Mapping[str, Any], settings_of: SettingsOf | None, where: str = "preset") -> dict[str, Any]:
    """``values`` with every :class:`Linked` (at any depth) replaced by its value; a copy."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, Linked):
            out[k] = v.resolve(settings_of, f"{where} '{k}'")
        elif isinstance(v, Mapping):
            out[k] = resolve_links(v, settings_of, where)
        else:
            out[k] = v
    return out


@dataclass(frozen=True)
class Needs:
    """What a defense needs beyond the suspect model. Recorded in every run (``threat_model.json``)."""

    trains: bool = True
    """Updates weights by gradient steps (pruning and quantization do not)."""
    clean_data: bool = True
    """Reads the defender's clean subset (data-free defenses do not)."""
    base_model: bool = False
    """Needs the clean base / reference model the suspect was finetuned from."""
    trigger_knowledge: bool = False
    """Needs to know the trigger (no defense here does; a ceiling, not a defense)."""
    behaviour_examples: bool = False
    """Needs examples of the desired and the unwanted behaviour (e.g. BEEAR), not the trigger."""

    def ledger(self, **given: Any) -> dict[str, Any]:
        """``{"needs": ..., "given": ...}``: the declared needs beside what the run actually received."""
        return {"needs": dataclasses.asdict(self), "given": dict(given),
                "note": "a defense sees only what 'given' lists; test data and the attack's settings are "
                        "used by the evaluation alone"}


@dataclass(frozen=True)
class DefenseSpec:
    """One defense: its name, config class, code, needs, and named settings.

    ``run`` has the signature of its kind (see ``lm/defenses/__init__.py`` and
    ``classify/defenses/__init__.py``); ``check`` refuses an unsuitable model up front. ``presets`` are named recipes (field overrides of the
    config; ``paper`` is always the defaults); ``budgets`` are the tiny worlds' shortened
    settings (``demo``, ``smoke``; a missing budget means the config's own values). A preset or
    budget value may be a :class:`Linked` value (another defense's setting in the same context).
    """

    name: str
    kind: Literal["lm", "classify"]
    config: type
    run: Callable[..., Any]
    summary: str
    needs: Needs = field(default_factory=Needs)
    paper: str = ""
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    budgets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    check: Callable[[Any, Any], None] | None = None
    """``check(model, cfg)``: refuse a model this defense cannot handle before any compute is spent."""

    def check_model(self, model: Any, cfg: Any) -> None:
        if self.check is not None:
            self.check(model, cfg)

    def preset_names(self) -> list[str]:
        return ["paper", *[p for p in self.presets if p != "paper"]]

    def make_config(self, config: Any = None, *, preset: str | None = None,
                    overrides: Mapping[str, Any] | None = None,
                    source: str = "the given settings (flags, --set, --config or keyword arguments)",
                    settings_of: SettingsOf | None = None) -> Any:
        """The config object: ``config`` (or the defaults, or a preset), with ``overrides`` applied and checked.

        ``settings_of`` resolves a preset's :class:`Linked` values (another defense's settings).
        """
        if config is not None and not isinstance(config, self.config):
            raise ConfigError(f"defense '{self.name}' takes a {self.config.__name__}, got {type(config).__name__}",
                              where="defense config", fix=f"pass {self.config.__name__}(...) or keyword overrides")
        if preset is not None and config is not None:
            raise ConfigError("give a preset or a config object, not both", where=f"defense '{self.name}'",
                              fix="drop one of them")
        base: dict[str, Any] = to_dict(config) if config is not None else {}
        if preset is not None:
            base = merge(base, resolve_links(self.preset(preset), settings_of, f"preset '{preset}' of '{self.name}'"))
        if not overrides and config is not None:
            return config
        data = merge(base, dict(overrides or {}))
        return from_dict(self.config, data, source=source)

    def preset(self, name: str) -> dict[str, Any]:
        """The field overrides of a named preset (``paper``: none)."""
        key = str(name).strip().lower()
        if key in ("paper", "default"):
            return dict(self.presets.get("paper", {}))
        if key not in self.presets:
            raise ConfigError(f"defense '{self.name}' has no preset '{name}'", where="preset",
                              fix=f"use one of: {', '.join(self.preset_names())}")
        return dict(self.presets[key])

    def budget(self, name: str) -> dict[str, Any]:
        """The tiny-world overrides for budget ``name`` (``paper``, or one this defense does not define: none)."""
        return dict(self.budgets.get(name, {}))


def resolve_defense(registry: Any, method: str, config: Any = None, *, preset: str | None = None,
                    overrides: Mapping[str, Any] | None = None,
                    settings_of: SettingsOf | None = None) -> tuple[DefenseSpec, Any, str | None]:
    """``(spec, config, preset)`` for ``method`` in ``registry``; ``ulrl-kept`` names ULRL's preset ``kept``.

    Without ``config`` the preset's values (or the defaults) are the base; a given ``config`` already
    holds them, so ``preset`` then only names it. ``overrides`` are applied last, type-checked. A
    preset's :class:`Linked` values take the other defense's settings from ``settings_of``, by
    default its registered defaults (``finetune-crow-lr``: CROW's paper lr and steps).
    """
    from .registry import split_variant

    name, variant = split_variant(method, registry)
    if variant is not None and preset is not None and variant != preset:
        raise ConfigError(f"'{method}' names preset '{variant}' but preset '{preset}' was also given",
                          where="defense", fix="give the preset once")
    spec = registry.get(name)
    preset = preset or variant
    if settings_of is None:
        def settings_of(other: str) -> Mapping[str, Any]:
            return to_dict(registry.get(other).make_config())
    cfg = spec.make_config(config, preset=preset if config is None else None, overrides=overrides,
                           settings_of=settings_of)
    return spec, cfg, preset


def write_threat_model(run: Any, spec: DefenseSpec, **given: Any) -> None:
    """``threat_model.json``: what ``spec`` declares it needs beside what this run gave it."""
    run.write_json("threat_model.json", {"defense": spec.name, "kind": spec.kind, **spec.needs.ledger(**given)})


def defense_metrics(*, kind: str, defense: str, variant: str | None, attack: str | None, seed: int,
                    before: Mapping[str, Any], after: Mapping[str, Any], seconds: float | None,
                    task: str | None = None, **extra: Any) -> dict[str, Any]:
    """The ``metrics.json`` record of one defense run (docs/ARCHITECTURE.md), the same for both kinds.

    ``defense`` is the name rows are grouped by (``ulrl``, or ``ulrl-kept`` for a preset), ``variant``
    the preset; ``before``/``after`` are empty when no test data was given.
    """
    record: dict[str, Any] = {"kind": kind, "defense": defense, "variant": variant, "attack": attack}
    if kind == "lm":
        record["task"] = task
    record.update({"seed": int(seed), "before": dict(before), "after": dict(after),
                   "seconds": None if seconds is None else round(float(seconds), 3)})
    record.update(extra)
    return record


def key_settings(cfg: Any) -> dict[str, Any]:
    """The fields a toolkit config declares itself (what a model card or a table should show).

    For a config that extends a library class (``SFTConfig`` extends ``TrainingArguments``), the
    library's own fields are left out unless the toolkit redeclares them with its defaults.
    """
    own: set[str] = set()
    for klass in type(cfg).__mro__:
        if not klass.__module__.startswith("unbackdoor"):
            continue
        own |= set(klass.__dict__.get("__annotations__", {}))
    values = to_dict(cfg)
    return {k: v for k, v in values.items() if k in own and not k.isupper() and k != "output_dir"}
