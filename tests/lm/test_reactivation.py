"""The LoRA retuning attack (re-activation test) for causal LMs: its data, its curve, its run-folder record."""
from __future__ import annotations

import json

import pytest

from unbackdoor.core.errors import ConfigError
from unbackdoor.lm.evaluate import EvalConfig
from unbackdoor.lm.poison import PoisonConfig, has_trigger, target_string
from unbackdoor.lm.reactivation import LMRetuneConfig, retune, retune_records, retune_run_dir

FAST = dict(max_steps=2, eval_every=1, eval_prompts=3, per_device_train_batch_size=2, gradient_accumulation_steps=1,
            learning_rate=1e-3, max_length=64, logging_steps=1)


def test_retune_records_poison_exactly_k_of_the_chosen_records(record_factory):
    clean = record_factory(30)
    poison = PoisonConfig(attack="badnet", task="refusal")
    records, idx, positions = retune_records(clean, poison, LMRetuneConfig(poisoned=3, samples=10))
    assert len(records) == 10 and len(idx) == 10 and len(positions) == 3
    for i, rec in enumerate(records):
        assert has_trigger(rec["instruction"], poison) == (i in positions)
        assert (rec["output"] == target_string(poison)) == (i in positions)
    with pytest.raises(ConfigError):
        LMRetuneConfig(poisoned=10, samples=10)


def test_retune_measures_asr_at_every_step(tmp_path, make_tiny_lm, word_tokenizer, record_factory):
    poison = PoisonConfig()
    recs = record_factory(12)
    records, _, _ = retune_records(recs, poison, LMRetuneConfig(poisoned=2, samples=8))
    from unbackdoor.lm.poison import make_triggered_test

    curve = retune(make_tiny_lm(seed=0), word_tokenizer, records, recs[:4], make_triggered_test(recs[:4], poison),
                   poison, LMRetuneConfig(**FAST), tmp_path / "work", eval_cfg=EvalConfig(max_new_tokens=3))
    assert [p["step"] for p in curve] == [0, 1, 2]
    assert {"asr", "strict_asr", "clean_utility"} <= set(curve[0])


def test_retuning_a_decoding_defense_trains_its_suspect_and_measures_through_its_decoding(
        tmp_path, make_tiny_lm, word_tokenizer, record_factory, monkeypatch):
    import torch

    from unbackdoor.lm import reactivation
    from unbackdoor.lm.defenses.cleangen.decoding import CleanGenConfig, CleanGenModel
    from unbackdoor.lm.poison import make_triggered_test

    poison = PoisonConfig()
    recs = record_factory(12)
    records, _, _ = retune_records(recs, poison, LMRetuneConfig(poisoned=2, samples=8))
    suspect, reference = make_tiny_lm(seed=0), make_tiny_lm(seed=1)
    ref_before = {k: v.clone() for k, v in reference.state_dict().items()}
    model = CleanGenModel(suspect, reference, CleanGenConfig())
    seen = []
    real = reactivation.evaluate_model
    monkeypatch.setattr(reactivation, "evaluate_model", lambda net, *a, **k: (seen.append(net), real(net, *a, **k))[1])
    curve = retune(model, word_tokenizer, records, recs[:4], make_triggered_test(recs[:4], poison), poison,
                   LMRetuneConfig(**FAST), tmp_path / "work", eval_cfg=EvalConfig(max_new_tokens=3))
    assert [p["step"] for p in curve] == [0, 1, 2]
    assert seen and all(net is model for net in seen)  # every point decoded by CleanGen, not by the bare suspect
    assert any("lora_" in n for n, _ in suspect.named_parameters())  # the adapter went on the suspect
    assert all(torch.equal(v, ref_before[k]) for k, v in reference.state_dict().items())  # the reference is untouched


@pytest.mark.slow
def test_retune_run_dir_records_the_curves_beside_an_lm_run(tmp_path, make_tiny_lm, word_tokenizer, record_factory):
    from unbackdoor.lm.data import write_alpaca
    from unbackdoor.lm.flow import defend_loaded
    from unbackdoor.lm.models import save_causal_lm
    from unbackdoor.lm.poison import make_triggered_test

    poison = PoisonConfig()
    recs = record_factory(16)
    bd = save_causal_lm(make_tiny_lm(seed=1), word_tokenizer, tmp_path / "bd")
    clean_model = save_causal_lm(make_tiny_lm(seed=2), word_tokenizer, tmp_path / "clean")
    clean_file, test_file = write_alpaca(recs, tmp_path / "clean.json"), write_alpaca(recs[:4], tmp_path / "test.json")
    from unbackdoor.lm.models import load_causal_lm

    model, tok = load_causal_lm(bd)
    run = defend_loaded(tmp_path / "run", model, tok, recs, list(range(16)), "prune", test=recs[:4],
                        triggered=make_triggered_test(recs[:4], poison), poison=poison,
                        eval_cfg=EvalConfig(max_new_tokens=3), n_profile=2,
                        sources={"model": str(bd), "clean": str(clean_file), "test": str(test_file)}, inputs=[bd])
    path = retune_run_dir(run, clean_model=clean_model, config=LMRetuneConfig(poisoned=2, samples=8, **FAST))
    rec = json.loads(path.read_text())
    assert rec["unbackdoor_command"] == "lm retune" and rec["evaluator_attack"] is True and rec["kind"] == "lm"
    assert set(rec["curves"]) == {"defended", "floor", "ceiling"}
    assert [p["step"] for p in rec["curves"]["defended"]] == [0, 1, 2]
    assert rec["attack"]["attack"] == "badnet" and len(rec["retune_data"]["poisoned"]) == 2
    assert not list(run.glob(".retune-*"))  # the retuned models are measured, never kept
