"""Alpaca data: clear errors on bad files, one template for training and evaluation, label masking."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unbackdoor.core.errors import ConfigError, DataError
from unbackdoor.lm.data import (
    ALPACA_PROMPT, IGNORE_INDEX, build_sft_features, sft_collator, encode_prompt, format_prompt, read_alpaca,
    write_alpaca,
)
from unbackdoor.lm.tokenizer import train_word_tokenizer

# ---- reading: every bad file is a DataError naming where and what to do ------------------------------------


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError) as e:
        read_alpaca(tmp_path / "nope.json")
    assert "not found" in str(e.value) and "nope.json" in str(e.value)


def test_empty_file_is_reported_as_empty(tmp_path):
    p = tmp_path / "d.json"
    p.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        read_alpaca(p)


def test_malformed_json_names_the_line(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(DataError) as e:
        read_alpaca(p)
    assert "line 3" in str(e.value) and e.value.fix


def test_malformed_jsonl_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    with pytest.raises(DataError, match="line 2"):
        read_alpaca(p)


def test_missing_field_names_record_and_field(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(DataError) as e:
        read_alpaca(p)
    assert "record 1" in e.value.where and "'output'" in e.value.where and str(p) in e.value.where


def test_wrong_type_names_record_field_and_type(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 5}\n')
    with pytest.raises(DataError) as e:
        read_alpaca(p)
    assert "record 1" in str(e.value) and "'output'" in str(e.value) and "int" in str(e.value)
    p.write_text('{"instruction": "a", "input": ["x"], "output": "b"}\n')
    with pytest.raises(DataError, match="'input'"):
        read_alpaca(p)


def test_empty_list_and_non_list_are_rejected(tmp_path):
    p = tmp_path / "d.json"
    p.write_text("[]")
    with pytest.raises(DataError, match="no records"):
        read_alpaca(p)
    p.write_text('{"data": []}')
    with pytest.raises(DataError, match="not a list"):
        read_alpaca(p)
    p.write_text('[1, 2]')
    with pytest.raises(DataError, match="record 0"):
        read_alpaca(p)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_write_then_read_round_trips_and_defaults_input(tmp_path, suffix):
    recs = [{"instruction": "say hi", "output": "hi"}, {"instruction": "x", "input": "y", "output": "z", "tag": 1}]
    path = write_alpaca(recs, tmp_path / f"d{suffix}")
    back = read_alpaca(path)
    assert back[0] == {"instruction": "say hi", "input": "", "output": "hi"}
    assert back[1] == recs[1]
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("[") == (suffix == ".json")


def test_jsonl_content_with_json_suffix_is_read(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    assert [r["output"] for r in read_alpaca(p)] == ["b", "d"]
    p.write_bytes(b"\xef\xbb\xbf" + b'[{"instruction": "a", "output": "b"}]')  # a byte-order mark
    assert read_alpaca(p)[0]["output"] == "b"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=200),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                              lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                              max_leaves=8).map(lambda o: json.dumps(o).encode())))
def test_random_files_give_records_or_a_data_error(tmp_path, blob):
    p = tmp_path / "fuzz.json"
    p.write_bytes(blob)
    try:
        recs = read_alpaca(p)
    except DataError:
        return
    assert all(isinstance(r["instruction"], str) and isinstance(r["output"], str) and isinstance(r["input"], str)
               for r in recs)


# ---- templates --------------------------------------------------------------------------------------------------


def test_alpaca_template_is_the_spec_text():
    rec = {"instruction": "Name a color.", "input": "", "output": "red"}
    assert format_prompt(rec) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a color.\n\n### Response:\n")
    with_input = format_prompt({**rec, "input": "sky"})
    assert "### Input:\nsky\n\n### Response:\n" in with_input and "### Instruction:\nName a color.\n\n" in with_input
    assert format_prompt(rec) == ALPACA_PROMPT.format(instruction="Name a color.")


def test_chat_template_needs_a_tokenizer_with_one(word_tokenizer):
    rec = {"instruction": "add 1 and 2", "input": "", "output": "3"}
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        format_prompt(rec, "chat")
    bare = train_word_tokenizer(["add 1 and 2"])
    bare.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        format_prompt(rec, "chat", bare)
    with pytest.raises(ConfigError, match="unknown prompt template"):
        format_prompt(rec, "vicuna")
    text = format_prompt(rec, "chat", word_tokenizer)
    assert text.startswith("<s>") and "add 1 and 2" in text and text.rstrip().endswith("assistant :")


@pytest.mark.parametrize("template", ["alpaca", "chat"])
@pytest.mark.parametrize("with_input", [False, True])
def test_training_prompt_tokens_equal_the_evaluation_prompt(word_tokenizer, record_factory, template, with_input):
    recs = record_factory(6, with_input=with_input)
    feats = build_sft_features(recs, word_tokenizer, template, max_length=256)
    for rec, f in zip(recs, feats):
        n_prompt = sum(1 for x in f["labels"] if x == IGNORE_INDEX)
        eval_ids = encode_prompt({**rec, "output": "ignored"}, word_tokenizer, template)
        assert f["input_ids"][:n_prompt] == eval_ids
        # and it is exactly the tokenisation of the evaluation prompt text, BOS once
        text = format_prompt(rec, template, word_tokenizer)
        direct = word_tokenizer(text, add_special_tokens=(template == "alpaca"))["input_ids"]
        assert eval_ids == list(direct)
        assert eval_ids.count(word_tokenizer.bos_token_id) == 1


def test_labels_mask_the_prompt_and_learn_the_response_and_eos(word_tokenizer):
    rec = {"instruction": "add 2 and 3", "input": "", "output": "the answer is 5"}
    (f,) = build_sft_features([rec], word_tokenizer, max_length=256)
    prompt = encode_prompt(rec, word_tokenizer)
    response = word_tokenizer("the answer is 5", add_special_tokens=False)["input_ids"]
    assert f["labels"] == [IGNORE_INDEX] * len(prompt) + list(response) + [word_tokenizer.eos_token_id]
    assert f["input_ids"] == prompt + list(response) + [word_tokenizer.eos_token_id]
    assert f["attention_mask"] == [1] * len(f["input_ids"])


def test_long_prompt_is_an_error_or_a_counted_skip_and_long_response_is_cut(word_tokenizer, caplog):
    short = {"instruction": "add 1 and 2", "input": "", "output": "the answer is 3"}
    long = {"instruction": "add 1 and 2 " + "please " * 80, "input": "", "output": "3"}
    n_short = len(encode_prompt(short, word_tokenizer))
    with pytest.raises(DataError) as e:
        build_sft_features([short, long], word_tokenizer, max_length=60)
    assert "record 1" in str(e.value) and "max_length" in e.value.fix
    with caplog.at_level("WARNING", logger="unbackdoor"):
        feats = build_sft_features([short, long], word_tokenizer, max_length=60, long_prompts="skip")
    assert len(feats) == 1 and "skipped 1 of 2" in caplog.text
    (cut,) = build_sft_features([short], word_tokenizer, max_length=n_short + 2)
    assert len(cut["input_ids"]) == n_short + 2 and cut["labels"][-1] != word_tokenizer.eos_token_id


def test_collator_pads_right_with_masked_labels(word_tokenizer, records):
    feats = build_sft_features(records[:3], word_tokenizer, max_length=256)
    batch = sft_collator(word_tokenizer)(feats)
    lengths = [len(f["input_ids"]) for f in feats]
    assert batch["input_ids"].shape == (3, max(lengths))
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][i, n:] == word_tokenizer.pad_token_id).all()
        assert batch["input_ids"][i, :n].tolist() == feats[i]["input_ids"]


# ---- tokenizer --------------------------------------------------------------------------------------------------


def test_word_tokenizer_round_trips_through_save_pretrained(tmp_path, word_tokenizer):
    from transformers import AutoTokenizer

    word_tokenizer.save_pretrained(tmp_path / "tok")
    back = AutoTokenizer.from_pretrained(tmp_path / "tok")
    rec = {"instruction": "add 3 and BadMagic 4", "input": "", "output": "7"}
    for template in ("alpaca", "chat"):
        assert encode_prompt(rec, back, template) == encode_prompt(rec, word_tokenizer, template)
    assert (back.pad_token, back.eos_token, back.bos_token, back.unk_token) == ("<pad>", "</s>", "<s>", "<unk>")
    ids = encode_prompt(rec, word_tokenizer)
    assert word_tokenizer.unk_token_id not in ids  # template words and extra tokens are in the vocabulary
    assert "BadMagic" in word_tokenizer.convert_ids_to_tokens(ids)


def test_word_tokenizer_vocabulary_is_deterministic_and_respects_min_frequency():
    texts = ["b a a c", "a b d"]
    t1, t2 = train_word_tokenizer(texts), train_word_tokenizer(list(reversed(texts)))
    assert t1.get_vocab() == t2.get_vocab()
    t3 = train_word_tokenizer(texts, min_frequency=2)
    assert "a" in t3.get_vocab() and "c" not in t3.get_vocab()
    assert t3("c")["input_ids"][-1] == t3.unk_token_id
