"""The scanners' decision rules on crafted scores, vectors and models where the answer is known."""
from __future__ import annotations

import pytest
import torch

from unbackdoor.scan.confguard import longest_confident_run, sequence_lock
from unbackdoor.scan.consistency import inconsistency
from unbackdoor.scan.spec import ScanResult
from unbackdoor.scan.ulrl import decide


def test_ulrl_decision_names_the_row_that_moved_most_above_the_median():
    scores = [1.0, 1.1, 9.0, 0.9, 1.0, 1.05, 0.95, 1.0, 1.02, 0.98]
    z = [abs(s - 1.0) / 0.05 for s in scores]
    score, target = decide(z, scores, 1.0, 3.5)
    assert target == 2 and score == pytest.approx(160.0)


def test_ulrl_decision_ignores_rows_that_moved_less_than_usual():
    scores = [1.0, 1.0, 0.0, 1.0, 1.0]  # row 2 barely moved: an outlier, but not a suspect
    z = [0.0, 0.0, 20.0, 0.0, 0.0]
    assert decide(z, scores, 1.0, 3.5) == (0.0, None)


def test_confguard_run_length_and_lock_rule():
    probs = [0.5, 0.995, 0.999, 0.991, 0.2, 0.999, 0.999]
    assert longest_confident_run(probs, 0.99) == 3
    assert longest_confident_run([], 0.99) == 0
    assert sequence_lock([0.999] * 10, 0.99, 10) and not sequence_lock([0.999] * 9 + [0.98], 0.99, 10)
    assert not sequence_lock([0.99] * 20, 0.99, 10)  # strictly above the threshold, as in the release


def test_inconsistency_averages_one_minus_cosine_over_crows_range():
    # 5 hidden states -> 4 pairs; CROW's hs[1:-1] keeps pairs (1,2), (2,3)
    rows = [[0.1, 0.8, 0.6, 0.2], [1.0, 1.0, 1.0, 1.0]]
    assert inconsistency(rows) == pytest.approx([(0.2 + 0.4) / 2, 0.0])
    assert inconsistency(rows, 0, 5) == pytest.approx([sum(1 - c for c in rows[0]) / 4, 0.0])


def test_scan_result_line_says_the_verdict_and_the_numbers():
    r = ScanResult("ulrl", "classify", True, 12.0, 3.5, target=0, p_value=0.05, null={"n": 19})
    line = r.line()
    assert "BACKDOORED" in line and "target class 0" in line and "19 clean models" in line
    assert "uncalibrated" in ScanResult("consistency", "lm", None, 1.0, float("nan")).line()


def test_ulrl_scanner_abstains_on_two_classes():
    from torch import nn

    from unbackdoor.scan.ulrl import scan_ulrl

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    x = torch.randint(0, 256, (40, 3, 2, 2), dtype=torch.uint8)
    y = torch.arange(40) % 2
    res = scan_ulrl(model, (x, y), num_classes=2)
    assert res.verdict is None and res.status.startswith("abstain")
