"""Utility metrics by name: exact match and ROUGE-L per example; lm-eval tasks offline, or a clear error."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from unbackdoor.core.errors import ConfigError, DataError
from unbackdoor.lm import utility
from unbackdoor.lm.utility import (available_utilities, flatten_results, get_utility, run_benchmark, task_names)

TINY_LLAMA = Path(__file__).resolve().parents[2] / "src" / "unbackdoor" / "assets" / "lm" / "tiny-llama"


def test_exact_match_is_a_rate_and_rouge_l_a_mean_score_on_the_same_outputs():
    preds, refs = ["the answer is five", "TAC", "no"], ["the answer is 5", "tac", "cat"]
    em, rl = get_utility("exact_match"), get_utility("rouge_l")
    assert em.is_rate and not rl.is_rate
    assert em.mean(preds, refs) == pytest.approx(1 / 3)
    assert rl.mean(preds, refs) == pytest.approx((0.75 + 1.0 + 0.0) / 3)  # LCS 3 of 4 words: F1 0.75
    assert math.isnan(em.mean([], []))


def test_unknown_utilities_get_a_did_you_mean_and_benchmarks_are_not_per_example():
    with pytest.raises(ConfigError, match="did you mean 'rouge_l'"):
        get_utility("rougel")
    with pytest.raises(ConfigError, match="benchmark"):
        get_utility("lm-eval:arc_easy")
    assert "lm-eval:<task>" in available_utilities()
    assert task_names("lm-eval:arc_easy, hellaswag") == ["arc_easy", "hellaswag"]
    with pytest.raises(ConfigError, match="names no task"):
        task_names("lm-eval:")


def test_lm_eval_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(utility, "lm_eval_installed", lambda: False)
    with pytest.raises(ConfigError) as e:
        run_benchmark("lm-eval:arc_easy", model=None, tokenizer=None)
    assert "not installed" in e.value.problem and "never downloads" in e.value.fix


def test_lm_eval_results_are_flattened_without_stderr():
    res = {"arc_easy": {"alias": "arc_easy", "acc,none": 0.25, "acc_stderr,none": 0.1, "acc_norm,none": 0.3},
           "gsm8k": {"exact_match,strict-match": 0.1}}
    assert flatten_results(res) == {"lm_eval:arc_easy:acc": 0.25, "lm_eval:arc_easy:acc_norm": 0.3,
                                    "lm_eval:gsm8k:exact_match:strict-match": 0.1}


LOCAL_TASK = """task: unbackdoor_local_yesno
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: ["yes", "no"]
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def test_an_lm_eval_task_on_a_local_file_runs_offline(tmp_path: Path):
    """Runs only where lm-eval (and its `datasets`) is installed; CI does not install it."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (optional: pip install lm-eval)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "yesno.jsonl"
    data.write_text("".join(json.dumps({"question": f"is {i} even?", "label": i % 2}) + "\n" for i in range(6)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local.yaml").write_text(LOCAL_TASK.format(data=data))
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA)
    tok = AutoTokenizer.from_pretrained(TINY_LLAMA)
    before = dict(os.environ)
    out = run_benchmark("lm-eval:unbackdoor_local_yesno", model, tok, batch_size=2, include_path=str(tasks))
    acc = out["lm_eval:unbackdoor_local_yesno:acc"]
    assert 0.0 <= acc <= 1.0 and acc * 6 == pytest.approx(round(acc * 6))  # a fraction of the 6 questions
    assert os.environ.get("HF_HUB_OFFLINE") == before.get("HF_HUB_OFFLINE")  # offline only during the call
    with pytest.raises(DataError) as e:  # a task whose data is not on this machine: never downloaded
        run_benchmark("lm-eval:arc_easy", model, tok, batch_size=2, limit=2)
    assert "not available offline" in e.value.problem and "include_path" in e.value.fix
    with pytest.raises(ConfigError, match="no task named"):
        run_benchmark("lm-eval:no_such_task_xyz", model, tok)
