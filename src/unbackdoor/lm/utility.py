"""Utility metrics by name, for ``--utility``: how well a model still does its job.

Two kinds:

- **per-example** metrics compare the toolkit's own generations with their references
  (``exact_match``: a rate, right for the tiny world's one-word answers; ``rouge_l``: a mean
  F-score, right for free-form answers). They give ``clean_utility`` and ``triggered_utility``.
- **benchmarks** run the model on an external task: ``lm-eval:<task>`` runs EleutherAI's
  lm-evaluation-harness when the user has it installed (off by default). It never downloads:
  the hub is switched offline for the call, and a task whose data is not already on this
  machine (the HF datasets cache, or a local file named by a task YAML in ``include_path``)
  is a clear error. Its numbers are extra clean-utility metrics named ``lm_eval:<task>:<metric>``.

    metric = get_utility("rouge_l"); metric.score(prediction, reference)
    run_benchmark("lm-eval:arc_easy", model, tokenizer, limit=100)
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
from typing import Any, Callable, Iterator, Sequence

from ..core.errors import ConfigError, DataError
from .evaluate import exact_match, rouge_l

LM_EVAL_PREFIX = "lm-eval:"


@dataclasses.dataclass(frozen=True)
class UtilityMetric:
    """A per-example utility: ``score(prediction, reference)`` in [0, 1]; ``is_rate``: a fraction of inputs."""

    name: str
    help: str
    fn: Callable[[str, str], float]
    is_rate: bool

    def score(self, prediction: str, reference: str) -> float:
        return float(self.fn(prediction, reference))

    def mean(self, predictions: Sequence[str], references: Sequence[str]) -> float:
        """The mean score over pairs (NaN for none)."""
        if len(predictions) != len(references):
            raise DataError(f"{len(predictions)} predictions for {len(references)} references",
                            where=f"utility '{self.name}'", fix="pass one prediction per reference")
        vals = [self.score(p, r) for p, r in zip(predictions, references)]
        return sum(vals) / len(vals) if vals else math.nan


UTILITY_METRICS: dict[str, UtilityMetric] = {}


def register_utility(metric: UtilityMetric) -> UtilityMetric:
    """Add a per-example utility under its name (``--utility NAME``)."""
    if metric.name in UTILITY_METRICS or metric.name.startswith(LM_EVAL_PREFIX):
        raise ConfigError(f"a utility metric named '{metric.name}' exists", where="register_utility",
                          fix="pick another name")
    UTILITY_METRICS[metric.name] = metric
    return metric


register_utility(UtilityMetric("exact_match", "same words and punctuation as the reference, ignoring case and "
                                              "spacing (a rate)", lambda p, r: float(exact_match(p, r)), True))
register_utility(UtilityMetric("rouge_l", "ROUGE-L F1 against the reference (a mean score, for free-form answers)",
                               rouge_l, False))


def available_utilities() -> list[str]:
    """Names ``--utility`` accepts (lm-eval tasks as ``lm-eval:<task>``)."""
    return [*UTILITY_METRICS, LM_EVAL_PREFIX + "<task>"]


def is_benchmark(name: str) -> bool:
    return name.startswith(LM_EVAL_PREFIX)


def get_utility(name: str) -> UtilityMetric:
    """The per-example utility called ``name``; a clear error for unknown names and for benchmarks."""
    if name in UTILITY_METRICS:
        return UTILITY_METRICS[name]
    if is_benchmark(name):
        raise ConfigError(f"'{name}' is a benchmark, not a per-example metric", where="utility",
                          fix="run it with run_benchmark(name, model, tokenizer); clean_utility and "
                              "triggered_utility use exact_match or rouge_l")
    import difflib

    close = difflib.get_close_matches(name, list(UTILITY_METRICS), n=1)
    raise ConfigError(f"unknown utility metric '{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""),
                      where="utility", fix=f"use one of: {', '.join(available_utilities())}")


# ---- lm-evaluation-harness -------------------------------------------------------------------------

def lm_eval_installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _require_lm_eval() -> Any:
    if not lm_eval_installed():
        raise ConfigError("utility 'lm-eval:<task>' needs EleutherAI's lm-evaluation-harness, which is not installed",
                          where="utility", fix="pip install lm-eval, and put the task's data on this machine first "
                                               "(unbackdoor never downloads it); or use exact_match / rouge_l")
    import lm_eval

    return lm_eval


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """HF hub and datasets offline for the duration: a benchmark reads local data or fails, never downloads."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_OFFLINE_SIGNS = ("offline", "connection", "couldn't reach", "could not reach", "not found on the hub",
                  "doesn't exist on the hub", "no such file", "cannot find", "couldn't find", "is not cached",
                  "outgoing traffic has been disabled", "datasetnotfound", "localentrynotfound")


def task_names(spec: str) -> list[str]:
    """``"lm-eval:arc_easy,hellaswag"`` -> ``["arc_easy", "hellaswag"]``."""
    if not is_benchmark(spec):
        raise ConfigError(f"'{spec}' is not an lm-eval utility", where="utility", fix="write lm-eval:<task>[,<task>]")
    tasks = [t.strip() for t in spec[len(LM_EVAL_PREFIX):].split(",") if t.strip()]
    if not tasks:
        raise ConfigError(f"'{spec}' names no task", where="utility", fix="write lm-eval:<task>, e.g. lm-eval:arc_easy")
    return tasks


def flatten_results(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``results`` -> ``{"lm_eval:<task>:<metric>": value}`` (``acc,none`` -> ``acc``; no stderr)."""
    out: dict[str, float] = {}
    for task, metrics in (results or {}).items():
        if not isinstance(metrics, dict):
            continue
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "stderr" in key:
                continue
            name, _, filt = key.partition(",")
            out[f"lm_eval:{task}:{name}" + (f":{filt}" if filt and filt != "none" else "")] = float(value)
    return out


def run_benchmark(spec: str, model: Any, tokenizer: Any, *, batch_size: int = 8, limit: int | None = None,
                  include_path: str | None = None, num_fewshot: int | None = None) -> dict[str, float]:
    """Run ``lm-eval:<task>[,<task>...]`` on a loaded model, offline; the flattened metrics.

    ``include_path``: a folder of task YAMLs (e.g. one whose ``dataset_path: json`` reads a local
    file). ``limit``: at most this many examples per task.
    """
    tasks = task_names(spec)
    lm_eval = _require_lm_eval()
    with _offline():
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=include_path) if include_path else TaskManager()
        known = set(getattr(manager, "all_tasks", []) or [])
        missing = [t for t in tasks if known and t not in known]
        if missing:
            raise ConfigError(f"lm-eval has no task named {', '.join(missing)}", where="utility",
                              fix="see 'lm-eval ls tasks', or pass include_path= a folder with the task's YAML")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, log_samples=False)
        except Exception as e:  # the harness raises many types; data that is not here is the common one
            text = f"{type(e).__name__}: {e}".lower()
            if any(sign in text for sign in _OFFLINE_SIGNS):
                raise DataError(f"the data of lm-eval task(s) {', '.join(tasks)} is not available offline "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
                                where=f"utility {spec}",
                                fix="put the dataset in the HF datasets cache on this machine (download it once "
                                    "where a network is allowed), or write a task YAML whose dataset_path reads a "
                                    "local file and pass its folder as include_path") from None
            raise
    return flatten_results((out or {}).get("results", {}))
