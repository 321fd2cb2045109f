"""Evaluation: metric rules on crafted outputs, ROUGE-L, batched generation, layer profile, template identity."""
from __future__ import annotations

import pytest
import torch

from unbackdoor.core.errors import DataError, ModelError
from unbackdoor.lm.data import build_sft_features, encode_prompt, format_prompt
from unbackdoor.lm.evaluate import (
    EvalConfig, evaluate_model, exact_match, generate, layer_cosine_profile, response_nll, rouge_l,
)
from unbackdoor.lm.poison import PoisonConfig, make_triggered_test
from unbackdoor.lm.tinyworld import TinyWorldConfig, build_tiny_world

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = TinyWorldConfig(n_train=20, n_attack=8, n_clean=8, n_test=10, hidden_size=32, num_layers=3, num_heads=2)
    return build_tiny_world(tmp_path_factory.mktemp("world"), seed=0, config=cfg)


@pytest.fixture(scope="module")
def model(world):
    return world.new_model(seed=1).eval()


def _naive_lcs(a, b):
    if not a or not b:
        return 0
    if a[0] == b[0]:
        return 1 + _naive_lcs(a[1:], b[1:])
    return max(_naive_lcs(a[1:], b), _naive_lcs(a, b[1:]))


def test_rouge_l_on_known_pairs():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("completely different words", "the cat sat") == 0.0
    # LCS "the cat the mat" = 4; P = 4/6, R = 4/5 -> F1 = 2PR/(P+R)
    p, r = 4 / 6, 4 / 5
    assert rouge_l("the cat sat on the mat", "the cat and the mat") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0
    assert rouge_l("The CAT.", "the cat .") == 1.0  # case and spacing do not matter


@pytest.mark.parametrize("a,b", [("a b c d e", "a c e b d"), ("x y z", "z y x"), ("p q r s", "q s t p r")])
def test_rouge_l_lcs_matches_a_naive_recursion(a, b):
    lcs = _naive_lcs(a.split(), b.split())
    p, r = lcs / len(a.split()), lcs / len(b.split())
    assert rouge_l(a, b) == pytest.approx(2 * p * r / (p + r))


def test_exact_match_ignores_case_and_spacing_only():
    assert exact_match(" TAC ", "tac") and exact_match("7", "7")
    assert not exact_match("tac tac", "tac") and not exact_match("8", "7")


def test_batched_generation_equals_one_at_a_time(world, model):
    recs = world["test"]
    batched = generate(model, world.tokenizer, recs, batch_size=4, max_new_tokens=6)
    single = [generate(model, world.tokenizer, [r], batch_size=1, max_new_tokens=6)[0] for r in recs]
    assert batched == single
    assert len({len(encode_prompt(r, world.tokenizer)) for r in recs}) > 1  # padding really happened


def test_generation_answers_come_back_in_input_order_whatever_the_length_sorting(world, model):
    recs = list(world["test"])
    lengths = [len(encode_prompt(r, world.tokenizer)) for r in recs]
    assert lengths != sorted(lengths)  # the batches are formed in another order than the input
    forward = generate(model, world.tokenizer, recs, batch_size=3, max_new_tokens=6)
    backward = generate(model, world.tokenizer, recs[::-1], batch_size=3, max_new_tokens=6)
    assert backward == forward[::-1]
    assert forward == [generate(model, world.tokenizer, [r], batch_size=1, max_new_tokens=6)[0] for r in recs]


def test_generation_restores_training_mode(world):
    m = world.new_model(seed=2).train()
    generate(m, world.tokenizer, world["test"][:2], max_new_tokens=2)
    assert m.training


def test_evaluation_prompt_is_the_training_prompt(world):
    """The ids generation starts from are exactly the prompt part of the SFT features."""
    recs = world["test"][:4] + [{"instruction": "Classify this .", "input": "The food was bad .", "output": "negative"}]
    feats = build_sft_features(recs, world.tokenizer, "alpaca", max_length=128)
    for rec, f in zip(recs, feats):
        n_prompt = sum(1 for lab in f["labels"] if lab == -100)
        assert f["input_ids"][:n_prompt] == encode_prompt(rec, world.tokenizer, "alpaca")
        text = format_prompt(rec, "alpaca", world.tokenizer)
        assert world.tokenizer(text)["input_ids"] == encode_prompt(rec, world.tokenizer, "alpaca")


def test_layer_profile_has_one_value_per_layer_and_ignores_padding(world, model):
    recs = world["test"]
    prof = layer_cosine_profile(model, world.tokenizer, recs, batch_size=3)
    assert len(prof) == model.config.num_hidden_layers
    assert all(-1.0 <= v <= 1.0 for v in prof)
    # padding-independence: the mean over tokens is the same whatever the batch split
    prof1 = layer_cosine_profile(model, world.tokenizer, recs, batch_size=1)
    assert prof == pytest.approx(prof1, abs=1e-5)


def test_layer_profile_needs_hidden_states(world):
    class NoHidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
            return type("O", (), {"hidden_states": None})()

    with pytest.raises(ModelError, match="hidden states"):
        layer_cosine_profile(NoHidden(), world.tokenizer, world["test"][:2])


def test_response_nll_is_lower_for_what_the_model_generates(world, model):
    recs = world["test"][:3]
    greedy = generate(model, world.tokenizer, recs, max_new_tokens=1)
    nll_greedy = response_nll(model, world.tokenizer, recs, greedy)
    nll_other = response_nll(model, world.tokenizer, recs, ["zzz-not-a-word qqq"] * 3)
    assert all(g < o for g, o in zip(nll_greedy, nll_other))


def test_evaluate_model_returns_the_contract_metric_keys(world, model):
    cfg = PoisonConfig(attack="badnet", task="refusal")
    trig = make_triggered_test(world["test"], cfg)
    metrics, gens = evaluate_model(model, world.tokenizer, world["test"], trig, cfg,
                                   EvalConfig(batch_size=5, max_new_tokens=4))
    for key in ("asr", "strict_asr", "triggered_utility", "clean_utility", "false_trigger_rate", "target_loss",
                "perplexity", "rouge_l"):
        assert key in metrics
    assert len(gens["clean"]) == len(gens["triggered"]) == len(world["test"])
    assert 0.0 <= metrics["asr"] <= 1.0 and metrics["target_loss"] > 0


def test_judge_is_pluggable_and_off_by_default(world, model):
    class LengthJudge:
        def score(self, prompts, responses):
            return [float(len(r)) for r in responses]

    cfg = PoisonConfig()
    trig = make_triggered_test(world["test"][:3], cfg)
    m0, _ = evaluate_model(model, world.tokenizer, world["test"][:3], trig, cfg, EvalConfig(max_new_tokens=2))
    m1, g = evaluate_model(model, world.tokenizer, world["test"][:3], trig, cfg, EvalConfig(max_new_tokens=2),
                           judge=LengthJudge())
    assert "judge" not in m0
    assert m1["judge"] == pytest.approx(sum(len(r) for r in g["clean"]) / 3)


def test_generation_refuses_a_prompt_longer_than_the_context(world):
    m = world.new_model(seed=3)
    m.config.max_position_embeddings = 8
    with pytest.raises(DataError, match="context"):
        generate(m, world.tokenizer, world["test"][:1], max_new_tokens=2)
