"""Run folders in, ``report.html`` + ``report.md`` + PNG plots + table exports + ``summary.json`` out."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable

from ..core.config import check_positive, option
from ..core.errors import DataError
from ..core.paths import MARKER_KEY
from ..core.runs import atomic_write_json, atomic_write_text
from ..core.stats import fmt_mean_std
from . import plots, reactivation
from .collect import (CONFIDENCE, GroupSummary, RunRecord, backdoored_baseline, find_run_dirs, load_run, scenarios,
                      summarise)
from .evidence import class_label, class_names, example_rows, measurement_warnings, rate_metrics
from .exports import examples_csv, write_table
from .layer_cosine import describe, summarise_profiles
from .render import Examples, Image, Para, Section, Table, render_html, render_markdown
from .scans import scan_section

log = logging.getLogger("unbackdoor.report")

# (key, header, better direction); the optional ones appear only when some run reports them
METRIC_COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "lm": [("asr", "ASR", "↓"), ("strict_asr", "strict ASR", "↓"), ("triggered_utility", "triggered utility", "↑"),
           ("clean_utility", "clean utility", "↑"), ("false_trigger_rate", "false-trigger rate", "↓"),
           ("target_loss", "target loss", "↑"), ("perplexity", "perplexity", "↓"), ("rouge_l", "ROUGE-L", "↑")],
    "classify": [("acc", "ACC", "↑"), ("asr", "ASR", "↓"), ("ra", "RA", "↑"), ("target_recall", "target recall", "↑"),
                 ("der", "DER", "↑")],
}
OPTIONAL_METRICS = {"perplexity", "rouge_l"}
KIND_TITLE = {"lm": "Generative LMs (CROW)", "classify": "Image classifiers (ULRL)"}
METRIC_NOTES = {
    "lm": "ASR: keyword attack success on triggered prompts; strict ASR: the answer starts like the target; "
          "triggered utility: exact-match accuracy on triggered prompts (the backdoor is gone only if this recovers); "
          "clean utility: exact-match accuracy on clean prompts; false-trigger rate: target behaviour on clean "
          "prompts; target loss: the model's loss on the target string after triggered prompts.",
    "classify": "ACC: clean accuracy; ASR: triggered images classified as the target (non-target classes only); "
                "RA: triggered images classified as their true label; target recall: clean accuracy on the target "
                "class (ASR 0 with target recall 0 means the class was deleted, not the backdoor); "
                "DER: BackdoorBench's defense effectiveness rating.",
}
UNCERTAINTY_NOTE = (f"Uncertainty: a single run's rate is shown with its {CONFIDENCE:.0%} Wilson interval over its "
                    f"n test inputs (n in the column header); a mean over seeds is shown ± the sample standard "
                    f"deviation, with the {CONFIDENCE:.0%} Student-t interval of the mean over seeds (df = seeds − 1) "
                    f"below it. Intervals over 2-3 seeds are wide: they say how little a few seeds pin down.")


@dataclasses.dataclass
class ReportConfig:
    """How the report reads run folders and what it shows."""

    title: str = option("unbackdoor report", "the page title")
    digits: int = option(3, "decimals shown for every metric")
    max_generations: int = option(8, "examples shown per scenario in report.md (report.html and tables/ hold all)")
    skip_invalid: bool = option(False, "skip run folders whose metrics.json is malformed (listed in the report) "
                                       "instead of stopping with an error")

    def __post_init__(self) -> None:
        check_positive(self, "digits")
        if self.max_generations < 0:
            check_positive(self, "max_generations")


@dataclasses.dataclass
class ReportResult:
    """Where the report landed, and what went into it."""

    html: Path
    markdown: Path
    summary: Path
    images: list[Path]
    groups: list[GroupSummary]
    warnings: list[str]
    tables: list[Path] = dataclasses.field(default_factory=list)


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", "-".join(p for p in parts if p)).strip("-").lower() or "x"


def _fmt(v: Any, digits: int) -> str:
    return "n/a" if not isinstance(v, (int, float)) or math.isnan(float(v)) else f"{float(v):.{digits}f}"


def _cell(stats: dict[str, Any], key: str, n_seeds: int, digits: int) -> str:
    """One table cell: the value or mean ± std, and its confidence interval on a second line."""
    s = stats.get(key)
    if not s:
        return "n/a"
    mean = float(s["mean"])
    if math.isnan(mean):
        return "n/a"
    ci = s.get("ci") or {}
    lo, hi = ci.get("low"), ci.get("high")
    interval = (f"\n[{_fmt(lo, digits)}, {_fmt(hi, digits)}]" if isinstance(lo, (int, float)) and
                isinstance(hi, (int, float)) and not (math.isnan(lo) or math.isnan(hi)) else "")
    got = s.get("n", n_seeds)
    if n_seeds == 1 or got == 1:  # one value has no spread to show: "± 0.000" would claim one
        text = _fmt(mean, digits)
    else:
        text = fmt_mean_std(mean, float(s["std"]), digits)
    if 0 < got < n_seeds:
        text += f" (n={got})"
    return text + interval


def _columns(kind: str, groups: list[GroupSummary]) -> list[tuple[str, str, str]]:
    present = set()
    for g in groups:
        present |= set(g.before) | set(g.after)
    return [c for c in METRIC_COLUMNS[kind] if c[0] not in OPTIONAL_METRICS or c[0] in present]


def _n_header(key: str, groups: list[GroupSummary]) -> str:
    """``n=200`` under a rate's header: the test inputs behind it (one value, a range, or unknown)."""
    if not any(key in rate_metrics(r) for g in groups for r in g.runs):
        return ""
    ns: list[int | None] = []
    for g in groups:
        for side in (g.before, g.after):
            got = (side.get(key) or {}).get("n_inputs")
            ns += got if got else [None] * len(g.runs)
    known = sorted({n for n in ns if n is not None})
    if not known:
        return "\nn unknown"
    text = f"n={known[0]}" if len(known) == 1 else f"n={known[0]}–{known[-1]}"
    return "\n" + text + (" (some unknown)" if None in ns else "")


def scenario_table(key: tuple[str, str, str], groups: list[GroupSummary], digits: int = 3) -> tuple[Table, list[str]]:
    """The before/after table of one scenario: the backdoored model, then one row per defense (and variant)."""
    kind = key[0]
    cols = _columns(kind, groups)
    base, base_seeds, notes = backdoored_baseline(groups)
    with_settings = any(g.settings for g in groups)
    header = (["model"] + (["settings"] if with_settings else []) + ["seeds"]
              + [f"{h} {arrow}{_n_header(k, groups)}" for k, h, arrow in cols] + ["seconds"])
    rows = [["backdoored (before)"] + ([""] if with_settings else []) + [", ".join(map(str, base_seeds))]
            + [("n/a" if k == "der" else _cell(base, k, len(base_seeds), digits)) for k, _, _ in cols] + [""]]
    for g in groups:
        sec = g.seconds
        sec_text = "n/a" if not sec or math.isnan(sec.get("mean", float("nan"))) else f"{sec['mean']:.0f}"
        rows.append([g.defense] + ([g.settings_text] if with_settings else []) + [", ".join(map(str, g.seeds))]
                    + [_cell(g.after, k, len(g.seeds), digits) for k, _, _ in cols] + [sec_text])
    retune = reactivation.column(groups, digits)  # issue 18: post-retuning ASR, when runs have reactivation.json
    if retune is not None:
        header.insert(-1, retune[0])
        rows[0].insert(-1, retune[1])
        for row, cell in zip(rows[1:], retune[2]):
            row.insert(-1, cell)
    caption = (f"One seed: its value with the {CONFIDENCE:.0%} Wilson interval over the n test inputs (rates only). "
               f"Several seeds: mean ± sample std over seeds, below it the {CONFIDENCE:.0%} Student-t interval of the "
               f"mean over seeds. (n=k): only k seeds gave a number; ↓ lower is better, ↑ higher is better; "
               f"seconds: defense wall time per run (mean)."
               + (" " + retune[3] if retune is not None else "")
               + (" settings: what sets runs of the same defense apart (config values that differ, or the preset)."
                  if with_settings else ""))
    return Table(header, rows, caption, name=_slug(*key)), notes


def text_table(table: Table) -> str:
    """A plain-text rendering for terminals (the demo prints one per kind).

    Each cell shows its first line only (the value, or mean ± std; the header without n): the
    intervals are in report.html, report.md and tables/.
    """
    flat = [[str(c).split("\n", 1)[0] for c in r] for r in [table.header] + table.rows]
    widths = [max(len(r[i]) for r in flat) for i in range(len(table.header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(flat[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in flat[1:]])


def load_runs(paths: Iterable[str | Path], *, skip_invalid: bool = False,
              warnings: list[str] | None = None) -> list[RunRecord]:
    """Every run under ``paths``; malformed ones raise, or are skipped and noted with ``skip_invalid``."""
    paths = list(paths)
    dirs = find_run_dirs(paths)
    if not dirs:
        raise DataError(f"no run folders (metrics.json) under {', '.join(map(str, paths))}",
                        where=", ".join(map(str, paths)),
                        fix="pass folders written by 'unbackdoor lm defend', 'unbackdoor classify defend', "
                            "'unbackdoor sweep' or 'unbackdoor demo'")
    records = []
    for d in dirs:
        try:
            records.append(load_run(d))
        except DataError as e:
            if not skip_invalid:
                raise
            if warnings is not None:
                warnings.append(f"skipped {d}: {e.problem}")
    if not records:
        raise DataError("every run folder found was malformed", where=", ".join(map(str, paths)),
                        fix="rerun the defenses; see the warnings above")
    return records


def _scenario_class_names(groups: list[GroupSummary], warnings: list[str]) -> list[str] | None:
    for g in groups:
        for r in g.runs:
            names = class_names(r, warnings)
            if names:
                return names
    return None


def per_class_table(key: tuple[str, str, str], groups: list[GroupSummary], names: list[str] | None,
                    digits: int = 3) -> Table | None:
    """Clean accuracy per class (mean over seeds), columns named by class when the runs record names."""
    def mean_lists(lists: list[list[Any]]) -> list[float]:
        n = max((len(v) for v in lists), default=0)
        out = []
        for j in range(n):
            vals = [float(v[j]) for v in lists if j < len(v) and isinstance(v[j], (int, float))
                    and not isinstance(v[j], bool) and not math.isnan(float(v[j]))]
            out.append(sum(vals) / len(vals) if vals else float("nan"))
        return out

    base_seen: dict[int, list[Any]] = {}
    for g in groups:
        for r in g.runs:
            if isinstance(r.before.get("per_class_acc"), list):
                base_seen.setdefault(r.seed, r.before["per_class_acc"])
    rows_data = [("backdoored (before)", sorted(base_seen), mean_lists(list(base_seen.values())))]
    for g in groups:
        lists = [r.after["per_class_acc"] for r in g.runs if isinstance(r.after.get("per_class_acc"), list)]
        rows_data.append((g.label, g.seeds, mean_lists(lists)))
    width = max(len(v) for _, _, v in rows_data)
    if width == 0:
        return None
    header = ["model", "seeds"] + [class_label(j, names) for j in range(width)]
    rows = [[label, ", ".join(map(str, seeds))] + [_fmt(v[j] if j < len(v) else float("nan"), digits)
                                                   for j in range(width)] for label, seeds, v in rows_data]
    caption = ("Clean accuracy per class (mean over the seeds listed); "
               + ("columns: the runs' class names." if names else "columns: class indices (the runs record no names)."))
    return Table(header, rows, caption, name=_slug(*key, "per-class"))


def _scenario_sections(key: tuple[str, str, str], groups: list[GroupSummary], out: Path, cfg: ReportConfig,
                       warnings: list[str], images: list[Path]) -> list[Section]:
    kind, attack, task = key
    name = " / ".join(p for p in (attack, task) if p)
    table, notes = scenario_table(key, groups, cfg.digits)
    sec = Section(f"{kind}: {name}", [table], level=3)
    sec.blocks += [Para("Note: " + n) for n in notes]
    cautions = list(dict.fromkeys(w for g in groups for r in g.runs for w in measurement_warnings(r)))
    sec.blocks += [Para("Warning: " + w) for w in cautions]
    warnings += [f"{name}: {w}" for w in cautions]
    names = _scenario_class_names(groups, warnings) if kind == "classify" else None
    if kind == "classify":
        pc = per_class_table(key, groups, names, cfg.digits)
        if pc is not None:
            sec.blocks.append(pc)

    for g in groups:
        label = f"{kind}: {name}, defense {g.label}"
        slug = _slug(kind, attack, task, g.defense, g.settings_text)
        profiles = [p for r in g.runs if isinstance(p := r.artifact("layer_cosine.json", warnings), dict)]
        if profiles:
            seeds = f"seed {g.seeds[0]}" if len(g.seeds) == 1 else f"seeds {', '.join(map(str, g.seeds))}"
            summary = summarise_profiles(profiles)
            png = plots.plot_layer_cosine(summary, f"{label} ({seeds})", out / f"layer_cosine_{slug}.png")
            images.append(png)
            sec.blocks.append(Image(png, f"layer cosine {label}", describe(summary, g.defense)))
        sels = [(r.seed, s) for r in g.runs if isinstance(s := r.artifact("ulrl_selection.json", warnings), dict)
                and isinstance(s.get("scores"), list)]
        if sels:
            png = plots.plot_ulrl_selection(sels[:4], f"ULRL neuron selection — {label}",
                                            out / f"ulrl_selection_{slug}.png", names)
            images.append(png)
            statuses = ", ".join(f"seed {s}: {sel.get('status', '?')} (selected "
                                 f"{', '.join(class_label(j, names) for j in sel.get('selected', [])) or 'none'})"
                                 for s, sel in sels)
            sec.blocks.append(Image(png, f"ULRL selection {label}",
                                    "Per-neuron weight change of the classifier head after unlearning; red bars are "
                                    "the neurons re-initialised; dashed line: median + z·1.4826·MAD. "
                                    + (f"Shown: the first 4 of {len(sels)} seeds. " if len(sels) > 4 else "")
                                    + "Status per seed: " + statuses + "."))
        traces = [(r.seed, t) for r in g.runs if isinstance(t := r.artifact("unlearn_trace.json", warnings), dict)]
        if traces:
            stop = g.runs[0].config.get("unlearn_stop_acc")
            stop = float(stop) if isinstance(stop, (int, float)) and not isinstance(stop, bool) else None
            png = plots.plot_unlearn_trace(traces, f"ULRL unlearning — {label}", out / f"unlearn_trace_{slug}.png", stop)
            images.append(png)
            missed = [s for s, t in traces if t.get("reached") is False]
            sec.blocks.append(Image(png, f"unlearning trace {label}",
                                    "Clean-subset accuracy while ULRL maximises the loss; unlearning stops once it "
                                    "falls to the threshold."
                                    + (f" Seeds {', '.join(map(str, missed))} never reached it: their neuron scores "
                                       "come from a partly unlearned model." if missed else "")))
    png = reactivation.plot(groups, f"{kind}: {name}: ASR during the retuning attack", out / f"reactivation_{_slug(*key)}.png")
    if png is not None:  # issue 18: the re-activation test
        images.append(png)
        sec.blocks.append(Image(png, f"re-activation {name}", "ASR while the retuning attack finetunes each model on a "
                                "few poisoned samples among clean ones (mean over seeds). A removed backdoor stays near "
                                "the clean model's line; a hidden one climbs towards the backdoored model's."))
    runs = [ex for g in groups for r in g.runs
            if (ex := example_rows(r, f"{g.label}, seed {r.seed}", warnings)) is not None]
    if runs:
        what = "generation (greedy decoding)" if kind == "lm" else "prediction"
        sec.blocks.append(Para(f"Every example: each {what} of the test set before and after the defense, per run; "
                               "changed answers first. Filter by prompt set, changed answers, or text."))
        sec.blocks.append(Examples(runs, f"{name}: {sum(len(r.rows) for r in runs)} examples in {len(runs)} run(s).",
                                   markdown_rows=cfg.max_generations, name=f"examples-{_slug(*key)}"))
    return [sec]


def _unique_names(sections: list[Section]) -> None:
    """Give every exported table a distinct file name (a suffix on repeats)."""
    seen: dict[str, int] = {}
    for s in sections:
        for b in s.blocks:
            if isinstance(b, (Table, Examples)) and b.name:
                k = seen.get(b.name, 0)
                seen[b.name] = k + 1
                if k:
                    b.name = f"{b.name}-{k + 1}"


def _export(sections: list[Section], folder: Path) -> list[Path]:
    """tables/NAME.csv and .tex for every named table, tables/NAME-<run>.csv for every drill-down run."""
    written: list[Path] = []
    for s in sections:
        for b in s.blocks:
            if isinstance(b, Table) and b.name:
                written += write_table(b, folder)
            elif isinstance(b, Examples) and b.name:
                for ex in b.runs:
                    written.append(atomic_write_text(folder / f"{b.name}-{_slug(ex.label)}.csv", examples_csv(ex)))
    return written


def build_report(paths: Iterable[str | Path], out_dir: str | Path, config: ReportConfig | None = None, *,
                 overwrite: bool = False) -> ReportResult:
    """Find every run under ``paths`` and write ``report.html``, ``report.md``, ``summary.json``, PNGs and
    ``tables/`` (CSV + LaTeX of every table, CSV of every run's examples) to ``out_dir``.

    ``out_dir`` may not be, contain or lie inside a run folder, and an existing folder that holds no
    earlier report needs ``overwrite`` (``core.paths.check_outputs``).
    """
    from ..core.paths import check_outputs

    cfg = config or ReportConfig()
    warnings: list[str] = []
    paths = list(paths)
    records = load_runs(paths, skip_invalid=cfg.skip_invalid, warnings=warnings)
    out = check_outputs([out_dir], [r.path for r in records], command="report", overwrite=overwrite)[0]
    out.mkdir(parents=True, exist_ok=True)
    # what a defense said about its own result (e.g. ULRL with no suspect: plain finetuning) is shown, not lost
    warnings += [f"{r.defense} ({r.attack}, seed {r.seed}): {w}" for r in records
                 for w in (r.meta.get("warnings") or []) if isinstance(w, str)]
    groups = summarise(records, warnings)
    by_scenario = scenarios(groups)
    images: list[Path] = []
    sections: list[Section] = []
    for kind in ("lm", "classify"):
        keys = [k for k in by_scenario if k[0] == kind]
        if not keys:
            continue
        top = Section(KIND_TITLE[kind], [Para(METRIC_NOTES[kind]), Para(UNCERTAINTY_NOTE)])
        png = plots.plot_asr_utility(by_scenario, kind, out / f"asr_utility_{kind}.png")
        images.append(png)
        top.blocks.append(Image(png, f"ASR and utility per defense ({kind})",
                                "ASR, clean utility and utility on triggered inputs, for the backdoored model and "
                                f"after each defense (error bars: {CONFIDENCE:.0%} intervals: Wilson over the test "
                                "inputs for one seed, Student-t over seeds for several)."))
        sections.append(top)
        for key in keys:
            sections += _scenario_sections(key, by_scenario[key], out, cfg, warnings, images)
    scans = scan_section(paths, out, cfg.digits)  # issue 18: scan folders under the same paths
    if scans is not None:
        sections.append(scans[0])
        images += scans[1]
    if warnings:
        sections.append(Section("Warnings", [Para(w) for w in warnings]))
    sections.append(Section("Runs", [Table(["kind", "attack", "task", "defense", "settings", "seed", "folder"],
                                           [[r.kind, r.attack, r.task or "", r.defense, g.settings_text, str(r.seed),
                                             str(r.path)] for g in groups for r in g.runs], name="runs")]))
    _unique_names(sections)
    tables = _export(sections, out / "tables")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = (f"{len(records)} run(s) in {len(by_scenario)} scenario(s); generated {stamp} by unbackdoor. "
                f"Every table is also in tables/ as CSV and LaTeX.")
    html_path = atomic_write_text(out / "report.html", render_html(cfg.title, subtitle, sections))
    md_path = atomic_write_text(out / "report.md", render_markdown(cfg.title, subtitle, sections, out))
    summary = atomic_write_json(out / "summary.json", {MARKER_KEY: "report", "groups": [g.to_json() for g in groups],
                                                       "warnings": warnings})
    for w in warnings:
        log.warning(w)
    return ReportResult(html_path, md_path, summary, images, groups, warnings, tables)


def kind_tables(groups: list[GroupSummary], kind: str, digits: int = 3) -> list[tuple[str, Table]]:
    """(scenario name, table) for every scenario of ``kind``: what the demo prints."""
    by = scenarios(groups)
    return [(" / ".join(p for p in k[1:] if p), scenario_table(k, by[k], digits)[0]) for k in by if k[0] == kind]
