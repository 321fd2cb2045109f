#!/usr/bin/env python
"""Trigger fidelity, checked by eye: one PNG grid per image attack, clean vs poisoned tiny-world examples.

For each attack (tiny world, seed 0): six test images of non-target classes; rows are the clean
image, the TRAINING-time poisoned version (what the victim learns from: for LC the PGD-hardened
image with corners, for Adap-Blend the half-masked blend), the TEST-time triggered version, and
the difference ``|triggered - clean|`` amplified 4x. Fitted attacks (LF, TrojanNN, Input-aware) use
the config recorded by the backdoored model in ``--cache-dir`` (or the shipped assets) when there is
one, else they are fitted now on the seed-0 training set (minutes). Writes ``docs/img/attack-<name>.png``.

    python scripts/attack_gallery.py                        # every registered attack
    python scripts/attack_gallery.py --attacks lf lc        # some
"""
from __future__ import annotations

import argparse
import io
import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from unbackdoor.classify.attacks import IMAGE_ATTACKS, attack_config, attack_config_from_dict, build_attack  # noqa: E402
from unbackdoor.classify.data import to_float  # noqa: E402
from unbackdoor.classify.testbed import tiny_asset_dir, tiny_world  # noqa: E402
from unbackdoor.core.runs import atomic_write_bytes, read_json  # noqa: E402


def recorded_config(attack: str, cache: Path):
    """The attack config a backdoored seed-0 model recorded (with its fitted state), or None."""
    for folder in (tiny_asset_dir(attack, 0), cache / f"tinyworld-{attack}-seed0"):
        if (folder / "model.json").is_file():
            return attack_config_from_dict(read_json(folder / "model.json")["attack"])
    return None


def examples(test, target: int, n: int = 6) -> torch.Tensor:
    """Indices of ``n`` test images, one per non-target class in turn."""
    picked = []
    for c in range(test.num_classes):
        if c == target:
            continue
        picked.append(int((test.labels == c).nonzero()[0]))
        if len(picked) == n:
            break
    return torch.tensor(picked)


def grid(attack_name: str, cache: Path) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, test = tiny_world(0)
    cfg = recorded_config(attack_name, cache) or attack_config(attack_name, seed=0)
    attack = build_attack(cfg)
    if attack.fitted and (not attack.stateful or getattr(cfg, "state", None) is None):
        tensors, _ = attack.fit(train)  # LC's surrogate, or a fitted trigger no model has recorded
        if attack.stateful:
            attack._state = tensors
    idx = examples(test, cfg.target)
    x = to_float(test.images[idx])
    g = torch.Generator().manual_seed(0)
    trained = attack.poison_images(x.clone(), test.labels[idx], g).clamp(0, 1)
    triggered = attack.apply(x.clone(), torch.Generator().manual_seed(1)).clamp(0, 1)
    diff = ((triggered - x).abs() * 4).clamp(0, 1)
    rows = [("clean", x), ("poisoned (train)", trained), ("triggered (test)", triggered), ("|diff| x4", diff)]
    fig = Figure(figsize=(1.3 * len(idx) + 1.4, 1.35 * len(rows) + 0.5), dpi=110)
    FigureCanvasAgg(fig)
    for r, (label, imgs) in enumerate(rows):
        for c in range(len(idx)):
            ax = fig.add_subplot(len(rows), len(idx), r * len(idx) + c + 1)
            ax.imshow(imgs[c].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0:
                ax.set_title(test.class_names[int(test.labels[idx[c]])], fontsize=8)
    fig.suptitle(f"{attack_name}: {IMAGE_ATTACKS.get(attack_name).__doc__.splitlines()[0][:90]}", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", nargs="+", default=list(IMAGE_ATTACKS.names()))
    p.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "classify-models")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    for name in a.attacks:
        key = IMAGE_ATTACKS.canonical(name)
        path = a.out / f"attack-{key}.png"
        atomic_write_bytes(path, grid(key, a.cache_dir))
        print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
