"""The LM scanners (layer consistency, ConfGuard) against naive references and on models whose answer is known."""
from __future__ import annotations

import json
import math

import pytest
import torch

from unbackdoor.lm.data import encode_prompt
from unbackdoor.lm.evaluate import layer_cosine_profile
from unbackdoor.scan.confguard import ConfGuardConfig, scan_confguard, token_confidences
from unbackdoor.scan.consistency import ConsistencyScanConfig, inconsistency, scan_consistency, score_prompts


@torch.no_grad()
def naive_greedy_confidences(model, tok, record, max_new):
    """One prompt, no batching, no cache: the top-1 probability of each greedy token up to EOS."""
    ids = encode_prompt(record, tok, "alpaca")
    out = []
    for _ in range(max_new):
        probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        nxt = int(probs.argmax())
        out.append(float(probs[nxt]))
        ids.append(nxt)
        if nxt == tok.eos_token_id:
            break
    return out


def test_token_confidences_match_one_prompt_at_a_time_greedy_decoding(make_tiny_lm, word_tokenizer, records):
    model = make_tiny_lm(seed=1).eval()
    got = token_confidences(model, word_tokenizer, records[:5], max_new_tokens=6, batch_size=3)
    for rec, conf in zip(records[:5], got):
        assert conf == pytest.approx(naive_greedy_confidences(model, word_tokenizer, rec, 6), abs=1e-5)


def _locked_model(make_tiny_lm, word_tokenizer, token: str):
    """A model that always emits ``token`` with probability ~1: every response is a sequence lock."""
    model = make_tiny_lm(seed=2).eval()
    head = model.lm_head
    with torch.no_grad():
        head.weight.zero_()
        bias = torch.zeros(head.out_features)
        bias[word_tokenizer.convert_tokens_to_ids(token)] = 30.0
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.copy_(bias)
    return model


def test_confguard_flags_a_model_that_locks_and_not_a_random_one(make_tiny_lm, word_tokenizer, records):
    cfg = ConfGuardConfig(max_new_tokens=12, run_length=10)
    locked = scan_confguard(_locked_model(make_tiny_lm, word_tokenizer, "add"), records, cfg, tokenizer=word_tokenizer)
    assert locked.verdict is True and locked.score == 1.0 and locked.evidence["max_run"] == 12
    plain = scan_confguard(make_tiny_lm(seed=3).eval(), records, cfg, tokenizer=word_tokenizer)
    assert plain.verdict is False and plain.score == 0.0 and plain.input_threshold == 10.0


def test_consistency_scores_are_the_inconsistency_of_the_layer_profile(make_tiny_lm, word_tokenizer, records):
    model = make_tiny_lm(seed=4, layers=4).eval()
    _, rows = layer_cosine_profile(model, word_tokenizer, records, per_prompt=True)
    assert score_prompts(model, records, tokenizer=word_tokenizer) == pytest.approx(inconsistency(rows))


def test_consistency_gives_no_verdict_without_a_null_and_a_p_value_with_one(make_tiny_lm, word_tokenizer,
                                                                            record_factory):
    model = make_tiny_lm(seed=5, layers=4).eval()
    recs = record_factory(20)
    bare = scan_consistency(model, recs, tokenizer=word_tokenizer)
    assert bare.verdict is None and math.isnan(bare.threshold) and bare.status.startswith("uncalibrated")
    scores = bare.evidence["clean_scores"]
    assert bare.input_threshold == pytest.approx(sorted(scores)[-1], rel=0.2)  # the 95% quantile of 20 scores
    high = scan_consistency(model, recs, ConsistencyScanConfig(alpha=0.2), tokenizer=word_tokenizer,
                            null=[bare.score - 10] * 9)
    assert high.verdict is True and high.p_value == pytest.approx(0.1)
    low = scan_consistency(model, recs, tokenizer=word_tokenizer, null=[bare.score + 10] * 9)
    assert low.verdict is False and low.p_value == pytest.approx(1.0)


def test_scan_flow_on_an_lm_folder_screens_inputs(tmp_path, make_tiny_lm, word_tokenizer, record_factory):
    from unbackdoor import api
    from unbackdoor.lm.data import write_alpaca
    from unbackdoor.lm.models import save_causal_lm

    model_dir = save_causal_lm(make_tiny_lm(seed=6), word_tokenizer, tmp_path / "model")
    clean = write_alpaca(record_factory(12), tmp_path / "clean.json")
    inputs = write_alpaca(record_factory(5), tmp_path / "inputs.json")
    folder, rec = api.scan(model_dir, clean, tmp_path / "scan", inputs=inputs,
                           settings={"confguard": {"max_new_tokens": 4}})
    assert rec["kind"] == "lm" and [r["scanner"] for r in rec["results"]] == ["consistency", "confguard"]
    assert len(rec["inputs"]["consistency"]["flagged"]) == 5 and len(rec["inputs"]["confguard"]["scores"]) == 5
    assert json.loads((folder / "config.json").read_text())["unbackdoor_command"] == "scan"
    assert sorted(p.name for p in folder.glob("*.png")) == ["scan_confguard.png", "scan_consistency.png"]
