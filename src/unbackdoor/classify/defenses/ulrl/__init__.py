"""ULRL (UnLearn and ReLearn): unlearn on clean data, find the head rows that moved most, relearn without them."""
from __future__ import annotations

from ....core.defense import DefenseSpec, Needs
from .config import PRESETS, ULRLConfig
from .selection import Selection, neuron_scores, select_suspicious
from .ulrl import ULRLReport, cosine_penalty, reinit_rows, relearn, run_ulrl, unlearn

__all__ = ["PRESETS", "SPEC", "Selection", "ULRLConfig", "ULRLReport", "cosine_penalty", "neuron_scores",
           "reinit_rows", "relearn", "run_ulrl", "select_suspicious", "unlearn"]

SPEC = DefenseSpec(
    name="ulrl", kind="classify", config=ULRLConfig, run=run_ulrl, needs=Needs(trains=True),
    summary="unlearn on clean data, re-initialise the head rows that moved most, relearn with a cosine penalty",
    paper="Towards Unified Robustness Against Both Backdoor and Adversarial Attacks / ULRL (UnLearn and ReLearn)",
    presets={name: {"variant": name, **values} for name, values in PRESETS.items()},
    budgets={"demo": {"unlearn_max_epochs": 5, "relearn_epochs": 10},
             "smoke": {"unlearn_max_epochs": 3, "relearn_epochs": 2}},
)
