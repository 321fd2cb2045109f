"""The efficacy scripts' tables and figure: seed counts per row, the ACC-vs-ASR PNG, docs rewritten between markers."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from efficacy_classify import markdown, plot, write_docs  # noqa: E402

from unbackdoor.core.stats import aggregate  # noqa: E402

KEYS = ("acc", "asr", "ra", "target_recall", "der")


def _rows(values):
    return [{"seed": s, **dict(zip(KEYS, v)), "seconds": 1.0 + s, "peak_memory_mib": 100.0} for s, v in values]


def _result():
    backdoored = _rows([(0, (0.95, 0.99, 0.01, 0.9, 0.5)), (1, (0.93, 0.97, 0.02, 0.9, 0.5)),
                        (2, (0.94, 0.98, 0.01, 0.9, 0.5))])
    ft = _rows([(0, (0.94, 0.80, 0.1, 0.9, 0.6)), (1, (0.92, 0.70, 0.2, 0.9, 0.6)), (2, (0.93, 0.75, 0.1, 0.9, 0.6))])
    anp = _rows([(0, (0.70, 0.30, 0.6, 0.7, 0.7))])  # the expensive defense at full budget on one seed only

    def block(defenses):
        return {"backdoored": {"per_seed": backdoored,
                               "aggregate": aggregate([{k: b[k] for k in KEYS} for b in backdoored])},
                "defenses": {name: {"seeds": [r["seed"] for r in rows], "per_seed": rows,
                                    "aggregate": aggregate([{k: r[k] for k in (*KEYS, "seconds", "peak_memory_mib")}
                                                            for r in rows])}
                             for name, rows in defenses.items()}}

    return {"attacks": {"badnets": block({"ft": ft, "anp": anp}), "blended": block({"ft": ft})},
            "settings": {"command": "python scripts/efficacy_classify.py --seeds 0 1 2", "date_utc": "2026-12-07",
                         "results_file": "results/classify/x.json"}}


def test_each_row_says_how_many_seeds_it_averages():
    text = markdown(_result())
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in text.splitlines()
            if line.startswith("| ") and line.count("|") == 11 and not line.startswith("| model")}
    assert rows == {"backdoored": "3", "ft": "3", "anp": "1"}
    assert "| anp | 1 | 0.700 ± 0.000 | 0.300 ± 0.000 |" in text
    assert "0.930 ± 0.010" in text  # ft's ACC over its three seeds


def test_plot_writes_a_png_with_one_panel_per_attack(tmp_path):
    from PIL import Image

    out = tmp_path / "img" / "fig.png"
    plot(_result(), out, "tiny world")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob("*.tmp"))  # written atomically
    width, height = Image.open(out).size
    assert width > 1.5 * height  # two panels side by side


def test_the_legend_names_a_defense_that_ran_on_the_first_attack_only(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    seen = []
    def record(self, fname, *args, **kwargs):
        seen.append([t.get_text() for ax in self.axes if ax.get_legend() for t in ax.get_legend().get_texts()])
        fname.write(b"")  # save_png renders into a buffer, then writes the file atomically

    monkeypatch.setattr(Figure, "savefig", record)
    plot(_result(), tmp_path / "fig.png")
    assert seen and sorted(seen[0]) == ["anp", "backdoored", "ft"]  # each once, anp from the first panel only


@pytest.mark.parametrize("existing", [True, False])
def test_write_docs_replaces_only_its_own_section(tmp_path, existing):
    doc = tmp_path / "results.md"
    if existing:
        doc.write_text("# Page\n\nintro\n\n<!-- baselines:begin -->\nold table\n<!-- baselines:end -->\n\nprose after\n")
    write_docs(_result(), doc, marker="baselines")
    text = doc.read_text()
    assert text.count("<!-- baselines:begin -->") == 1 and "old table" not in text
    assert "| anp | 1 |" in text and "results/classify/x.json" in text
    if existing:
        assert text.startswith("# Page\n\nintro\n") and text.endswith("\n\nprose after\n")


def test_text_table_lists_refusals_with_their_reason_and_seed_counts():
    from efficacy_text import markdown as text_markdown

    rows = _rows([(0, (0.9, 0.1, 0.8, 0.9, 0.9)), (1, (0.8, 0.2, 0.7, 0.8, 0.8))])
    for r in rows:
        r.update(warnings=["ULRL found no suspicious neuron: this result is plain finetuning (see metrics)"],
                 ulrl={"scored": "head", "layer": "classifier", "selected": [], "status": "no_suspect"})
    backdoored = [{"seed": s, "acc": 0.9, "asr": 1.0, "ra": 0.0, "target_recall": 0.95} for s in (0, 1)]
    result = {"backdoored": {"per_seed": backdoored, "aggregate": aggregate([{k: v for k, v in b.items() if k != "seed"}
                                                                             for b in backdoored])},
              "defenses": {"ulrl": {"per_seed": rows, "refused": [],
                                    "aggregate": aggregate([{k: r[k] for k in (*KEYS, "seconds")} for r in rows])},
                           "anp": {"per_seed": [], "refused": [{"reason": "ANP needs batch norm"}] * 2,
                                   "aggregate": {}}}}
    text = text_markdown(result)
    assert "| anp | 2 | refused | | | | | | ANP needs batch norm |" in text
    assert "| ulrl | 2 | 0.850 ± 0.071 |" in text
    assert "scored head (classifier); selected per seed: 0, 0; ULRL found no suspicious neuron" in text


def test_a_backdoor_that_did_not_take_is_recorded_and_skipped(tmp_path, capsys):
    import json

    from efficacy_classify import BACKDOORED, backdoor_taken, collect, record_backdoored

    record_backdoored(tmp_path, "wanet", 0, {"acc": 0.9, "asr": 0.95, "ra": 0.05, "target_recall": 0.9, "x": 1})
    record_backdoored(tmp_path, "wanet", 1, {"acc": 0.9, "asr": 0.04, "ra": 0.9, "target_recall": 0.9})
    assert backdoor_taken({"asr": 0.95}, 0.5, "seed 0 wanet")
    assert not backdoor_taken({"asr": 0.04}, 0.5, "seed 1 wanet")
    assert "did not take (ASR 0.040 < --min-asr 0.5)" in capsys.readouterr().out
    run = tmp_path / "wanet" / "ft" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"after": dict(zip(KEYS, (0.9, 0.1, 0.8, 0.9, 0.9))),
                                                  "before": {"acc": 0.9, "asr": 0.95}, "seconds": 2.0}))
    (run / "config.json").write_text(json.dumps({"config": {"lr": 0.01}}))
    result = collect([0, 1], ["wanet"], ["ft"], tmp_path, min_asr=0.5)
    block = result["attacks"]["wanet"]
    assert block["not_taken"] == [1]
    assert [b["seed"] for b in block["backdoored"]["per_seed"]] == [0, 1]  # both models listed, defended or not
    assert block["backdoored"]["per_seed"][0] == {"seed": 0, "acc": 0.9, "asr": 0.95, "ra": 0.05, "target_recall": 0.9}
    assert block["defenses"]["ft"]["seeds"] == [0]
    assert (tmp_path / "wanet" / BACKDOORED / "seed1.json").is_file()
    assert "did not take on seed(s) 1" in markdown(result)


def test_relative_costs_pair_each_defense_with_ft_on_the_same_model():
    from efficacy_classify import relative_costs

    costs = relative_costs(_result())
    assert costs["ft"] == (1.0, 6)
    assert costs["anp"] == (1.0, 1)  # seed 0 only: 1 s / ft's 1 s
    result = _result()
    result["attacks"]["badnets"]["defenses"]["anp"]["per_seed"][0]["seconds"] = 50.0
    assert relative_costs(result)["anp"] == (50.0, 1)
    assert "| anp | 50.00 | 1 |" in markdown(result)
