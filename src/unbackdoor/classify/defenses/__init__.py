"""Classifier defenses, by name: one folder each, registered in one line below (the report lists them in this order: baselines first).

A defense folder exposes ``SPEC`` (a :class:`unbackdoor.core.defense.DefenseSpec`) whose ``run``
has the signature::

    run(model, clean, cfg, run_dir=None, *, num_classes=None, seed=0, prepare=None) -> (model, report)

``model`` is never modified (defenses work on a copy); ``clean`` is an ``ImageData`` or an
``(inputs, labels)`` pair (inputs a tensor or a dict of tensors, e.g. tokenised text); ``run_dir``
(a ``RunDir`` or None) receives the method's artifacts and phase timings; ``report`` has
``to_json()``. Helpers every defense may use live in ``common.py``. The CLI's ``--method``
choices and flags, the API, the tiny world's budgets and the report read this registry.
"""
from __future__ import annotations

from ...core.defense import DefenseSpec
from ...core.registry import Registry

CLASSIFY_DEFENSES: Registry[DefenseSpec] = Registry("classifier defense")
CLASSIFY_DEFENSES.add("ft", "unbackdoor.classify.defenses.ft:SPEC")
CLASSIFY_DEFENSES.add("fp", "unbackdoor.classify.defenses.fp:SPEC")
CLASSIFY_DEFENSES.add("nad", "unbackdoor.classify.defenses.nad:SPEC")
CLASSIFY_DEFENSES.add("clp", "unbackdoor.classify.defenses.clp:SPEC")
CLASSIFY_DEFENSES.add("anp", "unbackdoor.classify.defenses.anp:SPEC")
CLASSIFY_DEFENSES.add("i-bau", "unbackdoor.classify.defenses.ibau:SPEC", aliases=("ibau",))
CLASSIFY_DEFENSES.add("rnp", "unbackdoor.classify.defenses.rnp:SPEC")
CLASSIFY_DEFENSES.add("fst", "unbackdoor.classify.defenses.fst:SPEC")
CLASSIFY_DEFENSES.add("sau", "unbackdoor.classify.defenses.sau:SPEC")
CLASSIFY_DEFENSES.add("ulrl", "unbackdoor.classify.defenses.ulrl:SPEC")

__all__ = ["CLASSIFY_DEFENSES"]
