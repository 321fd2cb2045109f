"""The detection arithmetic against naive references on tiny vectors."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from unbackdoor.core.errors import DataError
from unbackdoor.scan.stats import (auroc, detection_rates, empirical_p_value, null_quantile, robust_tail_z,
                                   roc_curve)


def naive_auroc(pos, neg):
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auroc_matches_the_pairwise_count_with_ties(seed):
    rng = random.Random(seed)
    pos = [rng.choice([0, 1, 2, 3]) + rng.random() * (seed % 2) for _ in range(rng.randint(1, 9))]
    neg = [rng.choice([0, 1, 2]) + rng.random() * (seed % 2) for _ in range(rng.randint(1, 9))]
    assert auroc(pos, neg) == pytest.approx(naive_auroc(pos, neg))


def test_auroc_of_a_constant_score_is_one_half_and_of_a_perfect_split_is_one():
    assert auroc([1, 1, 1], [1, 1]) == 0.5
    assert auroc([3, 4], [1, 2]) == 1.0
    assert auroc([1, 2], [3, 4]) == 0.0
    assert math.isnan(auroc([], [1.0]))


def test_roc_curve_runs_from_origin_to_one_one_and_its_area_is_the_auroc():
    pos, neg = [0.9, 0.8, 0.4, 0.4], [0.7, 0.4, 0.2]
    fpr, tpr, thr = roc_curve(pos, neg)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert all(a <= b for a, b in zip(fpr, fpr[1:])) and all(a <= b for a, b in zip(tpr, tpr[1:]))
    area = sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1))
    assert area == pytest.approx(auroc(pos, neg))
    assert thr[0] == math.inf


def test_empirical_p_value_counts_clean_models_at_least_as_high_plus_one():
    null = [1.0, 2.0, 3.0, 4.0]
    assert empirical_p_value(5.0, null) == pytest.approx(1 / 5)
    assert empirical_p_value(3.0, null) == pytest.approx(3 / 5)
    assert empirical_p_value(0.0, null) == pytest.approx(1.0)
    with pytest.raises(DataError):
        empirical_p_value(1.0, [])
    assert null_quantile([0.0, 10.0], 0.5) == pytest.approx(5.0)


def test_detection_rates_count_flags_per_class():
    r = detection_rates([True, False, True, True], [True, True, False, False])
    assert (r["tpr"], r["fpr"], r["tp"], r["fp"], r["n_pos"], r["n_neg"]) == (0.5, 1.0, 1, 2, 2, 2)
    with pytest.raises(DataError):
        detection_rates([True], [True, False])


def test_robust_tail_z_is_large_for_a_heavy_upper_tail_only():
    flat = [1.0, 1.1, 0.9, 1.05, 0.95] * 20
    tail = flat + [9.0] * 10
    assert robust_tail_z(tail) > 10 * max(robust_tail_z(flat), 0.1)
    assert robust_tail_z([2.0] * 10) == 0.0


def test_calibrated_threshold_is_a_quantile_with_enough_clean_models_else_their_maximum():
    from unbackdoor.scan.stats import calibrated_threshold

    many = [float(i) for i in range(20)]  # 20 clean models: the 95% quantile exists
    assert calibrated_threshold(many, 0.05) == pytest.approx(18.05)
    few = [1.0, 5.0, 3.0]  # 3 clean models: the smallest p-value is 1/4, so only "above all of them"
    assert calibrated_threshold(few, 0.05) == 5.0
    assert calibrated_threshold(few, 0.3) == pytest.approx(3.8)  # n + 1 = 4 >= 1/0.3: the 70% quantile of 1, 3, 5
