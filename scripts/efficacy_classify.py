#!/usr/bin/env python
"""Efficacy of ULRL (and FT, FP, NAD) on the classifier tiny world, over several seeds.

For each seed and attack: the backdoored model (shipped checkpoint for seed 0, else trained and
cached), ONE class-stratified clean subset of 500 images, every defense on it, one run folder per
(attack, defense, seed). Then the aggregate (mean, std, values per seed) goes to
``results/classify/efficacy.json`` and the table in ``docs/results-classify.md`` is regenerated
between its markers.

    python scripts/efficacy_classify.py --seeds 0 1 2                 # everything (CPU: ~10 min per seed)
    python scripts/efficacy_classify.py --seeds 1 --defenses ulrl     # a part (run folders are reused)
    python scripts/efficacy_classify.py --aggregate-only --seeds 0 1 2
    python scripts/efficacy_classify.py --make-assets                 # re-train the shipped seed-0 checkpoints

Run folders go to ``--out`` (default ``runs/efficacy-classify``); an existing complete run folder
(with ``metrics.json``) is kept unless ``--force``. Each backdoored model's own evaluation is kept in
``OUT/ATTACK/_backdoored/seedN.json``; with ``--min-asr A`` a model whose backdoor did not take (ASR
below A) gets no defense runs: a defense on it could only measure collateral damage, and the table
says which seeds were skipped.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from unbackdoor.classify.attacks import attack_config_from_dict, build_attack  # noqa: E402
from unbackdoor.classify.data import stratified_subset  # noqa: E402
from unbackdoor.classify.defenses import CLASSIFY_DEFENSES  # noqa: E402
from unbackdoor.classify.evaluate import evaluate_attack  # noqa: E402
from unbackdoor.classify.flow import defend_loaded, format_table, resolve_defense  # noqa: E402
from unbackdoor.classify.testbed import (TINY, tiny_asset_dir, tiny_backdoored, tiny_world,  # noqa: E402
                                           train_tiny_backdoored)
from unbackdoor.core.config import to_dict  # noqa: E402
from unbackdoor.core.runs import atomic_write_json, atomic_write_text, environment, read_json  # noqa: E402
from unbackdoor.core.stats import aggregate, fmt_mean_std  # noqa: E402

DEFAULT_DEFENSES = ("ft", "fp", "nad", "ulrl", "ulrl-kept")
METRICS = ("acc", "asr", "ra", "target_recall", "der")
BACKDOORED = "_backdoored"  # OUT/ATTACK/_backdoored/seedN.json: the backdoored model's own evaluation


def defense_spec(name: str):
    """``(method, config, preset)`` for a registered defense (``ulrl-kept``...), or ``ft-lr<LR>``: fine-tuning
    at another learning rate (a control)."""
    if name.startswith("ft-lr"):
        return "ft", CLASSIFY_DEFENSES.get("ft").make_config(overrides={"lr": float(name[len("ft-lr"):])}), None
    spec, cfg, preset = resolve_defense(name)
    return spec.name, cfg, preset


def record_backdoored(out: Path, attack: str, seed: int, before: dict) -> None:
    """Keep the backdoored model's own evaluation, whether or not any defense runs on it."""
    atomic_write_json(out / attack / BACKDOORED / f"seed{seed}.json",
                      {"seed": seed, **{k: before[k] for k in METRICS if k in before}})


def backdoor_taken(before: dict, min_asr: float, what: str) -> bool:
    """False (and says so) when the backdoor did not take: ASR below ``min_asr``."""
    if before["asr"] >= min_asr:
        return True
    print(f"{what}: the backdoor did not take (ASR {before['asr']:.3f} < --min-asr {min_asr}): defenses skipped",
          flush=True)
    return False


def run(seeds: list[int], attacks: list[str], defenses: list[str], out: Path, cache: Path, force: bool,
        min_asr: float = 0.0) -> None:
    for seed in seeds:
        train, test = tiny_world(seed)
        clean_idx = stratified_subset(train, TINY.clean_count, seed)
        clean = train.subset(clean_idx, name=f"{train.name}-clean")
        for attack_name in attacks:
            t0 = time.perf_counter()
            model, folder = tiny_backdoored(attack_name, seed, cache, data=(train, test))
            meta = read_json(folder / "model.json")
            attack = attack_config_from_dict(meta["attack"])
            triggered = build_attack(attack).triggered_test_set(test)
            before = evaluate_attack(model, test, attack, triggered, with_predictions=True)
            print(f"seed {seed} {attack_name}: backdoored model ready in {time.perf_counter() - t0:.0f}s "
                  f"(acc {before[0]['acc']:.3f}, asr {before[0]['asr']:.3f})", flush=True)
            record_backdoored(out, attack_name, seed, before[0])
            if not backdoor_taken(before[0], min_asr, f"seed {seed} {attack_name}"):
                continue
            for name in defenses:
                path = out / attack_name / name / f"seed{seed}"
                if (path / "metrics.json").is_file() and not force:
                    continue
                method, cfg, preset = defense_spec(name)
                _, metrics = defend_loaded(path, model, clean, clean_idx.tolist(), method, cfg, preset=preset,
                                           test=test, attack=attack, seed=seed, name=name, before=before,
                                           triggered=triggered, model_meta=meta, overwrite=force,
                                           clean_pool=len(train))
                print(format_table([metrics]).splitlines()[-1], flush=True)


def collect(seeds: list[int], attacks: list[str], defenses: list[str], out: Path, min_asr: float = 0.0) -> dict:
    """Read the run folders back: per (attack, defense) the per-seed records and their aggregate."""
    result: dict = {"settings": {}, "attacks": {}}
    for attack in attacks:
        per_defense: dict = {}
        backdoored = [read_json(out / attack / BACKDOORED / f"seed{s}.json") for s in seeds
                      if (out / attack / BACKDOORED / f"seed{s}.json").is_file()]
        for name in defenses:
            records, selections = [], []
            for seed in seeds:
                path = out / attack / name / f"seed{seed}"
                if not (path / "metrics.json").is_file():
                    continue
                m = read_json(path / "metrics.json")
                rec = {k: m["after"][k] for k in METRICS}
                rec["seed"] = seed
                rec["seconds"] = m["seconds"]
                if m.get("peak_memory_mib") is not None:  # runs written before memory was recorded lack it
                    rec["peak_memory_mib"] = m["peak_memory_mib"]
                records.append(rec)
                if all(b["seed"] != seed for b in backdoored):  # the same backdoored model for every defense
                    backdoored.append({"seed": seed, **{k: m["before"][k] for k in METRICS if k in m["before"]}})
                if (path / "ulrl_selection.json").is_file():
                    sel = read_json(path / "ulrl_selection.json")
                    selections.append({"seed": seed, "selected": sel["selected"], "status": sel["status"],
                                       "target_in_selected": 0 in sel["selected"],
                                       "z_target": sel["z"][0], "z_max_other": max(z for i, z in enumerate(sel["z"]) if i != 0)})
                    rec["target_in_selected"] = 0 in sel["selected"]
                result["settings"].setdefault("configs", {})[name] = read_json(path / "config.json")["config"]
            if records:
                per_defense[name] = {"seeds": [r["seed"] for r in records], "per_seed": records,
                                     "aggregate": aggregate([{k: r[k] for k in (*METRICS, "seconds", "peak_memory_mib")
                                                              if k in r} for r in records])}
                if selections:
                    per_defense[name]["selection"] = selections
        backdoored.sort(key=lambda b: b["seed"])
        result["attacks"][attack] = {"not_taken": [b["seed"] for b in backdoored if b["asr"] < min_asr],
                                     "backdoored": {"per_seed": backdoored,
                                                    "aggregate": aggregate([{k: v for k, v in b.items() if k != "seed"}
                                                                            for b in backdoored])},
                                     "defenses": per_defense}
    result["settings"].update({
        "tiny_world": to_dict(TINY), "attack_defaults": "all-to-one, target 0, 10% poisoned (BackdoorBench)",
        "clean_subset": f"{TINY.clean_count} class-stratified training images per seed, shared by every defense",
        "clean_budget": {"clean_samples": TINY.clean_count, "clean_fraction": TINY.clean_count / TINY.n_train},
        "seeds": seeds, "min_asr": min_asr, "environment": environment(None),
        "command": "python scripts/efficacy_classify.py " + " ".join(sys.argv[1:]),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })
    return result


def markdown(result: dict) -> str:
    lines = []
    for attack, block in result["attacks"].items():
        seeds = block["backdoored"]["aggregate"].get("acc", {}).get("n", 0)
        lines.append(f"#### {attack} (mean ± std over {seeds} seeds)\n")
        if block.get("not_taken"):
            lines.append(f"The backdoor did not take on seed(s) {', '.join(map(str, block['not_taken']))} (ASR below "
                         f"--min-asr {result.get('settings', {}).get('min_asr')}): the rule skips the defenses "
                         f"there; rows run on such a model before the rule measure collateral damage only.\n")
        lines.append("| model | n | ACC | ASR | RA | target recall | DER | seconds | peak MiB | target selected |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        agg = block["backdoored"]["aggregate"]
        cell = lambda a, k: fmt_mean_std(a[k]["mean"], a[k]["std"]) if k in a else "n/a"  # noqa: E731
        lines.append(f"| backdoored | {seeds} | {cell(agg, 'acc')} | {cell(agg, 'asr')} | {cell(agg, 'ra')} | "
                     f"{cell(agg, 'target_recall')} | | | | |")
        for name, d in block["defenses"].items():
            a = d["aggregate"]
            sel = d.get("selection")
            hit = f"{sum(s['target_in_selected'] for s in sel)}/{len(sel)}" if sel else ""
            mem = f"{a['peak_memory_mib']['mean']:.0f}" if "peak_memory_mib" in a else "n/a"
            lines.append(f"| {name} | {len(d['per_seed'])} | {cell(a, 'acc')} | {cell(a, 'asr')} | {cell(a, 'ra')} | "
                         f"{cell(a, 'target_recall')} | {cell(a, 'der')} | {a['seconds']['mean']:.0f} | {mem} | {hit} |")
        lines.append("")
        lines.append("Per seed (ACC / ASR / target recall):\n")
        for name, d in block["defenses"].items():
            per = "; ".join(f"seed {r['seed']}: {r['acc']:.3f} / {r['asr']:.3f} / {r['target_recall']:.3f}"
                            for r in d["per_seed"])
            lines.append(f"- {name}: {per}")
        bd = "; ".join(f"seed {b['seed']}: {b['acc']:.3f} / {b['asr']:.3f} / {b['target_recall']:.3f}"
                       for b in block["backdoored"]["per_seed"])
        lines.append(f"- backdoored: {bd}")
        for name, d in block["defenses"].items():
            for s in d.get("selection", []):
                lines.append(f"- {name} seed {s['seed']}: selected {s['selected']} ({s['status']}), "
                             f"z(target) = {s['z_target']:.1f}, largest other z = {s['z_max_other']:.1f}")
        lines.append("")
    costs = relative_costs(result)
    if costs:
        lines.append("Cost relative to `ft` (median over every (attack, seed) that both ran, of defense seconds / "
                     "ft seconds, one torch thread):\n")
        lines.append("| defense | / ft | pairs |")
        lines.append("|---|---|---|")
        lines.extend(f"| {name} | {ratio:.2f} | {n} |" for name, (ratio, n) in costs.items())
        lines.append("")
    return "\n".join(lines)


def relative_costs(result: dict, reference: str = "ft") -> dict[str, tuple[float, int]]:
    """Per defense: the median of its seconds over ``reference``'s seconds on the same (attack, seed), and the count."""
    ratios: dict[str, list[float]] = {}
    for block in result["attacks"].values():
        ref = {r["seed"]: r["seconds"] for r in block["defenses"].get(reference, {}).get("per_seed", [])}
        for name, d in block["defenses"].items():
            for r in d["per_seed"]:
                if ref.get(r["seed"]):
                    ratios.setdefault(name, []).append(r["seconds"] / ref[r["seed"]])
    return {name: (float(statistics.median(v)), len(v)) for name, v in ratios.items()}


def write_docs(result: dict, path: Path, marker: str = "efficacy", render=None) -> None:
    """Rewrite the docs section between the marker comments with ``render(result)`` (default: :func:`markdown`)."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = path.read_text() if path.is_file() else f"# Classifier results\n\n{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    body = (f"{begin}\n_Generated by `{result['settings']['command']}` on {result['settings']['date_utc']}; "
            f"raw numbers in `{result['settings']['results_file']}`._\n\n{(render or markdown)(result)}{end}")
    atomic_write_text(path, head + body + tail)


def plot(result: dict, path: Path, title: str = "") -> None:
    """One panel per attack: clean accuracy against attack success, mean +- std over seeds, per defense.

    The corner a defense wants is top left; the backdoored model (star) sits top right. Written
    atomically as a PNG (matplotlib's object API: no pyplot state)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from unbackdoor.report.plots import save_png

    attacks = list(result["attacks"])
    fig = Figure(figsize=(4.2 * len(attacks), 4.2), layout="constrained")
    axes = fig.subplots(1, len(attacks), squeeze=False)[0]
    names = sorted({n for b in result["attacks"].values() for n in b["defenses"]})
    palette = colormaps["tab20"]  # ten hues, then their light twins: distinct up to 20 defenses
    colors = {n: palette((2 * i) % 20 + (i // 10) % 2) for i, n in enumerate(names)}
    markers = "osD^v<>ph*Xd"
    for ax, attack in zip(axes, attacks):
        block = result["attacks"][attack]
        bd = block["backdoored"]["aggregate"]
        if "asr" in bd:
            ax.plot(bd["asr"]["mean"], bd["acc"]["mean"], "*", color="black", markersize=14, label="backdoored")
        for i, name in enumerate(names):
            a = block["defenses"].get(name, {}).get("aggregate", {})
            if "asr" not in a:
                continue
            ax.errorbar(a["asr"]["mean"], a["acc"]["mean"], xerr=a["asr"]["std"], yerr=a["acc"]["std"],
                        fmt=markers[i % len(markers)], color=colors[name], capsize=3,
                        label=name)  # seed counts per row are in the table
        seeds = bd.get("acc", {}).get("n", 0)
        ax.set(xlim=(-0.05, 1.05), xlabel="attack success rate (lower is better)",
               title=f"{attack} ({seeds} seeds)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("clean accuracy (higher is better)")
    entries: dict = {}  # every panel's labels once: a defense run on one attack only still gets its entry
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    axes[-1].legend(list(entries.values()), list(entries), fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    if title:
        fig.suptitle(title)
    save_png(fig, path)


def make_assets(attacks: list[str]) -> None:
    for attack in attacks:
        folder = tiny_asset_dir(attack, 0)
        t0 = time.perf_counter()
        train_tiny_backdoored(attack, 0, folder)
        print(f"{folder}: {time.perf_counter() - t0:.0f}s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--attacks", nargs="+", default=["badnets", "blended"])
    p.add_argument("--defenses", nargs="+", default=list(DEFAULT_DEFENSES))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "efficacy-classify")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "classify-models")
    p.add_argument("--results", type=Path, default=ROOT / "results" / "classify" / "efficacy.json")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "results-classify.md")
    p.add_argument("--marker", default="efficacy",
                   help="the docs section to rewrite, between <!-- MARKER:begin --> and <!-- MARKER:end -->")
    p.add_argument("--aggregate-only", action="store_true", help="only read the run folders and write the results")
    p.add_argument("--force", action="store_true", help="re-run defenses whose run folder is complete")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    p.add_argument("--min-asr", type=float, default=0.0,
                   help="skip the defenses on a backdoored model whose ASR is below this (the backdoor did not take)")
    p.add_argument("--plot", type=Path, default=None, help="also write an ACC-vs-ASR figure (PNG) of the table")
    p.add_argument("--make-assets", action="store_true", help="re-train the shipped seed-0 checkpoints and exit")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    if a.make_assets:
        make_assets(a.attacks)
        return 0
    if not a.aggregate_only:
        run(a.seeds, a.attacks, a.defenses, a.out, a.cache_dir, a.force, a.min_asr)
    result = collect(a.seeds, a.attacks, a.defenses, a.out, a.min_asr)
    results = a.results.resolve()
    result["settings"]["results_file"] = str(results.relative_to(ROOT) if results.is_relative_to(ROOT) else results)
    atomic_write_json(a.results, result)
    write_docs(result, a.docs, a.marker)
    if a.plot is not None:
        plot(result, a.plot, f"tiny world: {a.marker}")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
