"""The report: tables with mean ± std over seeds, every plot embedded, robust to gaps, opens in a browser.

Run folders here are synthetic fixtures (tests/conftest.py), not results.
"""
from __future__ import annotations

import base64
import json
import math
import re
import statistics
from pathlib import Path

import pytest

from conftest import assert_report_loads, console_messages, open_in_chromium, write_synthetic_run
from unbackdoor.core.errors import DataError
from unbackdoor.report import (ReportConfig, build_report, check_run_dir, find_run_dirs, load_run, summarise,
                               validate_run_dir)
from unbackdoor.report.plots import ulrl_cutoff
from unbackdoor.report.render import Para, Section, Table, render_markdown

def _metric(runs: Path, pattern: str, side: str, key: str) -> list[float]:
    return [json.loads((d / "metrics.json").read_text())[side][key] for d in sorted(runs.glob(pattern))]


def test_table_shows_mean_std_over_seeds_and_the_seed_list(synthetic_runs: Path, tmp_path: Path):
    res = build_report([synthetic_runs], tmp_path / "rep")
    md = res.markdown.read_text()
    for pattern, defense in (("lm-badnet-crow-seed*", "crow"), ("classify-badnets-ulrl-seed*", "ulrl")):
        vals = _metric(synthetic_runs, pattern, "after", "asr")
        expected = f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"
        row = next(line for line in md.splitlines() if line.startswith(f"| {defense} |"))
        assert "| 0, 1, 2 |" in row and expected in row, (row, expected)
    # the backdoored row: each seed's before-metrics once
    before = _metric(synthetic_runs, "lm-badnet-crow-seed*", "before", "asr")
    row = next(line for line in md.splitlines() if line.startswith("| backdoored (before) |") and "0.95" in line)
    assert f"{statistics.mean(before):.3f} ± {statistics.stdev(before):.3f}" in row
    summary = json.loads(res.summary.read_text())
    crow = next(g for g in summary["groups"] if g["defense"] == "crow")
    assert crow["seeds"] == [0, 1, 2] and crow["after"]["asr"]["values"] == _metric(
        synthetic_runs, "lm-badnet-crow-seed*", "after", "asr")


def test_html_is_self_contained_and_embeds_every_plot(synthetic_runs: Path, tmp_path: Path):
    res = build_report([synthetic_runs], tmp_path / "rep")
    html = res.html.read_text()
    names = {p.name for p in res.images}
    # the bar chart per kind, the CROW diagnostic, and both ULRL plots
    assert {"asr_utility_lm.png", "asr_utility_classify.png", "layer_cosine_lm-badnet-refusal-crow.png",
            "ulrl_selection_classify-badnets-ulrl.png", "unlearn_trace_classify-badnets-ulrl.png"} <= names
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert len(srcs) == len(res.images)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(https?:|//|file:)', html)  # nothing fetched from anywhere
    md = res.markdown.read_text()
    for p in res.images:
        assert p.is_file() and p.parent == res.html.parent
        assert f"]({p.name})" in md


def test_generations_are_escaped(synthetic_runs: Path, tmp_path: Path):
    res = build_report([synthetic_runs], tmp_path / "rep")
    html, md = res.html.read_text(), res.markdown.read_text()
    # the drill-down's JSON cannot close its <script> element; the page's script writes text nodes only
    assert "<script>alert(1)</script>" not in html and "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in html
    assert "<b>cat</b>" not in md and "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert "\\|" in md  # a pipe inside a cell does not break the table


def test_missing_artifacts_and_nan_metrics_are_shown_not_hidden(tmp_path: Path):
    runs = tmp_path / "runs"
    write_synthetic_run(runs, defense="crow", seed=0, artifacts=False, nan_metric="triggered_utility")
    write_synthetic_run(runs, defense="crow", seed=1, artifacts=False)
    write_synthetic_run(runs, defense="crow", seed=2, artifacts=False, nan_metric="clean_utility")
    write_synthetic_run(runs, defense="finetune", seed=0, artifacts=False, nan_metric="asr")
    res = build_report([runs], tmp_path / "rep")
    md = res.markdown.read_text()
    crow = next(line for line in md.splitlines() if line.startswith("| crow |"))
    assert "(n=2)" in crow  # two of three seeds gave a number
    finetune = next(line for line in md.splitlines() if line.startswith("| finetune |"))
    assert "n/a" in finetune
    assert [p.name for p in res.images] == ["asr_utility_lm.png"]  # no artifact, no plot, no crash


def test_disagreeing_backdoored_metrics_are_reported(tmp_path: Path):
    runs = tmp_path / "runs"
    write_synthetic_run(runs, defense="crow", seed=0, artifacts=False)
    ft = write_synthetic_run(runs, defense="finetune", seed=0, artifacts=False)
    m = json.loads((ft / "metrics.json").read_text())
    m["before"]["clean_utility"] = 0.5
    (ft / "metrics.json").write_text(json.dumps(m))
    md = build_report([runs], tmp_path / "rep").markdown.read_text()
    assert "seed 0: 'clean_utility' of the backdoored model differs between defense runs" in md


def test_malformed_optional_artifact_becomes_a_warning(synthetic_runs: Path, tmp_path: Path):
    run = next(synthetic_runs.glob("lm-badnet-crow-seed0"))
    (run / "layer_cosine.json").write_text("{not json")
    res = build_report([synthetic_runs], tmp_path / "rep")
    assert any("layer_cosine.json" in w for w in res.warnings)
    assert "Warnings" in res.markdown.read_text()


def test_two_runs_of_the_same_group_and_seed_are_an_error(tmp_path: Path):
    write_synthetic_run(tmp_path / "a", defense="crow", seed=0)
    write_synthetic_run(tmp_path / "b", defense="crow", seed=0)
    with pytest.raises(DataError, match="two runs of lm/badnet/refusal/crow with seed 0"):
        build_report([tmp_path / "a", tmp_path / "b"], tmp_path / "rep")


def test_no_runs_found_is_an_error_that_says_what_to_pass(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        build_report([tmp_path / "empty"], tmp_path / "rep")
    assert "no run folders" in e.value.problem and "unbackdoor" in (e.value.fix or "")
    with pytest.raises(DataError, match="path not found"):
        build_report([tmp_path / "nowhere"], tmp_path / "rep")


def test_malformed_metrics_names_file_and_field_or_is_skipped(synthetic_runs: Path, tmp_path: Path):
    bad = next(synthetic_runs.glob("lm-badnet-crow-seed1"))
    m = json.loads((bad / "metrics.json").read_text())
    m["seed"] = "one"
    (bad / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(DataError) as e:
        load_run(bad)
    assert "'seed'" in e.value.problem and str(bad / "metrics.json") in (e.value.where or "")
    with pytest.raises(DataError):
        build_report([synthetic_runs], tmp_path / "rep")
    res = build_report([synthetic_runs], tmp_path / "rep", ReportConfig(skip_invalid=True))
    assert any("skipped" in w and "seed1" in w for w in res.warnings)
    crow = next(g for g in res.groups if g.defense == "crow")
    assert crow.seeds == [0, 2]


def test_validate_run_dir_accepts_the_contract_and_names_each_breach(synthetic_runs: Path):
    dirs = find_run_dirs([synthetic_runs])
    assert len(dirs) == 12 and all(validate_run_dir(d) == [] for d in dirs)
    run = next(synthetic_runs.glob("classify-badnets-ulrl-seed0"))
    (run / "clean_indices.json").unlink()
    m = json.loads((run / "metrics.json").read_text())
    del m["after"]["der"], m["before"]["ra"]
    (run / "metrics.json").write_text(json.dumps(m))
    (run / "ulrl_selection.json").write_text(json.dumps({"scores": [1, 2], "selected": [0], "status": "maybe"}))
    problems = validate_run_dir(run)
    assert "missing clean_indices.json" in problems
    assert "metrics.json: 'before' lacks 'ra'" in problems
    assert "metrics.json: 'after' lacks 'der'" in problems
    assert any("status" in p for p in problems)
    with pytest.raises(DataError, match="breaks the contract"):
        check_run_dir(run)


def test_hidden_temporary_folders_are_not_runs(synthetic_runs: Path):
    write_synthetic_run(synthetic_runs / ".model.tmp-1234", defense="crow", seed=9)
    assert all(".tmp-" not in str(d) for d in find_run_dirs([synthetic_runs]))


def test_ulrl_cutoff_is_median_plus_z_times_scaled_mad():
    assert ulrl_cutoff({"median": 1.0, "mad": 0.2, "threshold": 3.5}) == pytest.approx(1.0 + 3.5 * 1.4826 * 0.2)
    assert ulrl_cutoff({"median": 1.0, "mad": 0.0, "threshold": 3.5}) is None  # MAD = 0: no finite cut-off
    # ULRL's fallback sigma (mean absolute deviation when MAD = 0) is used when the selection records it
    assert ulrl_cutoff({"median": 1.0, "mad": 0.0, "scale": 0.5, "threshold": 3.5}) == pytest.approx(2.75)
    assert ulrl_cutoff({"median": 1.0}) is None


def test_markdown_table_cells_cannot_break_the_table(tmp_path: Path):
    sec = Section("s", [Table(["a", "b"], [["x | y", "line1\nline2"]]), Para("<i>p</i>")])
    md = render_markdown("t", "sub", [sec], tmp_path)
    assert "| x \\| y | line1<br>line2 |" in md and "&lt;i&gt;p&lt;/i&gt;" in md


def test_summarise_groups_by_kind_attack_task_defense(synthetic_runs: Path):
    groups = summarise(load_run(d) for d in find_run_dirs([synthetic_runs]))
    keys = [(g.kind, g.attack, g.task, g.defense) for g in groups]
    assert keys == [("lm", "badnet", "refusal", "finetune"), ("lm", "badnet", "refusal", "crow"),
                    ("classify", "badnets", "", "ft"), ("classify", "badnets", "", "ulrl")]
    for g in groups:
        vals = [r.after["asr"] for r in g.runs]
        assert g.after["asr"]["mean"] == pytest.approx(statistics.mean(vals))
        assert g.after["asr"]["std"] == pytest.approx(statistics.stdev(vals))
        assert not any(math.isnan(v) for v in g.after["asr"]["values"])


# ---- the report in a real browser (fixtures in conftest.py) ----------------------------------------

def test_report_opens_in_headless_chromium_and_every_image_loads(chromium: str, synthetic_runs: Path,
                                                                  tmp_path: Path):
    res = build_report([synthetic_runs], tmp_path / "rep")
    assert_report_loads(chromium, res.html, len(res.images), tmp_path)


def test_the_browser_check_catches_broken_images_js_errors_and_external_loads(chromium: str, synthetic_runs: Path,
                                                                               tmp_path: Path):
    res = build_report([synthetic_runs], tmp_path / "rep")
    html = res.html.read_text()
    broken = re.sub(r'src="data:image/png;base64,[^"]{40}', 'src="data:image/png;base64,AAAA', html, count=1)
    (tmp_path / "broken.html").write_text(broken)
    dom, log = open_in_chromium(chromium, tmp_path / "broken.html", tmp_path)
    assert 'data-images-loaded="false"' in dom and not console_messages(log)
    hostile = html.replace("</body>", '<img alt="x" src="https://example.com/x.png"><script>nope()</script></body>')
    (tmp_path / "hostile.html").write_text(hostile)
    dom, log = open_in_chromium(chromium, tmp_path / "hostile.html", tmp_path)
    msgs = console_messages(log)
    assert any("example.com" in m and "blocked" in m for m in msgs), msgs  # the CSP keeps the page offline
    assert any("inline script" in m for m in msgs), msgs  # only the report's own script may run


# ---- results a paper can rest on: variants, intervals, every example, exports, schema ----------------

from conftest import CLASS_NAMES, write_generations, write_predictions  # noqa: E402
from unbackdoor.core.stats import t_interval, wilson_interval  # noqa: E402
from unbackdoor.report.exports import latex_escape, read_csv_table, table_latex  # noqa: E402
from unbackdoor.report.layer_cosine import describe, summarise_profiles  # noqa: E402
from unbackdoor.report.schema import AGGREGATE_SCHEMA, SUMMARY_SCHEMA, validate  # noqa: E402


def _row(md: str, start: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(start))


def _crow_variants(root: Path, seeds=(0, 1)) -> None:
    for seed in seeds:
        for alpha in (5.5, 11.0):
            # the backdoored model's path changes with the seed alone: not a setting
            write_synthetic_run(root, defense="crow", seed=seed, name=f"crow-a{alpha}-s{seed}", artifacts=False,
                                settings={"defense": {"alpha": alpha, "epsilon": 0.1},
                                          "model": f"runs/attack-seed{seed}/model"})


def test_two_settings_of_one_defense_and_seed_are_reported_side_by_side(tmp_path: Path):
    _crow_variants(tmp_path / "runs")
    res = build_report([tmp_path / "runs"], tmp_path / "rep")
    crow = [g for g in res.groups if g.defense == "crow"]
    assert [g.settings for g in crow] == [(("alpha", "5.5"),), (("alpha", "11"),)]  # by value, not as text
    assert all(g.seeds == [0, 1] for g in crow)
    md = res.markdown.read_text()
    assert "| settings |" in _row(md, "| model |")
    assert "| crow | alpha=5.5 | 0, 1 |" in md and "| crow | alpha=11 | 0, 1 |" in md
    summary = json.loads(res.summary.read_text())
    assert [g["settings"] for g in summary["groups"]] == [{"alpha": "5.5"}, {"alpha": "11"}]


def test_a_preset_name_stands_for_the_settings_it_decides(tmp_path: Path):
    for v, lr in (("paper", 0.01), ("kept", 0.001)):
        write_synthetic_run(tmp_path / "runs", kind="classify", attack="badnets", defense="ulrl", task=None,
                            variant=v, settings={"relearn_lr": lr}, name=f"ulrl-{v}", artifacts=False)
    groups = summarise(load_run(d) for d in find_run_dirs([tmp_path / "runs"]))
    assert sorted(g.settings for g in groups) == [(("preset", "kept"),), (("preset", "paper"),)]
    assert {g.label for g in groups} == {"ulrl (preset=kept)", "ulrl (preset=paper)"}


def test_runs_identical_in_settings_and_seed_are_an_error_naming_both_folders(tmp_path: Path):
    a = write_synthetic_run(tmp_path / "a", defense="crow", seed=0, settings={"alpha": 11.0})
    b = write_synthetic_run(tmp_path / "b", defense="crow", seed=0, settings={"alpha": 11.0})
    with pytest.raises(DataError) as e:
        build_report([tmp_path / "a", tmp_path / "b"], tmp_path / "rep")
    assert str(a.resolve()) in e.value.problem and str(b.resolve()) in e.value.problem


def test_one_run_shows_each_rate_with_its_wilson_interval_and_n(tmp_path: Path):
    run = write_synthetic_run(tmp_path / "runs", kind="classify", attack="badnets", defense="ft", task=None,
                              artifacts=False)
    res = build_report([tmp_path / "runs"], tmp_path / "rep")
    md = res.markdown.read_text()
    after = json.loads((run / "metrics.json").read_text())["after"]
    lo, hi = wilson_interval(round(after["asr"] * 900), 900)
    assert f"{after['asr']:.3f}<br>[{lo:.3f}, {hi:.3f}]" in _row(md, "| ft |")
    assert "ASR ↓<br>n=900" in _row(md, "| model |") and "ACC ↑<br>n=1000" in _row(md, "| model |")
    stats = next(g for g in res.groups if g.defense == "ft").after
    assert stats["asr"]["ci"]["method"] == "wilson" and stats["asr"]["n_inputs"] == [900]
    assert stats["der"]["ci"] is None  # DER is not a rate of test inputs


def test_a_mean_over_seeds_shows_its_t_interval(synthetic_runs: Path, tmp_path: Path):
    res = build_report([synthetic_runs], tmp_path / "rep")
    vals = _metric(synthetic_runs, "lm-badnet-crow-seed*", "after", "asr")
    lo, hi = t_interval(vals)
    assert f"<br>[{lo:.3f}, {hi:.3f}]" in _row(res.markdown.read_text(), "| crow |")
    ci = next(g for g in res.groups if g.defense == "crow").after["asr"]["ci"]
    assert ci["method"] == "t" and ci["low"] == pytest.approx(lo)


def _classifier_with_predictions(root: Path, n: int = 40) -> Path:
    """A run whose metrics are exactly those of its predictions.json (so n can be derived from it)."""
    run = write_synthetic_run(root, kind="classify", attack="badnets", defense="ulrl", task=None, counts=False,
                              artifacts=False)
    labels = [i % 10 for i in range(n)]
    before = list(labels)
    after = [5 if i == 10 else 0 if i % 4 == 0 else y for i, y in enumerate(labels)]  # 9 changed to 0, one to 5
    tl = [1 + i % 9 for i in range(n)]
    tb, ta = [0] * n, [0 if i < 4 else y for i, y in enumerate(tl)]
    write_predictions(run, (labels, before, after), (tl, [0] * n, tb, ta), CLASS_NAMES)
    m = json.loads((run / "metrics.json").read_text())
    acc = lambda p, y: sum(a == b for a, b in zip(p, y)) / len(y)  # noqa: E731
    m["before"].update(acc=acc(before, labels), asr=1.0, ra=0.0, target_recall=1.0)
    m["after"].update(acc=acc(after, labels), asr=4 / n, ra=acc(ta, tl), target_recall=3 / 4)
    (run / "metrics.json").write_text(json.dumps(m))
    return run


def test_n_comes_from_the_artifacts_only_when_every_rate_is_a_whole_number_of_them(tmp_path: Path):
    _classifier_with_predictions(tmp_path / "cls")
    g = summarise(load_run(d) for d in find_run_dirs([tmp_path / "cls"]))[0]
    assert g.after["acc"]["n_inputs"] == [40] and g.after["asr"]["n_inputs"] == [40]
    assert g.after["target_recall"]["n_inputs"] == [4]  # the clean images of the target class
    # an LM run that kept a sample of its generations: 2 prompts cannot be the n behind ASR 0.97...
    run = write_synthetic_run(tmp_path / "lm", counts=False)
    g = summarise(load_run(d) for d in find_run_dirs([tmp_path / "lm"]))[0]
    assert g.after["asr"]["n_inputs"] is None and g.after["asr"]["ci"] is None
    # ...nor behind a rate of 0 or 1 (a whole multiple of any n) when the rest of its population rules it out
    m = json.loads((run / "metrics.json").read_text())
    m["after"].update(triggered_utility=0.0, asr=1.0, strict_asr=1.0)
    m["before"].update(triggered_utility=0.0, asr=1.0, strict_asr=0.5)  # 0.5: whole for n = 2, but 0.97 below
    m["before"]["asr"] = 0.97
    (run / "metrics.json").write_text(json.dumps(m))
    g = summarise(load_run(d) for d in find_run_dirs([tmp_path / "lm"]))[0]
    assert g.after["triggered_utility"]["n_inputs"] is None and g.after["strict_asr"]["n_inputs"] is None
    m["before"]["asr"] = 1.0  # only 0s, 1s and 0.5: n = 1 triggered generation... 0.5 is not whole for 1
    (run / "metrics.json").write_text(json.dumps(m))
    g = summarise(load_run(d) for d in find_run_dirs([tmp_path / "lm"]))[0]
    assert g.after["asr"]["n_inputs"] is None
    md = build_report([tmp_path / "lm"], tmp_path / "rep").markdown.read_text()
    assert "ASR ↓<br>n unknown" in md


def test_the_drill_down_holds_every_example_changed_answers_first(tmp_path: Path):
    run = write_synthetic_run(tmp_path / "runs", artifacts=False)
    rows = [(f"q{i}", f"r{i}", i % 2 == 0, "sorry" if i % 2 == 0 else f"r{i}", f"r{i}") for i in range(30)]
    write_generations(run, rows)
    res = build_report([tmp_path / "runs"], tmp_path / "rep")
    html = res.html.read_text()
    data = json.loads(re.search(r'<script type="application/json">(.*?)</script>', html, re.S).group(1))
    got = data["runs"][0]["rows"]
    assert len(got) == 30 and [r[1] for r in got] == [True] * 15 + [False] * 15
    assert got[0] == ["triggered", True, "q0", "r0", "sorry", "r0"]
    csv_path = tmp_path / "rep" / "tables" / "examples-lm-badnet-refusal-crow-seed-0.csv"
    header, back = read_csv_table(csv_path.read_text())
    assert header == ["set", "prompt", "reference", "before", "after", "changed"] and len(back) == 30


def test_class_names_replace_indices_in_tables_plots_and_examples(tmp_path: Path):
    run = _classifier_with_predictions(tmp_path / "runs")
    write_synthetic_run(tmp_path / "runs", kind="classify", attack="badnets", defense="ft", task=None)
    res = build_report([tmp_path / "runs"], tmp_path / "rep")
    md = res.markdown.read_text()
    assert "| model | seeds | airplane | automobile | bird |" in md  # per-class accuracy table
    html = res.html.read_text()
    data = json.loads(re.search(r'<script type="application/json">(.*?)</script>', html, re.S).group(1))
    assert {r[3] for r in data["runs"][0]["rows"]} <= set(CLASS_NAMES)
    (run / "predictions.json").unlink()  # no names anywhere: indices
    md = build_report([tmp_path / "runs"], tmp_path / "rep2").markdown.read_text()
    assert "| model | seeds | 0 | 1 | 2 |" in md


def test_every_table_is_exported_as_csv_that_reads_back_and_latex(synthetic_runs: Path, tmp_path: Path):
    res = build_report([synthetic_runs], tmp_path / "rep")
    tables = tmp_path / "rep" / "tables"
    names = {p.name for p in res.tables}
    assert {"lm-badnet-refusal.csv", "lm-badnet-refusal.tex", "classify-badnets.csv", "runs.csv",
            "classify-badnets-per-class.tex"} <= names
    from unbackdoor.report.build import scenario_table
    from unbackdoor.report.collect import scenarios

    key = ("lm", "badnet", "refusal")
    table, _ = scenario_table(key, scenarios(res.groups)[key])
    header, rows = read_csv_table((tables / "lm-badnet-refusal.csv").read_text())
    assert header == table.header and rows == table.rows  # multi-line cells survive
    tex = (tables / "lm-badnet-refusal.tex").read_text()
    assert tex.startswith("\\begin{table}") and "$\\pm$" in tex and "\\\\ {[}" in tex


def test_latex_escapes_every_special_character():
    assert latex_escape("a_b 5% R&D #1 $x {y} ~ ^ \\") == \
        "a\\_b 5\\% R\\&D \\#1 \\$x \\{y\\} \\textasciitilde{} \\textasciicircum{} \\textbackslash{}"
    tex = table_latex(Table(["run_dir", "ASR ↓"], [["seed_0 (50%)", "0.5 ± 0.1\n[0.2, 0.8]"]], "n & caption #"))
    assert "seed\\_0 (50\\%)" in tex and "\\caption{n \\& caption \\#}" in tex
    assert "0.5 $\\pm$ 0.1 \\\\ {[}0.2, 0.8{]}" in tex  # '[' after '\\' would be read as a length


def test_latex_export_compiles_when_pdflatex_is_installed(synthetic_runs: Path, tmp_path: Path):
    import shutil
    import subprocess

    if not shutil.which("pdflatex"):
        pytest.skip("pdflatex is not installed (apt-get install texlive-latex-base to run this check)")
    build_report([synthetic_runs], tmp_path / "rep")
    body = "\n".join(p.read_text() for p in sorted((tmp_path / "rep" / "tables").glob("*.tex")))
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage[utf8]{inputenc}\n\\begin{document}\n" + body
                   + "\n\\end{document}\n")
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:]


def test_summary_and_aggregate_follow_their_documented_schemas(synthetic_runs: Path, tmp_path: Path):
    res = build_report([synthetic_runs], tmp_path / "rep")
    summary = json.loads(res.summary.read_text())
    assert validate(summary, SUMMARY_SCHEMA) == []
    from unbackdoor.sweep import SweepConfig, sweep

    def runner(out_dir, *, seed, attack, task, defenses, quick, echo=True):
        for d in defenses:
            write_synthetic_run(Path(out_dir) / d, defense=d, seed=seed, attack=attack, task=task)

    agg = json.loads(sweep(tmp_path / "sw", SweepConfig(kind="lm", seeds=[0, 1], report=False),
                           runner=runner).aggregate.read_text())
    assert validate(agg, AGGREGATE_SCHEMA) == []
    broken = json.loads(json.dumps(summary))
    broken["groups"][0]["seeds"] = "0, 1"
    del broken["groups"][1]["after"]["asr"]["ci"]
    problems = validate(broken, SUMMARY_SCHEMA)
    assert "$.groups[0].seeds: expected array, got str" in problems
    assert "$.groups[1].after.asr: missing 'ci'" in problems
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.Draft202012Validator.check_schema(SUMMARY_SCHEMA)
    jsonschema.validate(summary, SUMMARY_SCHEMA)  # the standard validator agrees
    jsonschema.validate(agg, AGGREGATE_SCHEMA)
    assert not jsonschema.Draft202012Validator(SUMMARY_SCHEMA).is_valid(broken)


def _profile(before_gap: list[float], after_gap: list[float], n_prompts: int = 10) -> dict:
    import random

    rng = random.Random(0)
    layers = len(before_gap)
    def rows(gap: list[float]) -> list[list[float]]:
        return [[0.9 - gap[i] + rng.gauss(0, 0.005) for i in range(layers)] for _ in range(n_prompts)]
    per = {"before": {"clean": rows([0.0] * layers), "triggered": rows(before_gap)},
           "after": {"clean": rows([0.0] * layers), "triggered": rows(after_gap)}}
    means = {side: {k: [sum(c) / len(c) for c in zip(*v)] for k, v in per[side].items()} for side in per}
    return {**means, "per_prompt": per}


def test_the_cosine_caption_says_what_this_runs_data_show():
    text = describe(summarise_profiles([_profile([0.0, 0.03, 0.12, 0.05], [0.0, 0.01, 0.02, 0.01])]), "crow")
    m = re.search(r"largest at layer 3 \(([\d.]+), 95% CI [\d.]+ to [\d.]+\); crow reduces it: ([\d.]+)", text)
    assert m and float(m.group(1)) == pytest.approx(0.12, abs=0.005) and float(m.group(2)) == pytest.approx(0.02, abs=0.005)
    assert "interquartile range over prompts" in text
    widened = describe(summarise_profiles([_profile([0.0, 0.03, 0.12, 0.05], [0.0, 0.05, 0.2, 0.05])]), "crow")
    assert "crow widens it" in widened and "reduces" not in widened
    same = describe(summarise_profiles([_profile([0.0, 0.03, 0.12, 0.05], [0.0, 0.03, 0.12, 0.05])]), "crow")
    assert "leaves it within the 95% intervals" in same
    none = describe(summarise_profiles([_profile([0.0, -0.02, -0.01, 0.0], [0.0, 0.0, 0.0, 0.0])]), "crow")
    assert "does not show the signature" in none and "reduces" not in none
    means_only = _profile([0.0, 0.03, 0.12, 0.05], [0.0, 0.01, 0.02, 0.01])
    del means_only["per_prompt"]
    text = describe(summarise_profiles([means_only]), "crow")
    assert "Means only" in text and "no band" in text and "crow reduces it" in text and "CI" not in text


def test_per_prompt_cosines_give_bands_and_a_gap_interval():
    s = summarise_profiles([_profile([0.0, 0.03, 0.12, 0.05], [0.0, 0.01, 0.02, 0.01], n_prompts=20)])
    c = s.curves[("before", "triggered")]
    assert c.low is not None and all(lo <= m <= hi for lo, m, hi in zip(c.low, c.mean, c.high))
    gap = s.gaps["before"]
    assert gap.mean[2] == pytest.approx(0.12, abs=0.01) and gap.low[2] < gap.mean[2] < gap.high[2]
    assert s.n_prompts[("before", "clean")] == 20


def test_drill_down_filter_works_in_headless_chromium(chromium: str, tmp_path: Path):
    run = write_synthetic_run(tmp_path / "runs", artifacts=False)
    rows = [(f"q{i}", f"r{i}", i % 3 == 0, "sorry" if i % 2 == 0 else f"r{i}", f"r{i}") for i in range(250)]
    write_generations(run, rows)
    res = build_report([tmp_path / "runs"], tmp_path / "rep")
    clean_changed = sum(1 for p, r, t, b, a in rows if not t and b != a)
    dom, log = open_in_chromium(chromium, res.html, tmp_path, fragment="set=clean&changed=1")
    assert not console_messages(log), console_messages(log)
    section = re.search(r'<section class="examples"[^>]*>', dom).group(0)
    assert f'data-matching="{clean_changed}"' in section and f'data-shown="{min(100, clean_changed)}"' in section
    shown = re.findall(r'<tr data-set="(\w+)" data-changed="(\w+)"', dom)
    assert len(shown) == min(100, clean_changed) and set(shown) == {("clean", "true")}
    dom, _ = open_in_chromium(chromium, res.html, tmp_path)  # no filter: the first 100 of all 250
    assert 'data-matching="250"' in dom and len(re.findall(r'<tr data-set=', dom)) == 100
    assert 'data-examples-ready="true"' in dom


def test_distinguishing_settings_ignore_seeds_outputs_and_per_seed_paths():
    from unbackdoor.report.variants import distinguishing_settings

    cfgs = [{"seed": s, "out": f"runs/a{a}/s{s}", "model": f"bd/seed{s}", "defense": {"alpha": a, "lr": 1e-3}}
            for a in (5.5, 11.0) for s in (0, 1)]
    got = distinguishing_settings(cfgs, [c["seed"] for c in cfgs], [None] * 4, [c["out"] for c in cfgs])
    assert got == [(("alpha", "5.5"),)] * 2 + [(("alpha", "11"),)] * 2
    # an alpha sweep run with different seeds per alpha is still two variants (a float is never seed-bound)
    got = distinguishing_settings([{"alpha": 5.5}, {"alpha": 11.0}], [0, 1], [None, None])
    assert got == [(("alpha", "5.5"),), (("alpha", "11"),)]
    # only the seed differs: nothing to tell apart
    assert distinguishing_settings([{"seed": 0}, {"seed": 1}], [0, 1], [None, None]) == [(), ()]
    # two keys that read the same: more of the dotted name
    got = distinguishing_settings([{"a": {"lr": 1}, "b": {"lr": 1}}, {"a": {"lr": 2}, "b": {"lr": 3}}], [0, 0],
                                  [None, None])
    assert got == [(("a.lr", "1"), ("b.lr", "1")), (("a.lr", "2"), ("b.lr", "3"))]


def test_n_comes_from_every_generation_when_the_rates_fit_them(tmp_path: Path):
    run = write_synthetic_run(tmp_path / "lm", counts=False, artifacts=False)
    write_generations(run, [(f"q{i}", "r", i < 4, "sorry", "r") for i in range(9)])  # 4 triggered, 5 clean
    m = json.loads((run / "metrics.json").read_text())
    for side in ("before", "after"):
        m[side].update(asr=0.75, strict_asr=0.5, triggered_utility=0.25, clean_utility=0.6, false_trigger_rate=0.0)
    (run / "metrics.json").write_text(json.dumps(m))
    g = summarise(load_run(d) for d in find_run_dirs([tmp_path / "lm"]))[0]
    assert g.after["asr"]["n_inputs"] == [4] and g.after["clean_utility"]["n_inputs"] == [5]
    assert g.after["asr"]["ci"]["low"] == pytest.approx(wilson_interval(3, 4)[0])
