"""Re-activation: does a purified classifier's backdoor come back after a little poisoned finetuning?

The retuning attack (RA) of Min et al., "Uncovering, Explaining, and Mitigating the Superficial
Safety of Backdoor Defense" (NeurIPS 2024; code: AISafety-HKUST/stable_backdoor_purification,
``fine_tune/ft_poison.py``): finetune the purified model on a small set in which ``poisoned`` of the
samples carry the trigger (5 of 2% of the training set), then measure ASR again. A defense that only
hid the backdoor lets it come back within a few steps; one that removed it behaves like a clean model
given the same retuning (the floor). The backdoored model retuned the same way is the ceiling.

This is the EVALUATOR's attack, never the defense's: it uses poisoned data and the attack's trigger,
which no defense sees. Its results go to ``reactivation.json`` beside the run's metrics, outside the
threat model's ``given``. The procedure does not know the defense: any model, any defense.

Defaults are the paper's released RA: SGD lr 0.01, momentum 0.9, no weight decay, constant lr,
batch 128, 5 epochs, 5 poisoned samples in a set of 2% of CIFAR-10 (1000 images). Departures:
poisoned samples follow the attack's own poisoning rule (clean-label attacks keep their labels;
the release relabels its stored poisoned images to the target), and no augmentation by default
(the release augments the clean part only).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import check, check_non_negative, check_positive, option
from ..core.errors import ConfigError
from ..core.reactivation import EVALUATOR_NOTE, PAPER, check_record, summarize, write_record
from .attacks import AttackConfig, build_attack
from .data import ImageData, stratified_subset
from .evaluate import evaluate_attack
from .loop import TrainConfig, fit

log = logging.getLogger("unbackdoor")

COMMAND = "classify retune"


@dataclass
class RetuneConfig:
    """The retuning attack's settings; defaults are the paper's released RA for CIFAR-10."""

    poisoned: int = option(5, "backdoor samples in the retuning set (paper: 5)")
    samples: int = option(1000, "retuning-set size, the poisoned samples included (paper: 1000 CIFAR-10 images, "
                                "1 in 50 of its training set); capped at the data given")
    epochs: int = option(5, "passes over the retuning set (paper: 5)")
    max_steps: int | None = option(None, "stop after this many optimizer steps (None: the epochs decide)")
    lr: float = option(0.01, "SGD learning rate, constant (paper: 0.01)")
    momentum: float = option(0.9, "SGD momentum (paper: 0.9)")
    weight_decay: float = option(0.0, "weight decay (paper: none)")
    batch_size: int = option(128, "minibatch size (paper: 128)")
    augment: bool = option(False, "random crop + flip on the retuning batches (paper: the clean part only; off: "
                                  "a flip moves a corner patch)")
    eval_every: int = option(0, "measure ASR and ACC every N optimizer steps for the curve (0: after every epoch)")
    seed: int = option(0, "seed of the retuning set and of the data order")

    def __post_init__(self) -> None:
        check_positive(self, "samples", "epochs", "lr", "batch_size")
        check_non_negative(self, "poisoned", "momentum", "weight_decay", "eval_every", "seed")
        check(self.max_steps is None or self.max_steps > 0, "max_steps", self.max_steps, "> 0 or None",
              type(self).__name__)
        check(self.momentum < 1, "momentum", self.momentum, "< 1", type(self).__name__)


@dataclass
class RetuneSet:
    """The retuning data and which of its samples were poisoned (positions in ``data``)."""

    data: ImageData
    source_indices: list[int]
    poisoned: list[int]
    noise: list[int]

    def to_json(self) -> dict[str, Any]:
        return {"samples": len(self.data), "source_indices": self.source_indices, "poisoned": self.poisoned,
                "noise": self.noise}


def retune_set(data: ImageData, attack: AttackConfig, cfg: RetuneConfig) -> RetuneSet:
    """``cfg.samples`` class-stratified samples of ``data`` of which ``cfg.poisoned`` carry the trigger.

    The poisoned ones are chosen and triggered by the attack's own rule (its seed keeps its trigger
    pattern); WaNet/BPP-style label-preserving noise samples come with them, as in the attacker's data.
    """
    n = min(cfg.samples, len(data))
    idx = stratified_subset(data, n, cfg.seed) if n < len(data) else torch.arange(len(data))
    subset = data.subset(idx, name=f"{data.name}-retune")
    if cfg.poisoned == 0:
        return RetuneSet(subset, idx.tolist(), [], [])
    if cfg.poisoned >= len(subset):
        raise ConfigError(f"{cfg.poisoned} poisoned samples in a retuning set of {len(subset)}",
                          where="RetuneConfig.poisoned", fix="use fewer poisoned samples or more samples")
    rate = cfg.poisoned / len(subset)
    res = build_attack(dataclasses.replace(attack, rate=rate)).poison(subset)
    return RetuneSet(res.data, idx.tolist(), res.poisoned.tolist(), res.noise.tolist())


def _point(step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"step": step, **{k: metrics[k] for k in ("asr", "acc", "ra", "target_recall") if k in metrics}}


def retune(model: nn.Module, data: ImageData, test: ImageData, attack: AttackConfig, cfg: RetuneConfig, *,
           triggered: ImageData | None = None, desc: str = "retune") -> list[dict[str, Any]]:
    """Retune a COPY of ``model`` on ``data``; the curve ``[{"step", "asr", "acc", "ra", "target_recall"}]``.

    Step 0 is the model as given; then a point every ``cfg.eval_every`` optimizer steps (or after
    each epoch) and one at the last step.
    """
    net = copy.deepcopy(model)
    trig = triggered if triggered is not None else build_attack(attack).triggered_test_set(test)
    curve = [_point(0, evaluate_attack(net, test, attack, trig))]
    tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay, scheduler="constant", augment=cfg.augment, flip=cfg.augment,
                       seed=cfg.seed)
    steps_per_epoch = -(-len(data) // cfg.batch_size)
    every = cfg.eval_every or steps_per_epoch
    last = {"step": 0}

    def on_batch(info: Any) -> bool:
        last["step"] = info.global_step
        stop = cfg.max_steps is not None and info.global_step >= cfg.max_steps
        if info.global_step % every == 0 or stop:
            curve.append(_point(info.global_step, evaluate_attack(net, test, attack, trig)))
        return stop

    fit(net, data, tcfg, on_batch=on_batch, desc=desc)
    if curve[-1]["step"] != last["step"]:
        curve.append(_point(last["step"], evaluate_attack(net, test, attack, trig)))
    return curve


def reactivation_record(curves: dict[str, list[dict[str, Any]]], cfg: RetuneConfig, attack: AttackConfig,
                        rset: RetuneSet, sources: dict[str, Any]) -> dict[str, Any]:
    """The ``reactivation.json`` record: settings, the evaluator's data, every curve, the summary."""
    return {"kind": "classify", "test": "retuning attack", "paper": PAPER, "evaluator_attack": True,
            "note": EVALUATOR_NOTE, "config": dataclasses.asdict(cfg), "attack": dataclasses.asdict(attack),
            "retune_data": rset.to_json(), "sources": sources, "curves": curves, "summary": summarize(curves)}


def retune_models(models: dict[str, nn.Module], data: ImageData, test: ImageData, attack: AttackConfig,
                  cfg: RetuneConfig) -> tuple[dict[str, list[dict[str, Any]]], RetuneSet]:
    """The same retuning (one retuning set) applied to each model: ``{"defended", "floor", "ceiling"}`` curves."""
    rset = retune_set(data, attack, cfg)
    trig = build_attack(attack).triggered_test_set(test)
    curves = {}
    for name, model in models.items():
        log.info("retuning attack on the %s model (%d samples, %d poisoned)", name, len(rset.data), len(rset.poisoned))
        curves[name] = retune(model, rset.data, test, attack, cfg, triggered=trig, desc=f"retune {name}")
    return curves, rset


def retune_run_dir(run_dir: str | Path, *, data: str | Path | None = None, test: str | Path | None = None,
                   clean_model: str | Path | None = None, backdoored_model: str | Path | None = None,
                   attack: AttackConfig | None = None, config: RetuneConfig | None = None,
                   overwrite: bool = False) -> Path:
    """The retuning attack on a classifier run folder's defended model; writes ``RUN_DIR/reactivation.json``.

    ``data`` (where the retuning samples come from) and ``test`` default to the run's own clean and
    test sources; ``backdoored_model`` (the ceiling) to the model the run defended; ``clean_model``
    (the floor) is optional. The attack is the one the model records, unless given.
    """
    from ..core.runs import read_json
    from .flow import attack_of
    from .model_io import load_model
    from .sources import load_data

    cfg = config or RetuneConfig()
    run_dir = Path(run_dir)
    meta_file = run_dir / "config.json"
    run_cfg = read_json(meta_file) if meta_file.is_file() else {}
    if run_cfg.get("kind") != "classify-defense":
        raise ConfigError(f"{run_dir} is not a classifier defense run folder (config.json kind "
                          f"{run_cfg.get('kind')!r})", where=str(meta_file),
                          fix="pass a folder written by 'unbackdoor classify defend' (or the tiny world)")
    sources = run_cfg.get("sources") or {}
    data = data or sources.get("clean")
    test = test or sources.get("test")
    if not data or not test:
        missing = "--data" if not data else "--test"
        raise ConfigError(f"the run folder records no {'clean' if not data else 'test'} data to retune or measure on",
                          where=str(meta_file), fix=f"pass {missing} (e.g. tinyworld:SEED)")
    ceiling = backdoored_model or sources.get("model")
    if ceiling and not (Path(ceiling) / "model.json").is_file():
        log.warning("the backdoored model %s is not there: no ceiling", ceiling)
        ceiling = None
    defended, meta = load_model(run_dir / "model")
    attack = attack or attack_of(meta)
    models = {"defended": defended}
    if clean_model:
        models["floor"] = load_model(clean_model)[0]
    if ceiling:
        models["ceiling"] = load_model(ceiling)[0]
    from .flow import _paths

    inputs = [run_dir / "model", clean_model, ceiling, *_paths(data, test)]
    check_record(run_dir, command=COMMAND, inputs=inputs, overwrite=overwrite)  # refuse before any compute
    curves, rset = retune_models(models, load_data(data, train=True), load_data(test, train=False), attack, cfg)
    record = reactivation_record(curves, cfg, attack, rset, {"data": str(data), "test": str(test),
                                                             "floor": str(clean_model) if clean_model else None,
                                                             "ceiling": str(ceiling) if ceiling else None})
    return write_record(run_dir, record, command=COMMAND, inputs=inputs, overwrite=True)


__all__ = ["COMMAND", "EVALUATOR_NOTE", "PAPER", "RetuneConfig", "RetuneSet", "reactivation_record", "retune",
           "retune_models", "retune_run_dir", "retune_set"]
