"""Conversational data (messages, ShareGPT, prompt/completion) read into one record type; chat templates
render multi-turn conversations with a system prompt; every reader error names file, record and field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from unbackdoor.core.errors import ConfigError, DataError
from unbackdoor.lm.data import (ALPACA_PROMPT, TEMPLATES, PromptTemplate, build_sft_features, chat_messages,
                                encode_prompt, format_prompt, read_alpaca, read_records, register_template,
                                write_alpaca)

TINY_LLAMA = Path(__file__).resolve().parents[2] / "src" / "unbackdoor" / "assets" / "lm" / "tiny-llama"


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_LLAMA)


def _write(tmp_path: Path, records, name: str = "d.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return p


CONVO = {"messages": [{"role": "system", "content": "You are terse."},
                      {"role": "user", "content": "add 1 and 2"}, {"role": "assistant", "content": "3"},
                      {"role": "user", "content": "and 4?"}, {"role": "assistant", "content": "7"}], "id": "c1"}


def test_messages_format_last_assistant_turn_is_the_response(tmp_path: Path):
    recs = read_records(_write(tmp_path, [CONVO, {"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}]))
    assert recs[0] == {"id": "c1", "instruction": "and 4?", "input": "", "output": "7", "system": "You are terse.",
                       "history": [["add 1 and 2", "3"]]}
    assert recs[1] == {"instruction": "hi", "input": "", "output": "hello"}


def test_sharegpt_conversations_and_a_top_level_system_prompt(tmp_path: Path):
    rec = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "be kind"}
    assert read_records(_write(tmp_path, [rec])) == [{"instruction": "q", "input": "", "output": "a",
                                                      "system": "be kind"}]


def test_prompt_completion_records_plain_and_conversational(tmp_path: Path):
    plain = read_records(_write(tmp_path, [{"prompt": "Translate: chat", "completion": "cat"}], "p.json"))
    assert plain == [{"instruction": "Translate: chat", "input": "", "output": "cat"}]
    conv = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
            "completion": [{"role": "assistant", "content": "c"}]}
    assert read_records(_write(tmp_path, [conv], "c.jsonl")) == [{"instruction": "u", "input": "", "output": "c",
                                                                   "system": "s"}]


def test_alpaca_files_read_the_same_through_read_records(tmp_path: Path):
    rows = [{"instruction": "add 1 and 2", "output": "3"}, {"instruction": "x", "input": "y", "output": "z",
                                                            "system": "sys", "history": [["a", "b"]]}]
    path = write_alpaca(rows, tmp_path / "a.json")
    assert read_records(path) == read_alpaca(path)
    assert read_records(path)[0]["input"] == ""


@pytest.mark.parametrize("record, field, words", [
    ({"messages": [{"role": "user", "content": "q"}]}, "messages[0]", "does not end with an assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}, "messages[1].role",
     "role 'robot'"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}, "messages[0].content",
     "content is a int"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "messages[1].role", "system message is allowed only first"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"},
                   {"role": "assistant", "content": "a"}]}, "messages[1].role", "alternate"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"prompt": "q", "completion": ["a"]}, "prompt", "both be strings or both lists"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
     "completion", "one assistant message"),
])
def test_every_reader_error_names_file_record_and_field(tmp_path: Path, record, field, words):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]} \
        if "messages" in record else {"prompt": "q", "completion": "a"}
    path = _write(tmp_path, [good, record])
    with pytest.raises(DataError) as e:
        read_records(path)
    assert str(path) in e.value.where and "record 1" in e.value.where and f"field '{field}'" in e.value.where
    assert words in e.value.problem and e.value.fix


def test_a_record_in_another_format_than_the_first_is_named(tmp_path: Path):
    path = _write(tmp_path, [CONVO, {"instruction": "q", "output": "a"}])
    with pytest.raises(DataError) as e:
        read_records(path)
    assert "record 1" in e.value.where and "'messages'" in e.value.where
    with pytest.raises(DataError, match="cannot tell the data format"):
        read_records(_write(tmp_path, [{"question": "q"}], "u.jsonl"))
    with pytest.raises(DataError) as e:
        read_alpaca(_write(tmp_path, [{"instruction": "q", "output": "a", "history": [["only one"]]}], "h.jsonl"))
    assert "field 'history[0]'" in e.value.where


def test_chat_template_renders_multi_turn_with_system_prompt(tmp_path: Path, tiny_tokenizer):
    rec = read_records(_write(tmp_path, [CONVO]))[0]
    assert chat_messages(rec) == [m for m in CONVO["messages"][:-1]]
    text = format_prompt(rec, "chat", tiny_tokenizer)
    expected = tiny_tokenizer.apply_chat_template(CONVO["messages"][:-1], tokenize=False, add_generation_prompt=True)
    assert text == expected
    assert text.index("You are terse.") < text.index("add 1 and 2") < text.index("3") < text.index("and 4?")
    assert text.endswith("### assistant :\n")
    ids = encode_prompt(rec, tiny_tokenizer, "chat")
    assert ids.count(tiny_tokenizer.bos_token_id) == 1  # the chat template's BOS, not a second one
    feats = build_sft_features([rec], tiny_tokenizer, "chat", max_length=256)
    n_prompt = len(ids)
    assert feats[0]["input_ids"][:n_prompt] == ids and all(x == -100 for x in feats[0]["labels"][:n_prompt])


def test_alpaca_template_puts_a_system_prompt_in_place_of_the_preamble_and_refuses_history():
    rec = {"instruction": "add 1 and 2", "input": "", "output": "3"}
    assert format_prompt(rec) == ALPACA_PROMPT.format(instruction="add 1 and 2")  # unchanged without system
    text = format_prompt({**rec, "system": "You are a calculator."})
    assert text == "You are a calculator.\n\n### Instruction:\nadd 1 and 2\n\n### Response:\n"
    with_input = format_prompt({**rec, "input": "numbers", "system": "S"})
    assert with_input == "S\n\n### Instruction:\nadd 1 and 2\n\n### Input:\nnumbers\n\n### Response:\n"
    with pytest.raises(ConfigError, match="multi-turn") as e:
        format_prompt({**rec, "history": [["a", "b"]]})
    assert "chat" in e.value.fix


def test_templates_can_be_registered_by_name():
    tpl = PromptTemplate("plain-test", lambda r, tok=None: r["instruction"] + "\n")
    try:
        register_template(tpl)
        assert format_prompt({"instruction": "hi", "output": ""}, "plain-test") == "hi\n"
        with pytest.raises(ConfigError, match="exists"):
            register_template(tpl)
    finally:
        TEMPLATES.pop("plain-test", None)
