#!/usr/bin/env python
"""Efficacy on real images: Fashion-MNIST x {BadNets, Blended, WaNet} x {FT, FP, NAD, ULRL, ULRL kept}, several seeds.

CPU-sized (recorded in the results): per seed, a class-stratified 10,000-image subset of the
60k training set is poisoned (BackdoorBench defaults: all-to-one, target 0, 10%) and a small CNN
(``preact_resnet_tiny`` width 8, one input channel) is trained on it; the defender gets 500
class-stratified clean images of that subset; every defense runs with its paper settings; the
whole 10k test set measures ACC / ASR / RA / target recall. Needs Debian's
``dataset-fashion-mnist`` (``scripts/setup.sh`` installs it where it can).

    python scripts/efficacy_fashion_mnist.py --seeds 0 1 2
    python scripts/efficacy_fashion_mnist.py --aggregate-only --seeds 0 1 2

Run folders go to ``--out`` (default ``runs/efficacy-fmnist``), backdoored models to
``--cache-dir``; a complete run folder (with ``metrics.json``) is kept unless ``--force``, so
the script resumes where it stopped. Results: ``results/classify/fashion_mnist.json`` and the
section between the ``fashion-mnist`` markers of ``docs/results-byo.md``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from efficacy_classify import DEFAULT_DEFENSES, collect, defense_spec, plot, write_docs  # noqa: E402

from unbackdoor.classify.attacks import attack_config, attack_config_from_dict, build_attack  # noqa: E402
from unbackdoor.classify.data import stratified_subset  # noqa: E402
from unbackdoor.classify.evaluate import evaluate_attack  # noqa: E402
from unbackdoor.classify.fashion_mnist import available, load_fashion_mnist  # noqa: E402
from unbackdoor.classify.flow import defend_loaded, format_table  # noqa: E402
from unbackdoor.classify.loop import TrainConfig  # noqa: E402
from unbackdoor.classify.model_io import load_model  # noqa: E402
from unbackdoor.classify.transforms import FASHION_MNIST_MEAN, FASHION_MNIST_STD  # noqa: E402
from unbackdoor.classify.victim import train_backdoored  # noqa: E402
from unbackdoor.core.config import option, to_dict  # noqa: E402
from unbackdoor.core.runs import atomic_dir, atomic_write_json, environment  # noqa: E402
from unbackdoor.core.seeds import set_seed  # noqa: E402


@dataclass
class FMNISTSettings:
    """The CPU-sized Fashion-MNIST protocol (every value is recorded with the results)."""

    n_train: int = option(10_000, "class-stratified training images per seed (of 60k)")
    model: str = option("preact_resnet_tiny", "architecture")
    width: int = option(8, "network width")
    epochs: int = option(20, "backdoor training epochs")
    lr: float = option(0.05, "backdoor training SGD lr (cosine)")
    batch_size: int = option(128, "backdoor training batch")
    flip: bool = option(False, "horizontal flips while training (off, as in the tiny world: a flip moves the patch)")
    clean_count: int = option(500, "clean images the defender gets (5% of the 10k training subset)")


SETTINGS = FMNISTSettings()


def backdoored(attack_name: str, seed: int, train, cache: Path):
    folder = cache / f"fmnist-{attack_name}-seed{seed}"
    if not (folder / "model.json").is_file():
        t0 = time.perf_counter()
        set_seed(seed)
        cfg = TrainConfig(epochs=SETTINGS.epochs, lr=SETTINGS.lr, batch_size=SETTINGS.batch_size,
                          flip=SETTINGS.flip, seed=seed)
        with atomic_dir(folder) as tmp:
            train_backdoored(train, attack_config(attack_name, seed=seed), SETTINGS.model, cfg, tmp,
                             model_kwargs={"width": SETTINGS.width, "in_channels": 1},
                             normalization=(FASHION_MNIST_MEAN, FASHION_MNIST_STD), init_seed=seed)
        print(f"seed {seed} {attack_name}: trained in {time.perf_counter() - t0:.0f}s", flush=True)
    return load_model(folder)


def run(seeds: list[int], attacks: list[str], defenses: list[str], out: Path, cache: Path, force: bool) -> None:
    for name in defenses:  # import every defense now: a long run must not pick up code edited meanwhile
        defense_spec(name)
    full = load_fashion_mnist(train=True)
    test = load_fashion_mnist(train=False)
    for seed in seeds:
        train = full.subset(stratified_subset(full, SETTINGS.n_train, seed), name=f"fashion-mnist-train10k-s{seed}")
        clean_idx = stratified_subset(train, SETTINGS.clean_count, seed)
        clean = train.subset(clean_idx, name=f"{train.name}-clean")
        for attack_name in attacks:
            model, meta = backdoored(attack_name, seed, train, cache)
            attack = attack_config_from_dict(meta["attack"])
            triggered = build_attack(attack).triggered_test_set(test)
            before = evaluate_attack(model, test, attack, triggered, with_predictions=True)
            print(f"seed {seed} {attack_name}: acc {before[0]['acc']:.3f}, asr {before[0]['asr']:.3f}", flush=True)
            for name in defenses:
                path = out / attack_name / name / f"seed{seed}"
                if (path / "metrics.json").is_file() and not force:
                    continue
                method, cfg, preset = defense_spec(name)
                _, metrics = defend_loaded(path, model, clean, clean_idx.tolist(), method, cfg, preset=preset,
                                           test=test, attack=attack, seed=seed, name=name, before=before,
                                           triggered=triggered, model_meta=meta, overwrite=force)
                print(format_table([metrics]).splitlines()[-1], flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--attacks", nargs="+", default=["badnets", "blended", "wanet"])
    p.add_argument("--defenses", nargs="+", default=list(DEFAULT_DEFENSES))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "efficacy-fmnist")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "fmnist-models")
    p.add_argument("--results", type=Path, default=ROOT / "results" / "classify" / "fashion_mnist.json")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "results-byo.md")
    p.add_argument("--marker", default="fashion-mnist",
                   help="the docs section to rewrite, between <!-- MARKER:begin --> and <!-- MARKER:end -->")
    p.add_argument("--plot", type=Path, default=None, help="also write an ACC-vs-ASR figure (PNG) of the table")
    p.add_argument("--aggregate-only", action="store_true")
    p.add_argument("--force", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    if not available():
        print("Fashion-MNIST not found: apt-get install dataset-fashion-mnist (scripts/setup.sh does it)")
        return 2
    if not a.aggregate_only:
        run(a.seeds, a.attacks, a.defenses, a.out, a.cache_dir, a.force)
    result = collect(a.seeds, a.attacks, a.defenses, a.out)
    result["settings"].pop("tiny_world", None)
    result["settings"].update({
        "fashion_mnist": to_dict(SETTINGS), "test": "the full 10k Fashion-MNIST test set",
        "clean_subset": f"{SETTINGS.clean_count} class-stratified images of the seed's training subset, "
                        "shared by every defense", "environment": environment(None),
        "command": "python scripts/efficacy_fashion_mnist.py " + " ".join(sys.argv[1:]),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "results_file": str(a.results.relative_to(ROOT)) if a.results.is_relative_to(ROOT) else str(a.results)})
    atomic_write_json(a.results, result)
    write_docs(result, a.docs, marker=a.marker)
    if a.plot is not None:
        plot(result, a.plot, "Fashion-MNIST")
    print(f"results -> {a.results}; docs -> {a.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
