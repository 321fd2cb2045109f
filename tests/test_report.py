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
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>cat</b>" not in md and "\\|" in md  # a pipe inside a cell does not break the table


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
