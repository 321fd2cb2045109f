#!/usr/bin/env python
"""The classifier zoo: clean and backdoored tiny-world models, to measure the scanners (docs/results-scan-reactivation.md).

Every model is trained once and cached (``--cache``, default ``runs/zoo/classify/models``); a killed run
resumes at the next missing model (each is written whole by ``atomic_dir``). The list below is ordered
so the most informative models come first: stopping early still leaves a usable zoo.

    python scripts/zoo_classify.py train                 # every model (~3-8 CPU minutes each under load)
    python scripts/zoo_classify.py train --only clean-s1 badnets-r0.01-s0
    python scripts/zoo_classify.py list
    python scripts/zoo_classify.py scan                  # the ULRL scanner on every trained model (cached)
    python scripts/zoo_classify.py summarize             # TPR/FPR/AUROC, ROC plot, the shipped null
    python scripts/zoo_classify.py retune --seeds 0 1    # every defense, then the retuning attack (re-activation)
    python scripts/zoo_classify.py retune-summary

Results (raw, per model / per run) go to ``results/scan/`` and ``results/reactivation/``; run folders of the
re-activation table to ``runs/zoo/classify/defended/<attack>/<defense>/seed<s>/`` (with ``reactivation.json``).

Settings: the tiny world of ``unbackdoor.classify.testbed.TINY`` (5000 train / 2000 test images, seed =
world seed = model seed, preact_resnet_tiny width 8, SGD lr 0.05 cosine, no flips), with each entry's
attack, poisoning rate and epochs. A clean model is the same training with nothing poisoned (rate 0).
The shipped seed-0 checkpoints are the zoo's ``clean-s0`` (``assets/classify/tinyworld-clean-seed0``, this
script's output), ``badnets-s0`` and ``blended-s0``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from unbackdoor.classify.attacks import attack_config  # noqa: E402
from unbackdoor.classify.testbed import TINY, tiny_asset_dir, tiny_world  # noqa: E402
from unbackdoor.core.runs import atomic_dir, atomic_write_json  # noqa: E402


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: what was planted (nothing for clean models), how hard, and the world seed."""

    attack: str | None
    seed: int
    rate: float = 0.1
    epochs: int = TINY.epochs

    @property
    def name(self) -> str:
        kind = self.attack or "clean"
        parts = [kind] + ([f"r{self.rate:g}"] if self.attack and self.rate != 0.1 else []) \
            + ([f"e{self.epochs}"] if self.epochs != TINY.epochs else []) + [f"s{self.seed}"]
        return "-".join(parts)

    @property
    def backdoored(self) -> bool:
        return self.attack is not None

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "rate": self.rate if self.attack else 0.0, "name": self.name,
                "backdoored": self.backdoored}


def default_zoo() -> list[ZooEntry]:
    """The zoo, most informative first (BackdoorBench defaults, then low rates, then other budgets)."""
    Z = ZooEntry
    return [
        Z(None, 0), Z(None, 1), Z("badnets", 0), Z("blended", 0), Z("badnets", 1), Z("blended", 1),
        Z("sig", 0, rate=0.05), Z("wanet", 0), Z(None, 2), Z("badnets", 0, rate=0.01), Z("blended", 1, rate=0.02),
        Z("badnets", 2, epochs=8), Z(None, 5, epochs=8), Z(None, 3), Z("sig", 1, rate=0.05), Z("wanet", 1),
        Z("blended", 0, rate=0.01), Z("badnets", 1, rate=0.02),
        Z("badnets", 2), Z("blended", 2), Z(None, 4), Z("blended", 2, epochs=8),
        Z("badnets", 3, rate=0.01), Z("blended", 3, rate=0.02), Z(None, 6),
    ]


def model_dir(cache: Path, entry: ZooEntry) -> Path:
    """Where a zoo model lives: the shipped checkpoint for the seed-0 defaults (clean, BadNets, Blended), else
    the cache."""
    if entry.seed == 0 and entry.epochs == TINY.epochs and (entry.attack is None or (
            entry.attack in ("badnets", "blended") and entry.rate == 0.1)):
        return tiny_asset_dir(entry.attack or "clean", 0)
    return cache / entry.name


def train_entry(entry: ZooEntry, out: Path) -> float:
    """Train one zoo model into ``out`` (written whole); returns the seconds it took."""
    from unbackdoor.classify.loop import TrainConfig
    from unbackdoor.classify.transforms import TINY_WORLD_MEAN, TINY_WORLD_STD
    from unbackdoor.classify.victim import train_backdoored
    from unbackdoor.core.seeds import set_seed

    t0 = time.perf_counter()
    train, _ = tiny_world(entry.seed)
    set_seed(entry.seed)
    attack = attack_config(entry.attack or "badnets", seed=entry.seed, rate=entry.rate if entry.attack else 0.0)
    cfg = TrainConfig(epochs=entry.epochs, lr=TINY.lr, flip=TINY.flip, seed=entry.seed)
    with atomic_dir(out) as tmp:
        train_backdoored(train, attack, TINY.model, cfg, tmp, model_kwargs={"width": TINY.width},
                         normalization=(TINY_WORLD_MEAN, TINY_WORLD_STD), init_seed=entry.seed,
                         extra={"zoo": entry.to_json()})
    return time.perf_counter() - t0


RESULTS = ROOT / "results"


def _entry_attack(entry: ZooEntry, folder: Path):
    """The attack the evaluator measures ASR with (the zoo's record of what was planted; BadNets for clean models)."""
    from unbackdoor.classify.flow import attack_of
    from unbackdoor.core.runs import read_json

    return attack_of(read_json(folder / "model.json")) if entry.backdoored else attack_config("badnets", seed=entry.seed)


def scan_zoo(cache: Path, names: list[str] | None) -> None:
    """The ULRL scanner on each trained zoo model, with the defender's 500 clean images of its world (cached)."""
    from unbackdoor.classify.data import stratified_subset
    from unbackdoor.classify.evaluate import evaluate_attack
    from unbackdoor.classify.model_io import load_classifier
    from unbackdoor.scan.ulrl import ULRLScanConfig, scan_ulrl

    out = RESULTS / "scan" / "classify-zoo"
    out.mkdir(parents=True, exist_ok=True)
    for e in default_zoo():
        folder = model_dir(cache, e)
        if (names and e.name not in names) or not (folder / "model.json").is_file() or (out / f"{e.name}.json").is_file():
            continue
        t0 = time.perf_counter()
        train, test = tiny_world(e.seed)
        clean = train.subset(stratified_subset(train, TINY.clean_count, e.seed))
        model = load_classifier(folder)
        metrics = evaluate_attack(model, test, _entry_attack(e, folder))
        res = scan_ulrl(model, clean, ULRLScanConfig(), seed=e.seed)
        atomic_write_json(out / f"{e.name}.json", {
            "entry": e.to_json(), "acc": metrics["acc"], "asr": metrics["asr"], "target": 0,
            "clean_samples": len(clean), "scanner": res.to_json(), "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{e.name}: {res.line()} (acc {metrics['acc']:.3f}, asr {metrics['asr']:.3f})", flush=True)


DEFENSE_BUDGET = "demo"
"""The tiny world's shortened defense budgets (each spec's ``budgets["demo"]``): the re-activation table runs every
defense at the demo's budget to fit the shared CPU."""


def table_defenses() -> list[str]:
    """Every registered classifier defense (whatever is on main when this runs), plus ULRL's ``kept`` preset."""
    from unbackdoor.classify.defenses import CLASSIFY_DEFENSES

    return CLASSIFY_DEFENSES.names() + ["ulrl-kept"]


def retune_table(cache: Path, seeds: list[int], attacks: list[str], out: Path) -> None:
    """Every defense on each backdoored zoo model, then the same retuning attack on each defended model, on the
    clean model of the same world (floor) and on the backdoored model (ceiling). Resumable: finished run folders and
    reactivation records are kept."""
    from unbackdoor.classify.attacks import build_attack
    from unbackdoor.classify.data import stratified_subset
    from unbackdoor.classify.evaluate import evaluate_attack
    from unbackdoor.classify.flow import defend_loaded, format_table, resolve_defense
    from unbackdoor.classify.model_io import load_model
    from unbackdoor.classify.reactivation import COMMAND, RetuneConfig, reactivation_record, retune, retune_set
    from unbackdoor.core.reactivation import FILE, write_record
    from unbackdoor.core.runs import read_json

    rcfg = RetuneConfig()
    for seed in seeds:
        clean_dir = model_dir(cache, ZooEntry(None, seed))
        for attack_name in attacks:
            bd_dir = model_dir(cache, ZooEntry(attack_name, seed))
            if not (bd_dir / "model.json").is_file() or not (clean_dir / "model.json").is_file():
                print(f"seed {seed} {attack_name}: zoo models not trained yet, skipped", flush=True)
                continue
            train, test = tiny_world(seed)
            clean_idx = stratified_subset(train, TINY.clean_count, seed)
            clean = train.subset(clean_idx, name=f"{train.name}-clean")
            model, meta = load_model(bd_dir)
            attack = _entry_attack(ZooEntry(attack_name, seed), bd_dir)
            triggered = build_attack(attack).triggered_test_set(test)
            before = evaluate_attack(model, test, attack, triggered, with_predictions=True)
            rset = retune_set(train, attack, RetuneConfig(seed=seed))
            bounds_file = out / attack_name / "_bounds" / f"seed{seed}.json"
            if bounds_file.is_file():
                bounds = read_json(bounds_file)
            else:
                bounds = {"ceiling": retune(model, rset.data, test, attack, rcfg, triggered=triggered, desc="ceiling"),
                          "floor": retune(load_model(clean_dir)[0], rset.data, test, attack, rcfg, triggered=triggered,
                                          desc="floor")}
                atomic_write_json(bounds_file, bounds)
            for name in table_defenses():
                path = out / attack_name / name / f"seed{seed}"
                if not (path / "metrics.json").is_file():
                    spec, cfg, preset = resolve_defense(name)
                    cfg = spec.make_config(cfg, overrides=spec.budget(DEFENSE_BUDGET))
                    _, metrics = defend_loaded(path, model, clean, clean_idx.tolist(), spec.name, cfg, preset=preset,
                                               test=test, attack=attack, seed=seed, before=before, triggered=triggered,
                                               model_meta=meta, name=name, overwrite=True,
                                               sources={"model": str(bd_dir), "clean": f"tinyworld:{seed}",
                                                        "test": f"tinyworld:{seed}"})
                    print(format_table([metrics]).splitlines()[-1], flush=True)
                if (path / FILE).is_file():
                    continue
                curves = {"defended": retune(load_model(path / "model")[0], rset.data, test, attack, rcfg,
                                             triggered=triggered, desc=f"retune {name}"), **bounds}
                write_record(path, reactivation_record(curves, rcfg, attack, rset, {
                    "data": f"tinyworld:{seed}", "test": f"tinyworld:{seed}", "floor": str(clean_dir),
                    "ceiling": str(bd_dir)}), command=COMMAND, inputs=[path / "model"])
                s = read_json(path / FILE)["summary"]
                print(f"  {attack_name} {name} seed {seed}: ASR {s['defended']['asr_before']:.3f} -> "
                      f"{s['defended']['asr_after']:.3f} after retuning (floor {s['floor']['asr_after']:.3f}, "
                      f"ceiling {s['ceiling']['asr_after']:.3f})", flush=True)


def retune_sensitivity(cache: Path, defended: Path, seed: int, attack_name: str, defenses: list[str],
                       poisoned: list[int]) -> None:
    """The retuning attack with more poisoned samples (``poisoned``) on finished defense runs of one world seed:
    does a defense that holds at the paper's 5 samples hold at more? Raw curves go to
    ``results/reactivation/classify-sensitivity.json``."""
    import dataclasses as dc

    from unbackdoor.classify.attacks import build_attack
    from unbackdoor.classify.model_io import load_model
    from unbackdoor.classify.reactivation import RetuneConfig, retune, retune_set
    from unbackdoor.core.reactivation import summarize

    out = RESULTS / "reactivation" / "classify-sensitivity.json"
    done = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    train, test = tiny_world(seed)
    bd_dir, clean_dir = model_dir(cache, ZooEntry(attack_name, seed)), model_dir(cache, ZooEntry(None, seed))
    attack = _entry_attack(ZooEntry(attack_name, seed), bd_dir)
    trig = build_attack(attack).triggered_test_set(test)
    for k in poisoned:
        cfg = dc.replace(RetuneConfig(seed=seed), poisoned=k)
        rset = retune_set(train, attack, cfg)
        models = {"ceiling": bd_dir, "floor": clean_dir, **{d: defended / attack_name / d / f"seed{seed}" / "model"
                                                             for d in defenses}}
        for name, folder in models.items():
            if any(r["poisoned"] == k and r["model"] == name and r["seed"] == seed and r["attack"] == attack_name
                   for r in done["rows"]):
                continue
            curve = retune(load_model(folder)[0], rset.data, test, attack, cfg, triggered=trig, desc=f"k={k} {name}")
            done["rows"].append({"attack": attack_name, "seed": seed, "model": name, "poisoned": k, "curve": curve,
                                 "summary": summarize({"defended": curve})["defended"],
                                 "config": dataclasses.asdict(cfg)})
            atomic_write_json(out, done)
            print(f"k={k} {attack_name} {name} seed {seed}: ASR {curve[0]['asr']:.3f} -> {curve[-1]['asr']:.3f}",
                  flush=True)


def scan_defended(defended: Path) -> None:
    """The ULRL scanner on every defended model of the re-activation table: does a purified model still look
    backdoored, and does that agree with the retuning attack? (``results/scan/classify-defended.json``)"""
    from unbackdoor.classify.data import stratified_subset
    from unbackdoor.classify.model_io import load_classifier
    from unbackdoor.core.reactivation import FILE
    from unbackdoor.core.runs import read_json
    from unbackdoor.scan.ulrl import scan_ulrl

    out = RESULTS / "scan" / "classify-defended.json"
    done = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    seen = {(r["attack"], r["defense"], r["seed"]) for r in done["rows"]}
    for f in sorted(defended.glob(f"*/*/seed*/{FILE}")):
        run = f.parent
        attack, defense, seed = run.parent.parent.name, run.parent.name, int(run.name[4:])
        if (attack, defense, seed) in seen:
            continue
        train, _ = tiny_world(seed)
        clean = train.subset(stratified_subset(train, TINY.clean_count, seed))
        res = scan_ulrl(load_classifier(run / "model"), clean, seed=seed)
        summary = read_json(f)["summary"]
        done["rows"].append({"attack": attack, "defense": defense, "seed": seed, "score": res.score,
                             "verdict": res.verdict, "target": res.target,
                             "asr_defended": summary["defended"]["asr_before"],
                             "asr_after_retune": summary["defended"]["asr_after"]})
        atomic_write_json(out, done)
        print(f"{attack} {defense} seed {seed}: {res.line()}; ASR {summary['defended']['asr_before']:.3f}, after "
              f"retuning {summary['defended']['asr_after']:.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["train", "list", "scan", "summarize", "retune", "retune-summary",
                                        "retune-sensitivity", "scan-defended"])
    ap.add_argument("--poisoned", nargs="+", type=int, default=[20, 50], help="retune-sensitivity: poisoned counts")
    ap.add_argument("--defenses", nargs="+", default=["ft", "fp", "ulrl", "ulrl-kept"],
                    help="retune-sensitivity: defended runs to retune")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="retune: world seeds")
    ap.add_argument("--attacks", nargs="+", default=["badnets", "blended"], help="retune: attacks")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "zoo" / "classify" / "models")
    ap.add_argument("--only", nargs="+", default=None, help="zoo entry names (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    zoo = [e for e in default_zoo() if a.only is None or e.name in a.only]
    if a.command == "list":
        for e in zoo:
            d = model_dir(a.cache, e)
            print(f"{e.name:<24} {'done' if (d / 'model.json').is_file() else 'missing':<8} {d}")
        return 0
    if a.command == "scan":
        scan_zoo(a.cache, a.only)
        return 0
    if a.command == "summarize":
        from zoo_summary import summarize_classify

        summarize_classify(RESULTS / "scan" / "classify-zoo", RESULTS / "scan", ROOT / "docs" / "img")
        return 0
    if a.command == "scan-defended":
        scan_defended(ROOT / "runs" / "zoo" / "classify" / "defended")
        return 0
    if a.command == "retune-sensitivity":
        retune_sensitivity(a.cache, ROOT / "runs" / "zoo" / "classify" / "defended", a.seeds[0], a.attacks[0],
                           a.defenses, a.poisoned)
        return 0
    if a.command in ("retune", "retune-summary"):
        from zoo_summary import reactivation_summary

        defended = ROOT / "runs" / "zoo" / "classify" / "defended"
        if a.command == "retune":
            retune_table(a.cache, a.seeds, a.attacks, defended)
        reactivation_summary(defended, RESULTS / "reactivation" / "classify.json", ROOT / "docs" / "img", "classify")
        return 0
    a.cache.mkdir(parents=True, exist_ok=True)
    for e in zoo:
        d = model_dir(a.cache, e)
        if (d / "model.json").is_file():
            continue
        secs = train_entry(e, d)
        print(f"{e.name}: trained in {secs:.0f} s -> {d}", flush=True)
        atomic_write_json(a.cache / "manifest.json", {"entries": [{**z.to_json(), "folder": str(model_dir(a.cache, z))}
                                                                   for z in default_zoo()]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
