"""Item 3: ULRL against FT, FP and NAD, wall time per phase at equal epochs and clean data; every defense's cost
relative to FT.

Every defense runs through the library's own entry point (``run_ulrl``, ``run_ft``, ``run_fp``,
``run_nad``) on the same model and the same clean subset (an ``ImageData``, so the library's
batched augmentation runs as in real use). All training phases get ``E`` epochs; ULRL's
unlearning is forced to run its ``E`` epochs (``unlearn_stop_acc=0``) so the per-epoch time is
measured; NAD's teacher gets ``E // 2`` epochs (the paper's 10 : 20). No test-set evaluation is
timed. The paper budget (FT 20 epochs; ULRL k unlearning + 20 relearning epochs) is projected
from the measured per-epoch times.

``as_run`` times the defenses as a user runs them, on the shipped backdoored tiny-world model
(BadNets, seed 0) and its 500-image clean subset: ULRL with its stopping rule (paper recipe and
``kept``) against FT with as many epochs as ULRL relearns, interleaved, medians over repeats.

``defense_costs`` runs every registered defense (CLASSIFY_DEFENSES) at its own tiny-world budget on
the same model and clean subset, interleaved with FT, and projects each to its paper budget.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from common import ratio


def _model(name: str, seed: int) -> torch.nn.Module:
    from unbackdoor.classify.models import build_model
    from unbackdoor.classify.transforms import TINY_WORLD_MEAN, TINY_WORLD_STD

    torch.manual_seed(seed)
    if name == "tiny":
        return build_model("preact_resnet_tiny", 10, width=8, mean=TINY_WORLD_MEAN, std=TINY_WORLD_STD)
    return build_model("preactresnet18", 10, mean=TINY_WORLD_MEAN, std=TINY_WORLD_STD)


def clean_subset(n: int, seed: int = 0) -> Any:
    from unbackdoor.classify.tinyworld import make_tiny_world

    train, _ = make_tiny_world(seed, n_train=max(n, 10), n_test=10)
    return train


def run_defenses(model: torch.nn.Module, clean: Any, epochs: int, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """Seconds per phase of each defense (same model, data, epochs)."""
    from unbackdoor.classify.defenses.fp import FPConfig, run_fp
    from unbackdoor.classify.defenses.ft import FTConfig, run_ft
    from unbackdoor.classify.defenses.nad import NADConfig, run_nad
    from unbackdoor.classify.defenses.ulrl import ULRLConfig, run_ulrl

    e = epochs
    cfgs = {
        "ulrl": (run_ulrl, ULRLConfig(batch_size=batch_size, unlearn_max_epochs=e, unlearn_stop_acc=0.0,
                                      relearn_epochs=e, min_clean_per_class=1)),
        "ft": (run_ft, FTConfig(epochs=e, batch_size=batch_size, min_clean_per_class=1)),
        "fp": (run_fp, FPConfig(epochs=e, batch_size=batch_size, min_clean_per_class=1)),
        "nad": (run_nad, NADConfig(teacher_epochs=max(1, e // 2), epochs=e, batch_size=batch_size,
                                   min_clean_per_class=1)),
    }
    out: dict[str, Any] = {}
    for name, (fn, cfg) in cfgs.items():
        t0 = time.perf_counter()
        _, report = fn(model, clean, cfg, None, num_classes=10, seed=seed)
        total = time.perf_counter() - t0
        phases = {k: round(float(v), 4) for k, v in report.timings.items()}
        out[name] = {"total_s": round(total, 4), "phases_s": phases}
    u, f = out["ulrl"]["phases_s"], out["ft"]["phases_s"]
    per_epoch = {"ulrl_unlearn": u.get("unlearn", float("nan")) / e, "ulrl_relearn": u.get("relearn", float("nan")) / e,
                 "ft": f.get("train", float("nan")) / e}
    out["per_epoch_s"] = {k: round(v, 4) for k, v in per_epoch.items()}
    out["ulrl_over_ft_total"] = round(ratio(out["ulrl"]["total_s"], out["ft"]["total_s"]), 3)
    sel = u.get("select", 0.0)
    proj = {}
    for k in (1, 3, 5, 20):  # unlearning epochs before accuracy <= 0.2 (paper: early stop, at most 20)
        ulrl = k * per_epoch["ulrl_unlearn"] + sel + 20 * per_epoch["ulrl_relearn"]
        proj[f"unlearn_{k}_epochs"] = round(ratio(ulrl, 20 * per_epoch["ft"]), 3)
    out["projected_ulrl_over_ft_paper_budget"] = proj
    return out


def as_run(epochs: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """ULRL (stopping rule on) vs FT on the shipped backdoored model, ``epochs`` relearning / FT epochs."""
    import statistics

    from unbackdoor.classify.defenses.ft import FTConfig, run_ft
    from unbackdoor.classify.data import stratified_subset
    from unbackdoor.classify.testbed import TINY, tiny_backdoored, tiny_world
    from unbackdoor.classify.defenses.ulrl import ULRLConfig, run_ulrl

    train, test = tiny_world(0)
    clean = train.subset(stratified_subset(train, TINY.clean_count, 0))
    model, _ = tiny_backdoored("badnets", 0, data=(train, test))
    model.to(device)
    runs = {"ulrl": lambda: run_ulrl(model, clean, ULRLConfig(relearn_epochs=epochs), num_classes=10),
            "ulrl-kept": lambda: run_ulrl(model, clean, ULRLConfig.preset("kept", relearn_epochs=epochs), num_classes=10),
            "ft": lambda: run_ft(model, clean, FTConfig(epochs=epochs), None, num_classes=10)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    unlearn_epochs: list[int] = []
    for _ in range(repeats):  # interleaved, so a noisy neighbour slows every defense alike
        for name, fn in runs.items():
            t0 = time.perf_counter()
            _, report = fn()
            times[name].append(time.perf_counter() - t0)
            if name == "ulrl":
                unlearn_epochs.append(int(report.trace["epochs"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": "shipped tiny-world BadNets seed 0", "clean_samples": len(clean), "epochs": epochs,
            "repeats": repeats, "unlearn_epochs": unlearn_epochs, "median_s": {k: round(v, 3) for k, v in med.items()},
            "ulrl_over_ft": round(ratio(med["ulrl"], med["ft"]), 3),
            "ulrl_kept_over_ft": round(ratio(med["ulrl-kept"], med["ft"]), 3)}


PHASE_KNOBS: dict[str, dict[str, str]] = {
    "ft": {"train": "epochs"}, "fp": {"train": "epochs"}, "nad": {"teacher": "teacher_epochs", "train": "epochs"},
    "clp": {}, "anp": {"masks": "iterations"}, "i-bau": {"unlearn": "rounds"}, "rnp": {"recover": "recover_epochs"},
    "fst": {"train": "epochs"}, "sau": {"unlearn": "rounds"}, "ulrl": {"relearn": "relearn_epochs"},
}
"""Which phase of each defense grows with which config field: the projection to the paper budget scales
that phase's measured seconds by paper value / benchmark value. Other phases (pruning, ULRL's and RNP's
unlearning, which stop by their own rule) are taken as measured."""


def defense_costs(budget: str, repeats: int, device: torch.device, smoke: bool = False) -> dict[str, Any]:
    """Every registered defense at its own ``budget`` on one model and clean subset, interleaved, against FT.

    Seconds are medians over ``repeats``; ``over_ft`` divides by FT's median at the same budget;
    ``projected_paper_s`` scales the phases of :data:`PHASE_KNOBS` to the paper budget, and
    ``projected_over_ft`` divides by FT's projection (FT 20 epochs).
    """
    import statistics

    from unbackdoor.classify.data import stratified_subset
    from unbackdoor.classify.defenses import CLASSIFY_DEFENSES
    from unbackdoor.classify.testbed import TINY, tiny_backdoored, tiny_world

    if smoke:  # a random-init model and 40 images: checks the code paths only
        model, clean, what = _model("tiny", 0), clean_subset(40), "random-init tiny model, 40 images"
    else:
        train, test = tiny_world(0)
        clean = train.subset(stratified_subset(train, TINY.clean_count, 0))
        model, _ = tiny_backdoored("badnets", 0, data=(train, test))
        what = f"shipped tiny-world BadNets seed 0, {TINY.clean_count} clean images"
    model.to(device)
    runs: dict[str, Any] = {}
    for name, spec in CLASSIFY_DEFENSES.items():
        over = spec.budget(budget)
        if smoke:  # one unit of every growing phase: the code paths, in seconds
            over.update({knob: 1 for knob in PHASE_KNOBS.get(name, {}).values()})
            if "min_clean_per_class" in spec.config.__dataclass_fields__:
                over["min_clean_per_class"] = 1
        runs[name] = (spec, spec.make_config(overrides=over), spec.make_config())
    times: dict[str, list[float]] = {k: [] for k in runs}
    phases: dict[str, list[dict[str, float]]] = {k: [] for k in runs}
    ft_spec = CLASSIFY_DEFENSES.get("ft")
    ft_spec.run(model, clean, ft_spec.make_config(overrides={"epochs": 1, "min_clean_per_class": 1}), None,
                num_classes=10, seed=0)  # warm-up
    for _ in range(repeats):  # interleaved, so a noisy neighbour slows every defense alike
        for name, (spec, cfg, _paper) in runs.items():
            t0 = time.perf_counter()
            _, report = spec.run(model, clean, cfg, None, num_classes=10, seed=0)
            times[name].append(time.perf_counter() - t0)
            phases[name].append(dict(report.timings))
    out: dict[str, Any] = {"budget": budget, "repeats": repeats, "model": what, "defenses": {}}
    for name, (spec, cfg, paper) in runs.items():
        med = statistics.median(times[name])
        ph = {k: statistics.median(p.get(k, 0.0) for p in phases[name]) for k in phases[name][0]}
        projected = med
        for phase, knob in PHASE_KNOBS.get(name, {}).items():
            if phase in ph and getattr(cfg, knob):
                projected += ph[phase] * (getattr(paper, knob) / getattr(cfg, knob) - 1)
        knobs = set(PHASE_KNOBS.get(name, {}).values()) | {"min_clean_per_class"}
        differs = {k: [getattr(cfg, k), getattr(paper, k)] for k in spec.config.__dataclass_fields__
                   if k not in knobs and getattr(cfg, k) != getattr(paper, k)}
        out["defenses"][name] = {"median_s": round(med, 3), "phases_s": {k: round(v, 3) for k, v in ph.items()},
                                 "other_differences": differs,
                                 "settings": {k: getattr(cfg, k) for k in PHASE_KNOBS.get(name, {}).values()},
                                 "paper_settings": {k: getattr(paper, k) for k in PHASE_KNOBS.get(name, {}).values()},
                                 "projected_paper_s": round(projected, 3)}
    ft = out["defenses"]["ft"]
    for d in out["defenses"].values():
        d["over_ft"] = round(ratio(d["median_s"], ft["median_s"]), 3)
        d["projected_over_ft"] = round(ratio(d["projected_paper_s"], ft["projected_paper_s"]), 3)
    return out


def run(size: str, device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    s = {"smoke": dict(models={"tiny": dict(n=40, epochs=1, bs=16)}),
         "quick": dict(models={"tiny": dict(n=500, epochs=2, bs=128), "preactresnet18": dict(n=256, epochs=1, bs=128)}),
         "full": dict(models={"tiny": dict(n=500, epochs=4, bs=128), "preactresnet18": dict(n=256, epochs=1, bs=128)})}[size]
    out: dict[str, Any] = {"settings": s}
    for name, m in s["models"].items():
        clean = clean_subset(m["n"])
        model = _model(name, 0).to(device)
        from unbackdoor.classify.defenses.ft import FTConfig, run_ft

        run_ft(model, clean.subset(list(range(min(len(clean), m["bs"])))),
               FTConfig(epochs=1, batch_size=m["bs"], min_clean_per_class=0), None, num_classes=10)  # warm-up
        res = run_defenses(model, clean, m["epochs"], m["bs"])
        from unbackdoor.classify.models import num_parameters

        res.update({"clean_samples": m["n"], "epochs": m["epochs"], "batch_size": m["bs"],
                    "params": num_parameters(model)})
        out[name] = res
    ar = {"smoke": None, "quick": dict(epochs=5, repeats=1), "full": dict(epochs=20, repeats=3)}[size]
    if ar:
        out["as_run"] = as_run(ar["epochs"], ar["repeats"], device)
    rel = {"smoke": dict(budget="smoke", repeats=1), "quick": dict(budget="smoke", repeats=1),
           "full": dict(budget="demo", repeats=2)}[size]
    out["relative_to_ft"] = defense_costs(rel["budget"], rel["repeats"], device, smoke=size == "smoke")
    return out
