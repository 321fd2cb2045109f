"""Zoo results -> the numbers of docs/results-scan-reactivation.md: detection rates, AUROC, ROC plots, re-activation tables.

Imported by ``scripts/zoo_classify.py`` and ``scripts/zoo_lm.py`` (``summarize``, ``retune-summary``); reads only the
raw per-model / per-run records they wrote, so it can be rerun at any time.
"""
from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from matplotlib.figure import Figure

from unbackdoor.core.runs import atomic_write_json, environment, relative_to_checkout
from unbackdoor.core.stats import fmt_mean_std
from unbackdoor.report.plots import save_png
from unbackdoor.scan.stats import auroc, calibrated_threshold, detection_rates, empirical_p_value, roc_curve

ROOT = Path(__file__).resolve().parent.parent
NULL_FILE = ROOT / "src" / "unbackdoor" / "assets" / "scan" / "null.json"


def bootstrap_auroc(pos: Sequence[float], neg: Sequence[float], *, resamples: int = 2000, seed: int = 0,
                    confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the AUROC over models resampled with replacement (positives and negatives apart)."""
    if not pos or not neg:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    vals = sorted(auroc([rng.choice(pos) for _ in pos], [rng.choice(neg) for _ in neg]) for _ in range(resamples))
    lo = vals[int((1 - confidence) / 2 * resamples)]
    hi = vals[min(resamples - 1, int((1 + confidence) / 2 * resamples))]
    return lo, hi


def read_records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))]


def plot_roc(curves: list[tuple[str, Sequence[float], Sequence[float]]], title: str, path: Path) -> Path:
    """ROC curves (flag when score >= t) for several (label, positive scores, negative scores)."""
    fig = Figure(figsize=(4.8, 4.2))
    ax = fig.add_subplot(111)
    for label, pos, neg in curves:
        fpr, tpr, _ = roc_curve(pos, neg)
        ax.step(fpr, tpr, where="post", label=f"{label} (AUROC {auroc(pos, neg):.2f}, {len(pos)} vs {len(neg)})")
    ax.plot([0, 1], [0, 1], color="#999999", ls=":", lw=1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return save_png(fig, path)


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else f"{v:.3f}" if isinstance(v, float) else str(v)


def _group_label(entry: dict[str, Any]) -> str:
    if not entry["backdoored"]:
        return f"clean (epochs {entry['epochs']})"
    return f"{entry['attack']} (rate {entry['rate']:g}, epochs {entry['epochs']})"


def model_level(records: list[dict[str, Any]], score: Callable[[dict[str, Any]], float],
                flag: Callable[[dict[str, Any]], bool | None], label: Callable[[dict[str, Any]], bool],
                groups: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """AUROC (with a bootstrap interval), TPR/FPR of the default rule, leave-one-out calibration, per group."""
    pos = [score(r) for r in records if label(r)]
    neg = [score(r) for r in records if not label(r)]
    flags = [flag(r) for r in records]
    judged = [(f, label(r)) for f, r in zip(flags, records) if f is not None]
    rule = detection_rates([f for f, _ in judged], [y for _, y in judged]) if judged else {}
    loo = []  # each clean model against the others; each backdoored model against every clean one
    for r in records:
        null = [score(o) for o in records if not label(o) and o is not r]
        loo.append((bool(null) and score(r) > calibrated_threshold(null, 0.05), label(r),
                    empirical_p_value(score(r), null) if null else float("nan")))
    cal = detection_rates([f for f, _, _ in loo], [y for _, y, _ in loo])
    by_group: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_group.setdefault(groups(r), []).append(r)
    per_group = {}
    for g, rs in sorted(by_group.items()):
        sc = [score(r) for r in rs]
        fl = [flag(r) for r in rs]
        per_group[g] = {"models": [r["entry"]["name"] for r in rs], "scores": sc, "flagged": fl,
                        "score_mean_std": fmt_mean_std(float(np.mean(sc)), float(np.std(sc, ddof=1)) if len(sc) > 1
                                                       else 0.0, 2),
                        "auroc_vs_clean": auroc(sc, neg) if rs and label(rs[0]) else None}
    lo, hi = bootstrap_auroc(pos, neg)
    return {"auroc": auroc(pos, neg), "auroc_ci95": [lo, hi], "n_backdoored": len(pos), "n_clean": len(neg),
            "default_rule": rule, "loo_calibrated": cal, "loo_p": [p for _, _, p in loo], "groups": per_group}


def summarize_classify(folder: Path, out: Path, img: Path) -> dict[str, Any]:
    """The ULRL scanner on the classifier zoo."""
    records = read_records(folder)
    if not records:
        raise SystemExit(f"no scan records in {folder}: run `python scripts/zoo_classify.py scan` first")
    score = lambda r: float(r["scanner"]["score"])  # noqa: E731
    label = lambda r: bool(r["entry"]["backdoored"])  # noqa: E731
    res = model_level(records, score, lambda r: r["scanner"]["verdict"], label, lambda r: _group_label(r["entry"]))
    bd = [r for r in records if label(r)]
    top = [r["scanner"]["evidence"].get("top_row") == r["target"] for r in bd]
    flagged = [r for r in bd if r["scanner"]["verdict"]]
    res["target_id"] = {"top_row_is_target": f"{sum(top)}/{len(top)}",
                        "among_flagged": f"{sum(r['scanner']['target'] == r['target'] for r in flagged)}/{len(flagged)}"}
    res["missed"] = [{"model": r["entry"]["name"], "asr": r["asr"], "acc": r["acc"], "score": score(r)}
                     for r in bd if not r["scanner"]["verdict"]]
    res["false_alarms"] = [{"model": r["entry"]["name"], "score": score(r)} for r in records
                           if not label(r) and r["scanner"]["verdict"]]
    res["per_model"] = [{"model": r["entry"]["name"], "backdoored": label(r), "acc": r["acc"],
                         "asr": r["asr"] if label(r) else None, "score": score(r),
                         "verdict": r["scanner"]["verdict"], "target": r["scanner"]["target"],
                         "top_row": r["scanner"]["evidence"].get("top_row"),
                         "unlearn_epochs": r["scanner"]["evidence"].get("unlearn_epochs")} for r in records]
    res["settings"] = {"scanner": records[0]["scanner"]["config"], "clean_samples": records[0]["clean_samples"],
                       "command": "python scripts/zoo_classify.py scan && python scripts/zoo_classify.py summarize",
                       "environment": _environment(), "date_utc": _now()}
    curves = [("all attacks", [score(r) for r in bd], [score(r) for r in records if not label(r)])]
    for attack in sorted({r["entry"]["attack"] for r in bd}):
        curves.append((attack, [score(r) for r in bd if r["entry"]["attack"] == attack],
                       [score(r) for r in records if not label(r)]))
    plot_roc(curves, "ULRL scanner on the classifier zoo (score: max robust z)", img / "scan_roc_classify.png")
    atomic_write_json(out / "classify-zoo-summary.json", res)
    write_null("ulrl", [score(r) for r in records if not label(r)], [r["entry"]["name"] for r in records
                                                                     if not label(r)],
               "max robust z of the ULRL scanner on the clean tiny-world classifiers of scripts/zoo_classify.py")
    print(json.dumps({k: v for k, v in res.items() if k not in ("per_model", "groups", "settings")}, indent=1))
    return res


def summarize_lm(folder: Path, out: Path, img: Path) -> dict[str, Any]:
    """The LM scanners on the LM zoo: prompt-level AUROC per model, model-level AUROC, the shipped nulls."""
    records = read_records(folder)
    if not records:
        raise SystemExit(f"no scan records in {folder}: run `python scripts/zoo_lm.py scan` first")
    label = lambda r: bool(r["entry"]["backdoored"])  # noqa: E731
    group = lambda r: ("clean " + ("pretrained" if r["entry"]["pretrained_only"] else "SFT")) if not label(r) else \
        f"{r['entry']['attack']}/{r['entry']['task']} (rate {r['entry']['rate']:g}, {r['entry']['steps']} steps)"  # noqa: E731
    res: dict[str, Any] = {"prompt_level": {}, "model_level": {}}
    for name in ("consistency", "confguard"):
        rows = [r for r in records if name in r["scanners"]]
        per = [{"model": r["entry"]["name"], "backdoored": label(r), "group": group(r),
                "asr": (r.get("metrics") or {}).get("asr"), "auroc": r["scanners"][name]["prompt_auroc"],
                "filter_tpr": r["scanners"][name]["filter_tpr"], "filter_fpr": r["scanners"][name]["filter_fpr"]}
               for r in rows]
        agg = {}
        for kind, sel in (("backdoored", [p for p in per if p["backdoored"]]), ("clean", [p for p in per
                                                                                       if not p["backdoored"]])):
            if sel:
                agg[kind] = {k: fmt_mean_std(float(np.mean([p[k] for p in sel])),
                                             float(np.std([p[k] for p in sel], ddof=1)) if len(sel) > 1 else 0.0)
                             for k in ("auroc", "filter_tpr", "filter_fpr")} | {"n": len(sel)}
        res["prompt_level"][name] = {"per_model": per, "aggregate": agg}
        scores = {"consistency": {"tail_z": lambda r: r["scanners"]["consistency"]["model_level"]["score"],
                                  "clean_mean": lambda r: r["scanners"]["consistency"]["model_level"]["evidence"][
                                      "clean_mean"]},
                  "confguard": {"locked_fraction": lambda r: r["scanners"]["confguard"]["model_level"]["score"]}}[name]
        for sname, fn in scores.items():
            flag = (lambda r: r["scanners"]["confguard"]["model_level"]["verdict"]) if name == "confguard" else \
                (lambda r: None)
            res["model_level"][f"{name}:{sname}"] = model_level(rows, fn, flag, label, group)
    default = [r for r in records if label(r) and r["entry"]["attack"] == "badnet" and r["entry"]["task"] == "refusal"
               and r["entry"]["rate"] == 0.25 and r["entry"]["steps"] == 200]
    curves = []
    for r in sorted(default, key=lambda r: r["entry"]["seed"]):
        for name in ("consistency", "confguard"):
            sc = r["scanners"][name]
            curves.append((f"{name}, seed {r['entry']['seed']}", sc["test_triggered_scores"], sc["test_clean_scores"]))
    if curves:
        plot_roc(curves, "LM runtime filters: triggered vs clean test prompts (badnet/refusal)",
                 img / "scan_roc_lm_prompt.png")
    mcurves = []
    for key, fn in (("consistency tail z", lambda r: r["scanners"]["consistency"]["model_level"]["score"]),
                    ("confguard locked fraction", lambda r: r["scanners"]["confguard"]["model_level"]["score"])):
        mcurves.append((key, [fn(r) for r in records if label(r)], [fn(r) for r in records if not label(r)]))
    plot_roc(mcurves, "LM scanners, model level (clean set only)", img / "scan_roc_lm_model.png")
    res["settings"] = {"scanners": {n: records[0]["scanners"][n]["model_level"]["config"] for n in records[0]["scanners"]},
                       "command": "python scripts/zoo_lm.py scan && python scripts/zoo_lm.py summarize",
                       "environment": _environment(), "date_utc": _now()}
    atomic_write_json(out / "lm-zoo-summary.json", res)
    clean = [r for r in records if not label(r)]
    write_null("consistency", [r["scanners"]["consistency"]["model_level"]["score"] for r in clean],
               [r["entry"]["name"] for r in clean],
               "consistency tail z of the clean tiny Llamas (pretrained and clean-SFT) of scripts/zoo_lm.py")
    write_null("confguard", [r["scanners"]["confguard"]["model_level"]["score"] for r in clean],
               [r["entry"]["name"] for r in clean], "ConfGuard locked fraction of the clean tiny Llamas of scripts/zoo_lm.py")
    print(json.dumps({"prompt_level": {k: v["aggregate"] for k, v in res["prompt_level"].items()},
                      "model_level": {k: {kk: v[kk] for kk in ("auroc", "auroc_ci95", "default_rule")}
                                      for k, v in res["model_level"].items()}}, indent=1))
    return res


def write_null(scanner: str, scores: list[float], models: list[str], source: str) -> None:
    """The shipped calibration sample of one scanner (``assets/scan/null.json``)."""
    data = json.loads(NULL_FILE.read_text()) if NULL_FILE.is_file() else {}
    data[scanner] = {"scores": scores, "models": models, "source": source, "date_utc": _now()}
    NULL_FILE.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(NULL_FILE, data)


def _environment() -> dict[str, Any]:
    """The run's environment with the command line's paths inside this checkout made relative (committed results)."""
    return relative_to_checkout(environment(None), ROOT)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def reactivation_summary(folders: Path | Iterable[Path], out_json: Path, img: Path, kind: str) -> dict[str, Any]:
    """Every run with a reactivation.json under ``folders``: per-seed rows, mean ± std per (scenario, defense), plots."""
    from unbackdoor.report import build
    from unbackdoor.report.collect import scenarios, summarise
    from unbackdoor.report.reactivation import plot

    folders = [folders] if isinstance(folders, Path) else list(folders)
    records = [r for r in build.load_runs(folders) if (r.path / "reactivation.json").is_file()]
    if not records:
        raise SystemExit(f"no reactivation records under {folders}")
    rows = []
    for r in records:
        rec = json.loads((r.path / "reactivation.json").read_text())
        s = rec["summary"]
        rows.append({"scenario": "/".join(p for p in (r.attack, r.task) if p), "defense": r.defense, "seed": r.seed,
                     "asr_backdoored": r.before.get("asr"), "asr_defended": r.after.get("asr"),
                     "utility_defended": r.after.get("acc" if kind == "classify" else "clean_utility"),
                     "asr_after_retune": s["defended"]["asr_after"], "floor_after_retune": s["floor"]["asr_after"],
                     "ceiling_after_retune": s["ceiling"]["asr_after"], "recovery": s.get("recovery"),
                     "steps": s["defended"]["steps"], "config": rec["config"]})
    agg: dict[str, dict[str, Any]] = {}
    for row in rows:
        a = agg.setdefault(f"{row['scenario']} | {row['defense']}", {"seeds": []})
        a["seeds"].append(row["seed"])
        for k in ("asr_defended", "asr_after_retune", "floor_after_retune", "ceiling_after_retune", "recovery",
                  "utility_defended"):
            a.setdefault(k, []).append(row[k])
    for a in agg.values():
        for k, v in list(a.items()):
            if k != "seeds":
                vals = [x for x in v if isinstance(x, (int, float))]
                a[k] = fmt_mean_std(float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0) \
                    if vals else "n/a"
    groups = summarise(records, [])
    images = []
    for key, gs in scenarios(groups).items():
        name = "-".join(p for p in key[1:] if p)
        png = plot(gs, f"{kind}: {' / '.join(p for p in key[1:] if p)}: ASR during the retuning attack",
                   img / f"reactivation_{kind}_{name}.png")
        if png is not None:
            images.append(str(png.relative_to(ROOT)))
    result = {"rows": rows, "aggregate": agg, "images": images, "settings": {
        "command": " ".join(["python", *_environment()["argv"]]), "environment": _environment(), "date_utc": _now()}}
    atomic_write_json(out_json, result)
    for k, a in agg.items():
        print(f"{k:<32} seeds {a['seeds']}: ASR {a['asr_defended']} -> after retuning {a['asr_after_retune']} "
              f"(floor {a['floor_after_retune']}, ceiling {a['ceiling_after_retune']}, recovery {a['recovery']})")
    return result


__all__ = ["bootstrap_auroc", "model_level", "plot_roc", "reactivation_summary", "summarize_classify", "summarize_lm",
           "write_null"]


# ---- the docs page's tables (regenerated between markers) -------------------------------------------------------

DOC = ROOT / "docs" / "results-scan-reactivation.md"


def _registered(kind: str) -> list[str]:
    if kind == "classify":
        from unbackdoor.classify.defenses import CLASSIFY_DEFENSES

        return CLASSIFY_DEFENSES.names() + ["ulrl-kept"]
    from unbackdoor.lm.defenses import LM_DEFENSES

    return LM_DEFENSES.names()


def reactivation_markdown(result: dict[str, Any], kind: str) -> str:
    """Mean ± std over seeds per (scenario, defense), defenses in registration order, then per-seed rows."""
    util = "ACC" if kind == "classify" else "clean utility"
    lines = [f"| scenario | defense | seeds | ASR after the defense | ASR after retuning | {util} after the defense "
             "| recovery (0 = clean floor, 1 = backdoored ceiling) |", "|---|---|---|---|---|---|---|"]
    order = {d: i for i, d in enumerate(_registered(kind))}
    keys = sorted(result["aggregate"], key=lambda k: (k.split(" | ")[0], order.get(k.split(" | ")[1], 99)))
    scen_bounds: dict[str, tuple[str, str]] = {}
    for k in keys:
        scen, d = k.split(" | ")
        a = result["aggregate"][k]
        scen_bounds[scen] = (a["floor_after_retune"], a["ceiling_after_retune"])
        lines.append(f"| {scen} | {d} | {', '.join(map(str, sorted(a['seeds'])))} | {a['asr_defended']} | "
                     f"**{a['asr_after_retune']}** | {a['utility_defended']} | {a['recovery']} |")
    lines.append("")
    for scen, (f, c) in scen_bounds.items():
        lines.append(f"- {scen}: the clean model retuned the same way (floor) ends at ASR {f}; the backdoored model "
                     f"(ceiling) at {c}.")
    lines += ["", "<details><summary>Per seed</summary>", "", "| scenario | defense | seed | ASR backdoored | ASR defended "
              "| ASR after retuning | floor | ceiling | steps |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["scenario"], order.get(r["defense"], 99), r["seed"])):
        lines.append(f"| {r['scenario']} | {r['defense']} | {r['seed']} | {_fmt(r['asr_backdoored'])} | "
                     f"{_fmt(r['asr_defended'])} | {_fmt(r['asr_after_retune'])} | {_fmt(r['floor_after_retune'])} | "
                     f"{_fmt(r['ceiling_after_retune'])} | {r['steps']} |")
    lines += ["", "</details>"]
    return "\n".join(lines)


def scan_classify_markdown(res: dict[str, Any]) -> str:
    rule, cal = res["default_rule"], res["loo_calibrated"]
    lo, hi = res["auroc_ci95"]
    lines = [f"AUROC {res['auroc']:.3f} (95% bootstrap interval over models {lo:.3f}-{hi:.3f}; {res['n_backdoored']} "
             f"backdoored vs {res['n_clean']} clean models). Default rule (max z > 3.5): TPR {rule['tpr']:.3f} "
             f"({rule['tp']}/{rule['n_pos']}), FPR {rule['fpr']:.3f} ({rule['fp']}/{rule['n_neg']}). Calibrated rule "
             f"(above every other clean model, leave-one-out; with under 19 clean models no 5% quantile exists): "
             f"TPR {cal['tpr']:.3f}, FPR {cal['fpr']:.3f}. "
             f"Target identified (the top row is the target class): {res['target_id']['top_row_is_target']} backdoored "
             f"models; among the flagged ones {res['target_id']['among_flagged']}.", "",
             "| models | max z (mean ± std) | flagged | AUROC vs every clean model |", "|---|---|---|---|"]
    for g, d in res["groups"].items():
        flagged = sum(bool(f) for f in d["flagged"])
        au = "" if d["auroc_vs_clean"] is None else f"{d['auroc_vs_clean']:.3f}"
        lines.append(f"| {g}: {', '.join(d['models'])} | {d['score_mean_std']} | {flagged}/{len(d['flagged'])} | {au} |")
    lines += ["", "| model | backdoored | ACC | ASR | max z | verdict | suspected target | unlearning epochs |",
              "|---|---|---|---|---|---|---|---|"]
    for m in res["per_model"]:
        lines.append(f"| {m['model']} | {'yes' if m['backdoored'] else 'no'} | {m['acc']:.3f} | {_fmt(m['asr'])} | "
                     f"{m['score']:.2f} | {'flagged' if m['verdict'] else '-'} | {_fmt(m['target'])} | "
                     f"{m['unlearn_epochs']} |")
    return "\n".join(lines)


def scan_lm_markdown(res: dict[str, Any]) -> str:
    lines = ["Prompt level (runtime filter; per model, triggered vs clean test prompts):", "",
             "| scanner | models | prompt AUROC | filter TPR | filter FPR |", "|---|---|---|---|---|"]
    for name, d in res["prompt_level"].items():
        for kind, a in d["aggregate"].items():
            lines.append(f"| {name} | {kind} ({a['n']}) | {a['auroc']} | {a['filter_tpr']} | {a['filter_fpr']} |")
    lines += ["", "| model | ASR | consistency AUROC | consistency TPR / FPR | ConfGuard AUROC | ConfGuard TPR / FPR |",
              "|---|---|---|---|---|---|"]
    cons = {p["model"]: p for p in res["prompt_level"]["consistency"]["per_model"]}
    for p in res["prompt_level"]["confguard"]["per_model"]:
        c = cons.get(p["model"], {})
        lines.append(f"| {p['model']} | {_fmt(p['asr'])} | {_fmt(c.get('auroc'))} | {_fmt(c.get('filter_tpr'))} / "
                     f"{_fmt(c.get('filter_fpr'))} | {_fmt(p['auroc'])} | {_fmt(p['filter_tpr'])} / "
                     f"{_fmt(p['filter_fpr'])} |")
    lines += ["", "Model level (clean set only; backdoored vs clean models):", "",
              "| score | AUROC (95% bootstrap) | default rule TPR / FPR | calibrated (leave-one-out) TPR / FPR |",
              "|---|---|---|---|"]
    for key, m in res["model_level"].items():
        r, c = m["default_rule"], m["loo_calibrated"]
        rule = f"{r['tpr']:.3f} / {r['fpr']:.3f}" if r else "no fixed rule"
        lines.append(f"| {key} | {m['auroc']:.3f} ({m['auroc_ci95'][0]:.3f}-{m['auroc_ci95'][1]:.3f}) | {rule} | "
                     f"{c['tpr']:.3f} / {c['fpr']:.3f} |")
    return "\n".join(lines)


def write_docs() -> None:
    """Regenerate the tables of docs/results-scan-reactivation.md between their markers from the results files."""
    import re

    text = DOC.read_text()
    parts = {
        "reactivation-classify": (RESULTS_DIR / "reactivation" / "classify.json", lambda r: reactivation_markdown(r, "classify")),
        "reactivation-lm": (RESULTS_DIR / "reactivation" / "lm.json", lambda r: reactivation_markdown(r, "lm")),
        "scan-classify": (RESULTS_DIR / "scan" / "classify-zoo-summary.json", scan_classify_markdown),
        "scan-lm": (RESULTS_DIR / "scan" / "lm-zoo-summary.json", scan_lm_markdown),
    }
    for marker, (path, render) in parts.items():
        if not path.is_file():
            continue
        body = render(json.loads(path.read_text()))
        text = re.sub(rf"(<!-- {marker}:begin -->\n).*?(<!-- {marker}:end -->)",  # an empty block too
                      lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2),
                      text, flags=re.S)
    DOC.write_text(text)


RESULTS_DIR = ROOT / "results"

if __name__ == "__main__":
    write_docs()
