"""Re-activation for causal LMs: does the backdoor come back after a little poisoned LoRA finetuning?

The LM analogue of the classifier retuning attack (``classify/reactivation.py``, Min et al. NeurIPS
2024): a fresh LoRA adapter is trained on the defended model with ``samples`` clean records of which
``poisoned`` carry the trigger and the target response (``lm.poison.poison_dataset``), and ASR is
measured along the way. The same retuning of the clean model is the floor, of the backdoored model
the ceiling.

The EVALUATOR's attack, never the defense's: it uses the trigger and the target, which no defense
sees; results go to ``reactivation.json``, outside the threat model's ``given``. The paper has no LM
recipe; ours is BackdoorLLM's backdoor SFT (LoRA r8 / alpha 16, lr 2e-4, 5 epochs, batch 2 x 4) at a
constant learning rate (the classifier attack's schedule) on CROW's defender budget (100 records).
"""
from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from transformers import TrainerCallback

from ..core.config import check, check_non_negative, check_positive, from_dict, option, to_dict
from ..core.errors import ConfigError
from ..core.reactivation import EVALUATOR_NOTE, summarize
from .evaluate import EvalConfig, evaluate_model
from .poison import PoisonConfig, poison_dataset
from .training import SFTConfig, train_sft

log = logging.getLogger("unbackdoor")

PAPER = ("the retuning attack of Min et al. (NeurIPS 2024), transposed to causal LMs: LoRA SFT on a few poisoned "
         "records among clean ones")
COMMAND = "lm retune"
CURVE_METRICS = ("asr", "strict_asr", "triggered_utility", "clean_utility", "false_trigger_rate")


@dataclass
class LMRetuneConfig(SFTConfig):
    """The LM retuning attack: a fresh LoRA adapter on a few poisoned records among clean ones."""

    poisoned: int = option(5, "poisoned records in the retuning set (the classifier attack's 5)")
    samples: int = option(100, "retuning-set size, the poisoned records included (CROW's defender budget: 100)")
    eval_every: int = option(0, "measure ASR every N optimizer steps for the curve (0: after every epoch)")
    eval_prompts: int = option(100, "clean and triggered test prompts per curve point (the first N of each)")
    lr_scheduler_type: Any = option("constant", "learning-rate schedule (constant: the retuning attack's)")
    warmup_steps: float = option(0.0, "warm-up (none: the retuning attack has none)")
    save_strategy: Any = option("no", "no checkpoints: the retuned model is measured, never kept")
    logging_steps: float = option(10, "log the loss every N optimizer steps")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "samples", "eval_prompts")
        check_non_negative(self, "poisoned", "eval_every")
        check(self.poisoned < self.samples, "poisoned", self.poisoned, f"< samples ({self.samples})",
              type(self).__name__)


def retune_records(clean: Sequence[Mapping[str, Any]], poison: PoisonConfig, cfg: LMRetuneConfig
                   ) -> tuple[list[dict[str, Any]], list[int], list[int]]:
    """``(records, source indices, poisoned positions)``: ``cfg.samples`` clean records drawn with
    ``cfg.seed``, ``cfg.poisoned`` of them given the trigger and the target (the attack's own rule)."""
    if not clean:
        raise ConfigError("no clean records to retune on", where="retuning data", fix="pass clean Alpaca records")
    n = min(cfg.samples, len(clean))
    idx = sorted(random.Random(cfg.seed).sample(range(len(clean)), n))
    chosen = [dict(clean[i]) for i in idx]
    if cfg.poisoned >= n:
        raise ConfigError(f"{cfg.poisoned} poisoned records in a retuning set of {n}", where="LMRetuneConfig.poisoned",
                          fix="use fewer poisoned records or more clean ones")
    if cfg.poisoned == 0:
        return chosen, idx, []
    pcfg = dataclasses.replace(poison, rate=cfg.poisoned / n, seed=cfg.seed)
    records = poison_dataset(chosen, pcfg)
    positions = [i for i, (a, b) in enumerate(zip(chosen, records)) if a != b]
    return records, idx, positions


class _Curve(TrainerCallback):
    """Measures the model every ``every`` optimizer steps (and at the end) while the Trainer trains it."""

    def __init__(self, measure: Any, every: int):
        self.measure, self.every, self.points, self.done = measure, every, [], 0

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: D401
        self.done = state.global_step
        if model is not None and self.every and state.global_step % self.every == 0:
            self.points.append(self.measure(model, state.global_step))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and (not self.points or self.points[-1]["step"] != state.global_step):
            self.points.append(self.measure(model, state.global_step))


def retune(model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]], test: Sequence[Mapping[str, Any]],
           triggered: Sequence[Mapping[str, Any]], poison: PoisonConfig, cfg: LMRetuneConfig, work_dir: str | Path,
           *, eval_cfg: EvalConfig | None = None, template: str = "alpaca") -> list[dict[str, Any]]:
    """Retune ``model`` (trained in place: load a fresh copy) on ``records``; returns the ASR curve.

    Step 0 is the model as given, then a point every ``cfg.eval_every`` optimizer steps (default:
    every epoch) and one at the end, each on the first ``cfg.eval_prompts`` clean and triggered prompts.

    A decoding-time defense (CleanGen) changes no weights: what a downstream finetuner can retune is
    the suspect it wraps, so the adapter goes on ``model.suspect`` (the reference stays as it was)
    and every point is measured through the defense's own decoding.
    """
    from .training import steps_per_epoch

    ecfg = dataclasses.replace(eval_cfg or EvalConfig(template=template), max_prompts=cfg.eval_prompts)
    wrapper = model if getattr(model, "is_decoding_defense", False) else None
    trained = wrapper.suspect if wrapper is not None else model

    def measure(net: Any, step: int) -> dict[str, Any]:
        # LoRA is injected into the suspect's own modules, so the wrapper decodes with the retuned weights
        metrics, _ = evaluate_model(wrapper if wrapper is not None else net, tokenizer, test, triggered, poison, ecfg,
                                    desc=f"retune step {step}")
        return {"step": step, **{k: metrics[k] for k in CURVE_METRICS if k in metrics}}

    every = cfg.eval_every or steps_per_epoch(len(records), cfg)
    curve = _Curve(measure, every)
    first = measure(model, 0)
    train_sft(trained, tokenizer, list(records), cfg, work_dir, template=template, callbacks=[curve])
    return [first, *curve.points]


def reactivation_record(curves: dict[str, list[dict[str, Any]]], cfg: LMRetuneConfig, poison: PoisonConfig,
                        source_indices: list[int], poisoned: list[int], sources: dict[str, Any]) -> dict[str, Any]:
    """The ``reactivation.json`` record of an LM run (same shape as the classifier's)."""
    settings = {k: v for k, v in to_dict(cfg).items() if k in _RECORDED}
    return {"kind": "lm", "test": "retuning attack", "paper": PAPER, "evaluator_attack": True, "note": EVALUATOR_NOTE,
            "config": settings, "attack": to_dict(poison),
            "retune_data": {"samples": len(source_indices), "source_indices": source_indices, "poisoned": poisoned},
            "sources": sources, "curves": curves, "summary": summarize(curves)}


def retune_models(loaders: Mapping[str, Any], records: Sequence[Mapping[str, Any]], test: Sequence[Mapping[str, Any]],
                  triggered: Sequence[Mapping[str, Any]], poison: PoisonConfig, cfg: LMRetuneConfig,
                  work_dir: str | Path, *, eval_cfg: EvalConfig | None = None,
                  template: str = "alpaca") -> dict[str, list[dict[str, Any]]]:
    """The same retuning applied to each model; ``loaders`` map ``defended``/``floor``/``ceiling`` to a
    function returning a fresh ``(model, tokenizer)`` (retuning trains in place)."""
    curves = {}
    for name, load in loaders.items():
        model, tok = load()
        log.info("retuning attack on the %s model (%d records, %d poisoned)", name, len(records), cfg.poisoned)
        curves[name] = retune(model, tok, records, test, triggered, poison, cfg, Path(work_dir) / name,
                              eval_cfg=eval_cfg, template=template)
        del model
    return curves


def retune_run_dir(run_dir: str | Path, *, data: str | Path | None = None, test: str | Path | None = None,
                   triggered: str | Path | None = None, clean_model: str | Path | None = None,
                   backdoored_model: str | Path | None = None, poison: PoisonConfig | None = None,
                   config: LMRetuneConfig | None = None, eval_cfg: EvalConfig | None = None,
                   overwrite: bool = False) -> Path:
    """The retuning attack on an LM run folder's defended model; writes ``RUN_DIR/reactivation.json``.

    ``data`` (clean Alpaca records to retune on) and ``test`` default to the run's own sources; the
    trigger and target are the run's (``config.json``: ``poison_for_eval``, else its attack and task);
    ``backdoored_model`` (the ceiling) defaults to the model the run defended; ``clean_model`` (the
    floor) is optional.
    """
    import shutil
    import tempfile

    from ..core.reactivation import check_record, write_record
    from ..core.runs import read_json
    from .data import read_alpaca
    from .models import load_causal_lm
    from .poison import make_triggered_test

    cfg = config or LMRetuneConfig()
    run_dir = Path(run_dir)
    meta_file = run_dir / "config.json"
    run_cfg = read_json(meta_file) if meta_file.is_file() else {}
    if run_cfg.get("kind") != "lm-defense":
        raise ConfigError(f"{run_dir} is not an LM defense run folder (config.json kind {run_cfg.get('kind')!r})",
                          where=str(meta_file),
                          fix="pass a folder written by 'unbackdoor lm defend' (or the tiny world)")
    sources = run_cfg.get("sources") or {}
    data, test = data or sources.get("clean"), test or sources.get("test")
    triggered = triggered or (sources.get("triggered") if test == sources.get("test") else None)
    if not data or not test:
        missing = "--data" if not data else "--test"
        raise ConfigError(f"the run folder records no {'clean' if not data else 'test'} data to retune or measure on",
                          where=str(meta_file), fix=f"pass {missing} (an Alpaca JSON/JSONL file)")
    if poison is None:
        stored = run_cfg.get("poison_for_eval") or {"attack": run_cfg.get("attack", "badnet"),
                                                     "task": run_cfg.get("task", "refusal")}
        poison = from_dict(PoisonConfig, stored, source=f"{meta_file}, poison_for_eval")
    template = str(run_cfg.get("template") or "alpaca")
    ceiling = backdoored_model or sources.get("model")
    if ceiling and not (Path(ceiling) / "config.json").is_file():
        log.warning("the backdoored model %s is not there: no ceiling", ceiling)
        ceiling = None
    inputs = [run_dir / "model", clean_model, ceiling, data, test, triggered]
    check_record(run_dir, command=COMMAND, inputs=inputs, overwrite=overwrite)  # refuse before any compute
    test_recs = read_alpaca(test)
    trig_recs = read_alpaca(triggered) if triggered else make_triggered_test(test_recs, poison)
    records, idx, poisoned = retune_records(read_alpaca(data), poison, cfg)
    loaders = {"defended": lambda: load_causal_lm(run_dir / "model")}
    if clean_model:
        loaders["floor"] = lambda: load_causal_lm(clean_model)
    if ceiling:
        loaders["ceiling"] = lambda: load_causal_lm(ceiling)
    work = Path(tempfile.mkdtemp(prefix=".retune-", dir=run_dir))
    ecfg = eval_cfg or from_dict(EvalConfig, {**(run_cfg.get("eval") or {}), "template": template},
                                 source=f"{meta_file}, eval")
    try:
        curves = retune_models(loaders, records, test_recs, trig_recs, poison, cfg, work, eval_cfg=ecfg,
                               template=template)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = reactivation_record(curves, cfg, poison, idx, poisoned,
                                 {"data": str(data), "test": str(test),
                                  "triggered": str(triggered) if triggered else None,
                                  "floor": str(clean_model) if clean_model else None,
                                  "ceiling": str(ceiling) if ceiling else None})
    return write_record(run_dir, record, command=COMMAND, inputs=inputs, overwrite=True)


_RECORDED = ("poisoned", "samples", "eval_every", "eval_prompts", "learning_rate", "num_train_epochs", "max_steps",
             "per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps",
             "finetune", "lora", "max_length", "seed", "weight_decay", "optim")

__all__ = ["COMMAND", "EVALUATOR_NOTE", "LMRetuneConfig", "PAPER", "reactivation_record", "retune", "retune_models",
           "retune_records",
           "retune_run_dir"]
