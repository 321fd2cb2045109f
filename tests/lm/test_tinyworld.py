"""The generative tiny world: exact answers, mixed families, a fixed vocabulary, determinism."""
from __future__ import annotations

import random

import pytest

from unbackdoor.core.errors import ConfigError, DataError
from unbackdoor.lm.data import format_prompt
from unbackdoor.lm.tinyworld import (
    CAPITALS, FAMILIES, OPPOSITES, TinyWorldConfig, build_tiny_world, build_tokenizer, generate_records,
    load_tiny_world,
)

SMALL = TinyWorldConfig(n_train=60, n_attack=10, n_clean=10, n_test=12)


def test_answers_are_exact_and_correct_per_family():
    rng = random.Random(0)
    for _ in range(50):
        r = FAMILIES["reverse"](rng)
        assert r["output"] == r["instruction"].split()[-2][::-1] or r["output"][::-1] in r["instruction"]
        r = FAMILIES["add"](rng)
        a, b = [int(t) for t in r["instruction"].split() if t.isdigit()]
        assert r["output"] == str(a + b)
        r = FAMILIES["uppercase"](rng)
        assert r["output"].lower() in r["instruction"].split() and r["output"].isupper()
        r = FAMILIES["opposite"](rng)
        w = r["instruction"].split()[-2]
        assert OPPOSITES.get(w) == r["output"] or OPPOSITES.get(r["output"]) == w
        r = FAMILIES["sentiment"](rng)
        assert r["input"] and r["output"] in ("positive", "negative")


def test_every_answer_is_a_single_known_token():
    tok = build_tokenizer()
    for r in generate_records(300, random.Random(1)):
        ids = tok(r["output"], add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, r
        prompt_ids = tok(format_prompt(r))["input_ids"]
        assert tok.unk_token_id not in prompt_ids


def test_families_are_mixed_within_a_batch():
    recs = generate_records(16, random.Random(3))
    answers_kinds = {("digit" if r["output"].isdigit() else "upper" if r["output"].isupper() else
                      "sent" if r["input"] else "word") for r in recs}
    assert len(answers_kinds) >= 3


def test_vocabulary_is_the_same_for_every_seed(tmp_path):
    a = build_tiny_world(tmp_path / "a", seed=0, config=SMALL)
    b = build_tiny_world(tmp_path / "b", seed=5, config=SMALL)
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    assert a["train"] != b["train"]


def test_world_is_deterministic_from_the_seed(tmp_path):
    build_tiny_world(tmp_path / "a", seed=2, config=SMALL)
    build_tiny_world(tmp_path / "b", seed=2, config=SMALL)
    for name in ("train.json", "attack.json", "clean.json", "test.json", "world.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_world_round_trips_through_its_folder(tmp_path):
    w = build_tiny_world(tmp_path / "w", seed=1, config=SMALL)
    back = load_tiny_world(tmp_path / "w")
    assert back.splits == w.splits and back.seed == 1 and back.config == SMALL
    assert back.tokenizer.get_vocab() == w.tokenizer.get_vocab()


def test_loading_a_folder_that_is_not_a_world_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="world.json"):
        load_tiny_world(tmp_path)


def test_model_config_is_a_small_llama(tmp_path):
    w = build_tiny_world(tmp_path / "w", seed=0, config=SMALL)
    m = w.new_model()
    assert type(m).__name__ == "LlamaForCausalLM"
    assert m.config.num_hidden_layers == 6 and m.config.hidden_size == 128
    assert m.config.vocab_size == len(w.tokenizer)


def test_bad_world_config_is_rejected():
    with pytest.raises(ConfigError, match="n_test"):
        TinyWorldConfig(n_test=0)
    with pytest.raises(ConfigError, match="num_heads"):
        TinyWorldConfig(hidden_size=130, num_heads=4)


def test_fact_table_is_fixed():
    r = FAMILIES["fact"](random.Random(0))
    assert r["output"] in set(CAPITALS.values()) | {"moo", "woof", "meow", "quack", "baa", "roar", "hiss", "hoot",
                                                     "buzz", "neigh"}
