"""Run folders in, ``report.html`` + ``report.md`` + PNG plots out."""
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
from ..core.runs import atomic_write_json, atomic_write_text
from ..core.stats import fmt_mean_std
from . import plots
from .collect import GroupSummary, RunRecord, backdoored_baseline, find_run_dirs, load_run, scenarios, summarise
from .render import Image, Para, Section, Table, render_html, render_markdown

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


@dataclasses.dataclass
class ReportConfig:
    """How the report reads run folders and what it shows."""

    title: str = option("unbackdoor report", "the page title")
    digits: int = option(3, "decimals shown for every metric")
    max_generations: int = option(8, "example generations shown per LM scenario and defense")
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


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", "-".join(p for p in parts if p)).strip("-").lower() or "x"


def _cell(stats: dict[str, Any], key: str, n_seeds: int, digits: int) -> str:
    s = stats.get(key)
    if not s:
        return "n/a"
    if n_seeds == 1:  # one seed has no spread to show: "± 0.000" would claim one
        return "n/a" if math.isnan(float(s["mean"])) else f"{float(s['mean']):.{digits}f}"
    text = fmt_mean_std(float(s["mean"]), float(s["std"]), digits)
    if 0 < s.get("n", n_seeds) < n_seeds:
        text += f" (n={s['n']})"
    return text


def _columns(kind: str, groups: list[GroupSummary]) -> list[tuple[str, str, str]]:
    present = set()
    for g in groups:
        present |= set(g.before) | set(g.after)
    return [c for c in METRIC_COLUMNS[kind] if c[0] not in OPTIONAL_METRICS or c[0] in present]


def scenario_table(key: tuple[str, str, str], groups: list[GroupSummary], digits: int = 3) -> tuple[Table, list[str]]:
    """The before/after table of one scenario: the backdoored model, then one row per defense."""
    kind = key[0]
    cols = _columns(kind, groups)
    base, base_seeds, notes = backdoored_baseline(groups)
    header = ["model", "seeds"] + [f"{h} {arrow}" for _, h, arrow in cols] + ["seconds"]
    rows = [["backdoored (before)", ", ".join(map(str, base_seeds))]
            + [("n/a" if k == "der" else _cell(base, k, len(base_seeds), digits)) for k, _, _ in cols] + [""]]
    for g in groups:
        sec = g.seconds
        sec_text = "n/a" if not sec or math.isnan(sec.get("mean", float("nan"))) else f"{sec['mean']:.0f}"
        rows.append([g.defense, ", ".join(map(str, g.seeds))]
                    + [_cell(g.after, k, len(g.seeds), digits) for k, _, _ in cols] + [sec_text])
    caption = (f"mean ± sample std over seeds (one seed: its value); (n=k): only k seeds gave a number; "
               f"↓ lower is better, "
               f"↑ higher is better; seconds: defense wall time per run (mean).")
    return Table(header, rows, caption), notes


def text_table(table: Table) -> str:
    """A plain-text rendering for terminals (the demo prints one per kind)."""
    widths = [max(len(str(r[i])) for r in [table.header] + table.rows) for i in range(len(table.header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(table.header), "  ".join("-" * w for w in widths)] + [line(r) for r in table.rows])


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


def _generation_rows(gens: list[dict[str, Any]], limit: int) -> list[list[str]]:
    """Up to ``limit`` examples, alternating triggered and clean prompts when both exist."""
    trig = [g for g in gens if isinstance(g, dict) and g.get("triggered")]
    clean = [g for g in gens if isinstance(g, dict) and not g.get("triggered")]
    picked: list[dict[str, Any]] = []
    while len(picked) < limit and (trig or clean):
        for pool in (trig, clean):
            if pool and len(picked) < limit:
                picked.append(pool.pop(0))
    def text(v: Any) -> str:
        return "(empty)" if v is None or str(v) == "" else str(v)

    return [["yes" if g.get("triggered") else "no", text(g.get("prompt")), text(g.get("reference")),
             text(g.get("before")), text(g.get("after"))] for g in picked]


def _scenario_sections(key: tuple[str, str, str], groups: list[GroupSummary], out: Path, cfg: ReportConfig,
                       warnings: list[str], images: list[Path]) -> list[Section]:
    kind, attack, task = key
    name = " / ".join(p for p in (attack, task) if p)
    sections = []
    table, notes = scenario_table(key, groups, cfg.digits)
    sec = Section(f"{kind}: {name}", [table], level=3)
    sec.blocks += [Para("Note: " + n) for n in notes]
    sections.append(sec)

    for g in groups:
        label = f"{kind}: {name}, defense {g.defense}"
        profiles = [p for r in g.runs if isinstance(p := r.artifact("layer_cosine.json", warnings), dict)]
        if profiles:
            seeds = f"seed {g.seeds[0]}" if len(g.seeds) == 1 else f"seeds {', '.join(map(str, g.seeds))}"
            png = plots.plot_layer_cosine(profiles, f"{label} ({seeds})",
                                          out / f"layer_cosine_{_slug(kind, attack, task, g.defense)}.png")
            images.append(png)
            sec.blocks.append(Image(png, f"layer cosine {label}",
                                    "Consecutive-layer cosine similarity per layer pair (mean over prompts; band: "
                                    "std over seeds), and its gap between clean and triggered prompts. A backdoor "
                                    "shows as triggered prompts losing consistency (a positive gap); CROW aims to "
                                    "close the gap."))
        sels = [(r.seed, s) for r in g.runs if isinstance(s := r.artifact("ulrl_selection.json", warnings), dict)
                and isinstance(s.get("scores"), list)]
        if sels:
            png = plots.plot_ulrl_selection(sels[:4], f"ULRL neuron selection — {label}",
                                            out / f"ulrl_selection_{_slug(kind, attack, task, g.defense)}.png")
            images.append(png)
            statuses = ", ".join(f"seed {s}: {sel.get('status', '?')} (selected {sel.get('selected', [])})"
                                 for s, sel in sels)
            sec.blocks.append(Image(png, f"ULRL selection {label}",
                                    "Per-neuron weight change of the classifier head after unlearning; red bars are "
                                    "the neurons re-initialised; dashed line: median + z·1.4826·MAD. "
                                    + (f"Shown: the first 4 of {len(sels)} seeds. " if len(sels) > 4 else "")
                                    + "Status per seed: " + statuses + "."))
        traces = [(r.seed, t) for r in g.runs if isinstance(t := r.artifact("unlearn_trace.json", warnings), dict)]
        if traces:
            cfg_json = g.runs[0].artifact("config.json", warnings)
            stop = (cfg_json.get("config") or {}).get("unlearn_stop_acc") if isinstance(cfg_json, dict) else None
            stop = float(stop) if isinstance(stop, (int, float)) and not isinstance(stop, bool) else None
            png = plots.plot_unlearn_trace(traces, f"ULRL unlearning — {label}",
                                           out / f"unlearn_trace_{_slug(kind, attack, task, g.defense)}.png", stop)
            images.append(png)
            missed = [s for s, t in traces if t.get("reached") is False]
            sec.blocks.append(Image(png, f"unlearning trace {label}",
                                    "Clean-subset accuracy while ULRL maximises the loss; unlearning stops once it "
                                    "falls to the threshold."
                                    + (f" Seeds {', '.join(map(str, missed))} never reached it: their neuron scores "
                                       "come from a partly unlearned model." if missed else "")))
        if kind == "lm" and cfg.max_generations > 0:
            first = g.runs[0]
            gens = first.artifact("generations.json", warnings)
            if isinstance(gens, list) and gens:
                rows = _generation_rows(gens, cfg.max_generations)
                sec.blocks.append(Table(["triggered", "prompt", "reference", "before", "after"], rows,
                                        f"Example generations, {label}, seed {first.seed} (greedy decoding; "
                                        f"{len(rows)} of {len(gens)}).", numeric=False))
    return sections


def build_report(paths: Iterable[str | Path], out_dir: str | Path, config: ReportConfig | None = None) -> ReportResult:
    """Find every run under ``paths`` and write ``report.html``, ``report.md``, ``summary.json`` and PNGs to ``out_dir``."""
    cfg = config or ReportConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []
    paths = list(paths)
    records = load_runs(paths, skip_invalid=cfg.skip_invalid, warnings=warnings)
    groups = summarise(records)
    by_scenario = scenarios(groups)
    images: list[Path] = []
    sections: list[Section] = []
    for kind in ("lm", "classify"):
        keys = [k for k in by_scenario if k[0] == kind]
        if not keys:
            continue
        top = Section(KIND_TITLE[kind], [Para(METRIC_NOTES[kind])])
        png = plots.plot_asr_utility(by_scenario, kind, out / f"asr_utility_{kind}.png")
        images.append(png)
        top.blocks.append(Image(png, f"ASR and utility per defense ({kind})",
                                "ASR, clean utility and utility on triggered inputs, for the backdoored model and "
                                "after each defense (error bars: std over seeds)."))
        sections.append(top)
        for key in keys:
            sections += _scenario_sections(key, by_scenario[key], out, cfg, warnings, images)
    if warnings:
        sections.append(Section("Warnings", [Para(w) for w in warnings]))
    sections.append(Section("Runs", [Table(["kind", "attack", "task", "defense", "seed", "folder"],
                                           [[r.kind, r.attack, r.task or "", r.defense, str(r.seed), str(r.path)]
                                            for g in groups for r in g.runs])]))
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"{len(records)} run(s) in {len(by_scenario)} scenario(s); generated {stamp} by unbackdoor."
    html_path = atomic_write_text(out / "report.html", render_html(cfg.title, subtitle, sections))
    md_path = atomic_write_text(out / "report.md", render_markdown(cfg.title, subtitle, sections, out))
    summary = atomic_write_json(out / "summary.json", {"groups": [g.to_json() for g in groups],
                                                       "warnings": warnings})
    for w in warnings:
        log.warning(w)
    return ReportResult(html_path, md_path, summary, images, groups, warnings)


def kind_tables(groups: list[GroupSummary], kind: str, digits: int = 3) -> list[tuple[str, Table]]:
    """(scenario name, table) for every scenario of ``kind``: what the demo prints."""
    by = scenarios(groups)
    return [(" / ".join(p for p in k[1:] if p), scenario_table(k, by[k], digits)[0]) for k in by if k[0] == kind]
