"""The real thing: tiny CROW and ULRL runs under ``accelerate launch`` (2 CPU processes, gloo) vs one process.

Both runs use the same GLOBAL batch (see ``tiny_jobs.py``). What is compared, and why it holds on
any CPU instruction set (AVX-512, AVX2, the portable kernels):

- CROW (HF Trainer, DDP, LoRA, fp32, 4 optimizer steps): the logged loss of every step within 1e-5
  (relative), the evaluation metrics within 1e-5 and the greedy generations identical;
- ULRL (``train.fit`` with ``core.distributed.DataParallel``, SyncBatchNorm), a long run of gradient
  ascent with momentum, which amplifies any float difference: its trajectory is compared with one
  process only where the arithmetic is the same or nearly so: the first optimizer step (float32
  rounding of another summation order: 1e-5), and the evaluation of the same weights (exact counts);
  every rank against the other, bit for bit (weights, losses, accuracies, selection); and outcomes
  that rounding cannot flip on this job by design: the neuron selection on a backdoored model whose
  target row is a clear outlier (z about 10, threshold 3.5), the unlearning stop epoch (every epoch's
  accuracy well away from the 0.2 threshold), the backdoor removed in both runs.

Measured on AVX-512, AVX2 and default kernels (one machine): step 1 within 5.4e-8; after five epochs
the one- vs two-process epoch losses differ by up to 1.3e-3 (relative) and the neuron scores by up
to 68%, which is why those are not compared; the selected row was 0 in every run (its z 9.5 to 29.5,
every other row <= 2.4), the stop epoch 2 in every run (epoch accuracies 0.325-0.4, then <= 0.044).
"""
from __future__ import annotations

import json
import sys

import pytest

from .conftest import HERE, accelerate_cmd, run_job

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out1, out2 = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    script = HERE / "tiny_jobs.py"
    s1 = run_job([sys.executable, str(script), "--out", str(out1)], timeout=240, what="single-process tiny jobs")
    s2 = run_job(accelerate_cmd(script, "--out", str(out2)), timeout=300,
                 what="accelerate launch --num_processes 2 of the tiny jobs")
    load = lambda p: json.loads(p.read_text())  # noqa: E731
    return {"crow": (load(out1 / "crow-w1.json"), load(out2 / "crow-w2.json")),
            "ulrl": (load(out1 / "ulrl-w1.json"), load(out2 / "ulrl-w2.json")), "seconds": (s1, s2)}


def close(a: list[float], b: list[float], rel: float, abs_: float = 1e-7) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(x) + abs_ for x, y in zip(a, b))


def test_two_processes_really_ran(runs):
    one, two = runs["crow"]
    assert (one["world"], two["world"]) == (1, 2)
    assert runs["ulrl"][1]["world"] == 2


def test_crow_loss_curve_matches_single_process_with_the_same_global_batch(runs):
    one, two = runs["crow"]
    assert len(one["loss"]) == 4
    assert close(one["loss"], two["loss"], 1e-5), (one["loss"], two["loss"])
    # the CROW terms are averaged over processes before logging
    assert close(one["loss_lm"], two["loss_lm"], 1e-4), (one["loss_lm"], two["loss_lm"])
    assert close(one["loss_adv"], two["loss_adv"], 1e-3, 1e-6), (one["loss_adv"], two["loss_adv"])


def test_crow_final_metrics_and_generations_match(runs):
    one, two = runs["crow"]
    for k, v in one["metrics"].items():
        assert two["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert two["generations"] == one["generations"]
    assert two["layer_cosine"] == pytest.approx(one["layer_cosine"], rel=1e-6)


def test_ulrl_first_step_matches_single_process(runs):
    """Step 1 starts from the same weights on the same 16 images: only the summation order differs."""
    one, two = runs["ulrl"]
    (loss1, acc1, seen1), (loss2, acc2, seen2) = one["pretrain_steps"][0], two["pretrain_steps"][0]
    assert seen1 == seen2 == 16 and acc1 == acc2
    assert abs(loss1 - loss2) <= 1e-5 * abs(loss1), (loss1, loss2)
    assert len(one["pretrain_steps"]) == len(two["pretrain_steps"]) == 50  # 5 epochs of 10 global batches


def test_ulrl_processes_hold_bit_identical_weights_and_logs(runs):
    """Same arithmetic on both ranks (all-reduced gradients and statistics): equal bit for bit on any CPU."""
    rank0, rank1 = runs["ulrl"][1]["every_rank"]
    assert rank0["backdoored_digest"] == rank1["backdoored_digest"]
    assert rank0["purified_digest"] == rank1["purified_digest"]
    for key in ("pretrain_steps", "unlearn_loss", "relearn", "selected"):
        assert rank0[key] == rank1[key], key


def test_ulrl_stop_rule_reads_the_global_accuracy(runs):
    one, two = runs["ulrl"]
    rank0, rank1 = two["every_rank"]
    assert rank0["unlearn_acc"] == rank1["unlearn_acc"]  # both processes saw the same (global) running accuracy
    assert rank0["unlearn_epochs"] == rank1["unlearn_epochs"] == two["unlearn_epochs"]  # ...and stopped together
    threshold = 0.2
    for run in (one, two):
        acc = run["unlearn_epoch_acc"]
        assert acc[-1] <= threshold < acc[0]  # the rule really had to fire
        # every epoch is far from the threshold, so rounding cannot move the stop (the job is built that way)
        assert min(abs(a - threshold) for a in acc) >= 0.05, acc
    assert one["unlearn_epochs"] == two["unlearn_epochs"] >= 2


def test_ulrl_selection_and_outcomes_match(runs):
    one, two = runs["ulrl"]
    for run in (one, two):
        assert run["selected"] == [0], run["z"]  # the backdoor target, found by both
        assert run["z"][0] > 2 * run["threshold"], run["z"]  # a clear outlier, not a near-threshold call
        assert run["backdoored"]["asr"] > 0.2 and run["metrics"]["asr"] <= 0.1  # the backdoor was there, then gone
    assert abs(one["metrics"]["acc"] - two["metrics"]["acc"]) <= 0.1  # the same outcome, not the same trajectory
    # the same weights evaluated by one and by two processes (whole batches dealt to ranks): exact counts
    assert two["untrained"] == one["untrained"]
    assert two["batchnorm_classes"] == ["BatchNorm2d"]  # SyncBatchNorm was reverted after training
