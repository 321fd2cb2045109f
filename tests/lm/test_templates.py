"""LLaMA-Factory's alpaca template (BackdoorLLM's and CROW's models) beside the Stanford form."""
from __future__ import annotations

from pathlib import Path

import pytest

from unbackdoor.core.errors import ConfigError
from unbackdoor.lm.data import (IGNORE_INDEX, TEMPLATES, build_sft_features, encode_prompt, format_prompt,
                                read_alpaca)

PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
WITH_INPUT = {"instruction": "add 1 and 2", "input": "numbers 1 2", "output": "3"}
NO_INPUT = {"instruction": "add 1 and 2", "input": "", "output": "3"}
OFFICIAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "backdoorllm"

# the word tokenizer's tokens (it splits words and punctuation, and drops whitespace)
PREAMBLE_TOKENS = ["Below", "is", "an", "instruction", "that", "describes", "a", "task", ".", "Write", "a", "response",
                   "that", "appropriately", "completes", "the", "request", "."]
PREAMBLE_WITH_INPUT_TOKENS = ["Below", "is", "an", "instruction", "that", "describes", "a", "task", ",", "paired",
                              "with", "an", "input", "that", "provides", "further", "context", ".", "Write", "a",
                              "response", "that", "appropriately", "completes", "the", "request", "."]
HEAD = ["#", "#", "#", "Instruction", ":"]
TAIL = ["#", "#", "#", "Response", ":"]


def test_llamafactory_alpaca_joins_the_input_to_the_instruction_with_a_newline():
    assert format_prompt(WITH_INPUT, "llamafactory-alpaca") == (
        PREAMBLE + "\n\n### Instruction:\nadd 1 and 2\nnumbers 1 2\n\n### Response:\n")
    assert format_prompt(WITH_INPUT, "alpaca") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nadd 1 and 2\n\n### Input:\n"
        "numbers 1 2\n\n### Response:\n")


def test_without_input_both_forms_are_the_same_text():
    assert format_prompt(NO_INPUT, "llamafactory-alpaca") == format_prompt(NO_INPUT, "alpaca") == (
        PREAMBLE + "\n\n### Instruction:\nadd 1 and 2\n\n### Response:\n")


def test_template_token_ids_with_and_without_input_in_both_forms(word_tokenizer):
    """Stanford: BOS + its text (the tokenizer adds BOS). LLaMA-Factory: no BOS (its alpaca template has no prefix
    and it encodes every piece with add_special_tokens=False), the input right after the instruction."""
    tokens = lambda rec, t: word_tokenizer.convert_ids_to_tokens(encode_prompt(rec, word_tokenizer, t))  # noqa: E731
    question, given = ["add", "1", "and", "2"], ["numbers", "1", "2"]
    assert tokens(WITH_INPUT, "alpaca") == ["<s>", *PREAMBLE_WITH_INPUT_TOKENS, *HEAD, *question,
                                            "#", "#", "#", "Input", ":", *given, *TAIL]
    assert tokens(WITH_INPUT, "llamafactory-alpaca") == [*PREAMBLE_TOKENS, *HEAD, *question, *given, *TAIL]
    assert tokens(NO_INPUT, "alpaca") == ["<s>", *PREAMBLE_TOKENS, *HEAD, *question, *TAIL]
    assert tokens(NO_INPUT, "llamafactory-alpaca") == [*PREAMBLE_TOKENS, *HEAD, *question, *TAIL]


@pytest.mark.parametrize("with_input", [False, True])
def test_llamafactory_training_prompt_equals_its_evaluation_prompt(word_tokenizer, record_factory, with_input):
    recs = record_factory(4, with_input=with_input)
    for rec, f in zip(recs, build_sft_features(recs, word_tokenizer, "llamafactory-alpaca", max_length=256)):
        n_prompt = sum(1 for x in f["labels"] if x == IGNORE_INDEX)
        assert f["input_ids"][:n_prompt] == encode_prompt(rec, word_tokenizer, "llamafactory-alpaca")
        assert word_tokenizer.bos_token_id not in f["input_ids"]
        assert f["input_ids"][-1] == word_tokenizer.eos_token_id  # response + EOS, as LLaMA-Factory's assistant turn


def test_llamafactory_system_prompt_replaces_its_default_verbatim_and_history_is_refused():
    assert format_prompt({**NO_INPUT, "system": "You are terse."}, "llamafactory-alpaca") == (
        "You are terse.### Instruction:\nadd 1 and 2\n\n### Response:\n")
    with pytest.raises(ConfigError, match="multi-turn"):
        format_prompt({**NO_INPUT, "history": [["hi", "hello"]]}, "llamafactory-alpaca")


def test_the_template_is_registered_for_every_flag():
    from unbackdoor.cli import build_parser

    assert "llamafactory-alpaca" in TEMPLATES
    args = build_parser().parse_args(["lm", "defend", "--model", "m", "--clean", "c.json", "--out", "o",
                                      "--template", "llamafactory-alpaca"])
    assert args.template == "llamafactory-alpaca"


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason="the BackdoorLLM data (../shared/data/backdoorllm) is not here")
def test_the_forms_differ_on_exactly_the_official_records_with_input():
    """SPEC section 6: 43 of the 100 clean defense records and 93 of the 200 refusal test prompts."""
    for rel, n_input in (("consistency_data/consistency_data.json", 43),
                         ("test_data/clean/refusal/test_data_no_trigger.json", 93)):
        recs = read_alpaca(OFFICIAL / rel)
        differ = [format_prompt(r, "alpaca") != format_prompt(r, "llamafactory-alpaca") for r in recs]
        assert sum(differ) == n_input and differ == [bool(r["input"]) for r in recs]
