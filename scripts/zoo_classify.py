#!/usr/bin/env python
"""The classifier zoo: clean and backdoored tiny-world models, to measure the scanners (docs/results-scan-reactivation.md).

Every model is trained once and cached (``--cache``, default ``runs/zoo/classify/models``); a killed run
resumes at the next missing model (each is written whole by ``atomic_dir``). The list below is ordered
so the most informative models come first: stopping early still leaves a usable zoo.

    python scripts/zoo_classify.py train                 # every model (~3-8 CPU minutes each under load)
    python scripts/zoo_classify.py train --only clean-s1 badnets-r0.01-s0
    python scripts/zoo_classify.py list

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
        Z(None, 2), Z("sig", 0, rate=0.05), Z("wanet", 0), Z(None, 3),
        Z("badnets", 0, rate=0.01), Z("blended", 0, rate=0.01), Z("badnets", 1, rate=0.02),
        Z("blended", 1, rate=0.02), Z("sig", 1, rate=0.05), Z("wanet", 1),
        Z(None, 4), Z("badnets", 2), Z("blended", 2),
        Z("badnets", 2, epochs=8), Z(None, 5, epochs=8), Z("blended", 2, epochs=8),
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["train", "list"])
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
