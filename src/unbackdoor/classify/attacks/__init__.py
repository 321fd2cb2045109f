"""Data-poisoning backdoor attacks on image classifiers, by name.

Each attack is one module here (its config and its trigger), registered in one line below;
the CLI's ``--attack`` choices and flags, model metadata and the tiny world read this registry.
An attack exists to build backdoored models to judge the defenses against (SPEC section 3).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ...core.config import from_dict
from ...core.registry import Registry
from .base import Attack, AttackConfig, PoisonResult, attack_targets

IMAGE_ATTACKS: Registry[type[Attack]] = Registry("image attack")
IMAGE_ATTACKS.add("badnets", "unbackdoor.classify.attacks.badnets:BadNets")
IMAGE_ATTACKS.add("blended", "unbackdoor.classify.attacks.blended:Blended")
IMAGE_ATTACKS.add("sig", "unbackdoor.classify.attacks.sig:SIG")
IMAGE_ATTACKS.add("wanet", "unbackdoor.classify.attacks.wanet:WaNet")
IMAGE_ATTACKS.add("bpp", "unbackdoor.classify.attacks.bpp:BPP")
IMAGE_ATTACKS.add("lf", "unbackdoor.classify.attacks.lf:LF")
IMAGE_ATTACKS.add("inputaware", "unbackdoor.classify.attacks.inputaware:InputAware", aliases=("input-aware",))
IMAGE_ATTACKS.add("lc", "unbackdoor.classify.attacks.lc:LC")
IMAGE_ATTACKS.add("trojannn", "unbackdoor.classify.attacks.trojannn:TrojanNN")
IMAGE_ATTACKS.add("adapblend", "unbackdoor.classify.attacks.adapblend:AdapBlend", aliases=("adap-blend",))

__all__ = ["IMAGE_ATTACKS", "Attack", "AttackConfig", "PoisonResult", "attack_config", "attack_config_from_dict",
           "attack_targets", "build_attack", "poison", "poison_full", "triggered_test_set"]


def config_class(name: str) -> type[AttackConfig]:
    """The config dataclass of attack ``name``."""
    return IMAGE_ATTACKS.get(name).Config


def attack_config(name: str = "badnets", **fields: Any) -> AttackConfig:
    """The config of attack ``name`` with ``fields`` set (type-checked; unknown keys are errors)."""
    key = IMAGE_ATTACKS.canonical(name)
    return from_dict(config_class(key), {**fields, "name": key}, source=f"attack '{key}' settings")


def attack_config_from_dict(stored: Mapping[str, Any] | None, **defaults: Any) -> AttackConfig:
    """An attack config from a stored dict (``model.json``'s ``attack``), keeping only that attack's fields.

    Files written before attacks had their own configs hold every attack's knobs; the others' are
    ignored. ``defaults`` fill what the dict lacks (e.g. ``name``, ``seed``).
    """
    data = {**defaults, **dict(stored or {})}
    cls = config_class(str(data.get("name", "badnets")))
    keep = {f.name for f in dataclasses.fields(cls)}
    return attack_config(str(data.get("name", "badnets")), **{k: v for k, v in data.items() if k in keep and k != "name"})


def build_attack(cfg: AttackConfig | str) -> Attack:
    """The attack object for a config (or a bare name with default settings)."""
    if isinstance(cfg, str):
        cfg = attack_config(cfg)
    return IMAGE_ATTACKS.get(cfg.name)(cfg)


def poison_full(data: Any, cfg: AttackConfig) -> PoisonResult:
    """Poison a training set; returns the set, the backdoor indices and the noise/negative indices."""
    return build_attack(cfg).poison(data)


def poison(data: Any, cfg: AttackConfig) -> tuple[Any, Any]:
    """``(poisoned set, sorted indices of the round(rate * N) backdoor samples)``, deterministic from ``cfg.seed``."""
    r = poison_full(data, cfg)
    return r.data, r.poisoned


def triggered_test_set(test: Any, cfg: AttackConfig) -> Any:
    """Non-target test images with the trigger, true labels kept (ASR: predicted == target; RA: == label)."""
    return build_attack(cfg).triggered_test_set(test)
