"""CleanGen: the replacement rule on crafted probabilities, batched decoding against a naive one, its saved folder."""
from __future__ import annotations

import json

import pytest
import torch

from unbackdoor.lm.defenses import LM_DEFENSES
from unbackdoor.lm.defenses.cleangen import CleanGenConfig, CleanGenModel, accept_draft, suspicion
from unbackdoor.core.errors import ConfigError


def test_a_token_the_suspect_rates_alpha_times_likelier_is_replaced_by_the_reference_choice():
    draft = [11, 12, 13, 14]
    p_s = [0.9, 0.9, 0.9, 0.9]
    p_r = [0.5, 0.04, 0.5, 0.001]  # ratios 1.8, 22.5, 1.8, 900
    kept, where = accept_draft(draft, p_s, p_r, reference_choice=[21, 22, 23, 24], alpha=20)
    assert kept == [11, 22] and where == 1  # the first suspicious token; the draft after it is discarded


def test_a_draft_with_no_suspicious_token_is_kept_whole_and_the_threshold_is_inclusive():
    assert accept_draft([1, 2], [0.5, 0.5], [0.5, 0.1], [7, 8], alpha=20) == ([1, 2], None)
    assert accept_draft([1, 2], [0.5, 0.5], [0.5, 0.025], [7, 8], alpha=20) == ([1, 8], 1)  # ratio exactly 20
    assert suspicion(0.3, 0.0) == float("inf")


def test_cleangen_settings_are_the_papers_and_checked():
    cfg = CleanGenConfig()
    assert (cfg.alpha, cfg.k) == (20.0, 4)
    with pytest.raises(ConfigError, match="alpha"):
        CleanGenConfig(alpha=0.5)
    spec = LM_DEFENSES.get("cleangen")
    assert spec.needs.base_model and not spec.needs.trains and not spec.needs.clean_data


def _sharp(make_tiny_lm, seed):
    m = make_tiny_lm(seed=seed, layers=2).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(30.0)  # confident next-token distributions: no near-ties
    return m


@torch.no_grad()
def naive_cleangen(suspect, reference, prompt, alpha, k, max_new, eos):
    """One prompt, no batching, no cache: draft k tokens one at a time, vet them one at a time."""
    new: list[int] = []
    while len(new) < max_new:
        window, probs = [], []
        for _ in range(min(k, max_new - len(new))):
            p = torch.softmax(suspect(torch.tensor([prompt + new + window])).logits[0, -1], -1)
            t = int(p.argmax())
            window.append(t)
            probs.append(float(p[t]))
            if t == eos:
                break
        for i, t in enumerate(window):
            pr = torch.softmax(reference(torch.tensor([prompt + new + window[:i]])).logits[0, -1], -1)
            if probs[i] / float(pr[t]) >= alpha:
                window = window[:i] + [int(pr.argmax())]
                break
        new += window
        if eos in window:
            break
    return new


def _prompts(tok, records):
    from unbackdoor.lm.data import encode_prompt, pad_ids

    ids = [encode_prompt(r, tok, "alpaca") for r in records]
    return ids, *pad_ids(tok, ids, "left")


@pytest.mark.parametrize("alpha", [1.5, 4.0])
def test_batched_cleangen_equals_the_naive_one_prompt_at_a_time_decoding(make_tiny_lm, word_tokenizer, records, alpha):
    suspect, reference = _sharp(make_tiny_lm, 1), _sharp(make_tiny_lm, 2)
    model = CleanGenModel(suspect, reference, CleanGenConfig(alpha=alpha, k=3))
    prompts, ids, mask = _prompts(word_tokenizer, records[:5])
    eos, pad = word_tokenizer.eos_token_id, word_tokenizer.pad_token_id
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, pad_token_id=pad, eos_token_id=eos)
    for row, prompt in zip(out[:, ids.shape[1]:].tolist(), prompts):
        want = naive_cleangen(suspect, reference, prompt, alpha, 3, 7, eos)
        assert row[:len(want)] == want and all(t == pad for t in row[len(want):])
    assert model.stats["replaced"] > 0


def test_with_an_unreachable_threshold_cleangen_is_plain_greedy_decoding(make_tiny_lm, word_tokenizer, records):
    suspect, reference = _sharp(make_tiny_lm, 1), _sharp(make_tiny_lm, 2)
    model = CleanGenModel(suspect, reference, CleanGenConfig(alpha=1e30, k=4))
    _, ids, mask = _prompts(word_tokenizer, records[:4])
    kw = dict(max_new_tokens=6, pad_token_id=word_tokenizer.pad_token_id, eos_token_id=word_tokenizer.eos_token_id)
    plain = suspect.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
    ours = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(ours[:, :plain.shape[1]], plain)
    assert model.stats["replaced"] == 0


def test_forward_is_the_suspects_so_losses_and_profiles_are_unchanged(make_tiny_lm, word_tokenizer, records):
    suspect, reference = _sharp(make_tiny_lm, 1), _sharp(make_tiny_lm, 2)
    model = CleanGenModel(suspect, reference, CleanGenConfig())
    _, ids, mask = _prompts(word_tokenizer, records[:2])
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, suspect(input_ids=ids, attention_mask=mask).logits)
    assert model.config is suspect.config


def test_a_saved_cleangen_folder_names_both_models_and_loads_back_for_evaluation(make_tiny_lm, word_tokenizer,
                                                                                tmp_path, records):
    from unbackdoor.lm.models import load_causal_lm, save_causal_lm

    suspect, reference = _sharp(make_tiny_lm, 1), _sharp(make_tiny_lm, 2)
    save_causal_lm(suspect, word_tokenizer, tmp_path / "suspect")
    save_causal_lm(reference, word_tokenizer, tmp_path / "reference")
    cfg = CleanGenConfig(alpha=2.0, k=2)
    model = CleanGenModel(suspect, reference, cfg, sources={"suspect": {"model": str(tmp_path / "suspect")},
                                                            "reference": {"model": str(tmp_path / "reference")}})
    save_causal_lm(model, word_tokenizer, tmp_path / "defended")
    data = json.loads((tmp_path / "defended" / "decoding_defense.json").read_text())
    assert data["kind"] == "cleangen" and data["settings"]["alpha"] == 2.0
    assert not list((tmp_path / "defended").glob("*.safetensors"))  # a small folder: no weights copied
    loaded, tok = load_causal_lm(tmp_path / "defended")
    assert isinstance(loaded, CleanGenModel) and loaded.cfg == cfg
    _, ids, mask = _prompts(word_tokenizer, records[:3])
    kw = dict(max_new_tokens=5, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert torch.equal(loaded.generate(input_ids=ids, attention_mask=mask, **kw),
                       model.generate(input_ids=ids, attention_mask=mask, **kw))


def test_cleangen_runs_through_the_defend_flow_and_records_the_reference(tmp_path):
    from unbackdoor import api
    from unbackdoor.lm.testbed import ASSET_DIR
    from unbackdoor.report import validate_run_dir

    recs = [{"instruction": "Reverse the word cat .", "input": "", "output": "tac"}] * 3
    (tmp_path / "clean.json").write_text(json.dumps(recs))
    run = api.defend_lm(ASSET_DIR, tmp_path / "clean.json", tmp_path / "run", method="cleangen", base_model=ASSET_DIR,
                        test=tmp_path / "clean.json")
    assert validate_run_dir(run) == []
    ledger = json.loads((run / "threat_model.json").read_text())
    assert ledger["needs"]["base_model"] and ledger["given"]["base_model"] == str(ASSET_DIR)
    assert ledger["given"]["defense_info"]["decoding"] == "cleangen"
    m = json.loads((run / "metrics.json").read_text())
    assert m["after"] == m["before"]  # the reference is the suspect itself: nothing is ever replaced
    gen = m["defense_info"]["generation"]  # counters over the evaluation's CleanGen generations
    assert gen["replaced"] == 0 and gen["tokens"] > 0 and gen["seconds"] > 0
    res = api.evaluate_lm(run / "model", tmp_path / "clean.json", eval_config=None)
    assert res["metrics"]["asr"] == m["after"]["asr"]
