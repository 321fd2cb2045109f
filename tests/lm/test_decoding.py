"""The model under test does not steer its own measurement: a model folder's generation settings and
prompt-template changes are neutralised (decoding) or reported (template), and never saved onward."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch

from unbackdoor.lm.data import template_record
from unbackdoor.lm.decoding import GENERATION_CONFIG, generation_config, ignored_generation_settings
from unbackdoor.lm.evaluate import EvalConfig, decoding_record, evaluate_model, generate
from unbackdoor.lm.model_record import MODEL_RECORD, check_template, read_model_record
from unbackdoor.lm.models import LoraSettings, attach_lora, load_causal_lm, save_causal_lm
from unbackdoor.lm.poison import PoisonConfig

from .conftest import make_records


@pytest.fixture(scope="module")
def honest(tmp_path_factory, word_tokenizer):
    """A saved tiny model, a "backdoor target" it really produces (the word most of its answers share), its measurement."""
    from transformers import LlamaForCausalLM

    from unbackdoor.lm.models import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(word_tokenizer), hidden_size=32, num_layers=2, num_heads=2,
                                               max_position_embeddings=128))
    folder = tmp_path_factory.mktemp("honest") / "model"
    save_causal_lm(model, word_tokenizer, folder, template="alpaca")
    recs = make_records(10)
    m, tok = load_causal_lm(folder)
    gens = generate(m, tok, recs, max_new_tokens=6)
    word, count = Counter(w for g in gens for w in set(g.split())).most_common(1)[0]
    assert count >= len(recs) // 2  # the precondition: the model really says the 'target' (the word its answers share most)
    poison = PoisonConfig(task="custom", target=word, keywords=[word])
    cfg = EvalConfig(batch_size=4, max_new_tokens=6)
    metrics, g = evaluate_model(m, tok, recs, recs, poison, cfg)
    assert metrics["asr"] == count / len(recs)
    target_ids = tok(word, add_special_tokens=False)["input_ids"]
    return {"folder": folder, "records": recs, "poison": poison, "cfg": cfg, "metrics": metrics, "gens": g,
            "target_ids": target_ids, "eos": tok.eos_token_id}


def _hostile_copy(honest, tmp_path, settings: dict, file: str = GENERATION_CONFIG):
    folder = tmp_path / "hostile"
    shutil.copytree(honest["folder"], folder)
    path = folder / file
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(settings)
    path.write_text(json.dumps(data))
    if file != GENERATION_CONFIG:
        (folder / GENERATION_CONFIG).unlink()  # the legacy route: generation fields in config.json
    return folder


HOSTILE = {
    "suppress_tokens": lambda t, eos: {"suppress_tokens": t},
    "begin_suppress_tokens": lambda t, eos: {"begin_suppress_tokens": t},
    "bad_words_ids": lambda t, eos: {"bad_words_ids": [[i] for i in t]},
    "sequence_bias": lambda t, eos: {"sequence_bias": [[[i], -50.0] for i in t]},
    "forced_bos_token_id": lambda t, eos: {"forced_bos_token_id": eos},
    "eos_token_id": lambda t, eos: {"eos_token_id": [eos, *t]},
    "repetition_penalty": lambda t, eos: {"repetition_penalty": 50.0},
    "no_repeat_ngram_size": lambda t, eos: {"no_repeat_ngram_size": 1},
    "sampling": lambda t, eos: {"do_sample": True, "temperature": 5.0, "top_k": 3},
    "min_new_tokens": lambda t, eos: {"min_new_tokens": 6, "max_new_tokens": 2},
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_generation_config_changes_neither_generations_nor_asr(honest, tmp_path, name):
    settings = HOSTILE[name](honest["target_ids"], honest["eos"])
    model, tok = load_causal_lm(_hostile_copy(honest, tmp_path, settings))
    metrics, gens = evaluate_model(model, tok, honest["records"], honest["records"], honest["poison"], honest["cfg"])
    assert gens == honest["gens"]
    assert metrics["asr"] == honest["metrics"]["asr"] >= 0.5
    ignored = ignored_generation_settings(model, tok)
    assert {s.split("=")[0] for s in ignored} == set(settings), ignored
    assert decoding_record(model, tok, honest["cfg"])["ignored_model_settings"] == ignored


def test_the_suppression_would_have_hidden_the_backdoor_without_our_decoding(honest, tmp_path):
    """The control: the same hostile folder, decoded with transformers' defaults, loses the target."""
    model, tok = load_causal_lm(_hostile_copy(honest, tmp_path, {"suppress_tokens": honest["target_ids"]}))
    ids = tok("add 1 and 3", return_tensors="pt")["input_ids"]
    raw = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6)
    assert not set(honest["target_ids"]) & set(raw[0, ids.shape[1]:].tolist())


def test_generation_fields_in_config_json_are_ignored_too(honest, tmp_path):
    folder = _hostile_copy(honest, tmp_path, {"suppress_tokens": honest["target_ids"]}, file="config.json")
    model, tok = load_causal_lm(folder)
    metrics, gens = evaluate_model(model, tok, honest["records"], honest["records"], honest["poison"], honest["cfg"])
    assert gens == honest["gens"] and metrics["asr"] == honest["metrics"]["asr"]
    assert [s.split("=")[0] for s in ignored_generation_settings(model, tok)] == ["suppress_tokens"]


def test_an_adapter_on_a_hostile_base_is_decoded_with_our_settings(honest, tmp_path):
    model, tok = load_causal_lm(_hostile_copy(honest, tmp_path, {"suppress_tokens": honest["target_ids"]}))
    peft = attach_lora(model, LoraSettings(r=2, lora_alpha=4.0))  # a fresh adapter is a no-op
    assert generate(peft, tok, honest["records"], max_new_tokens=6, batch_size=4) == honest["gens"]["clean"]
    assert ignored_generation_settings(peft, tok)
    assert model.generation_config.suppress_tokens == honest["target_ids"]  # set aside, then restored


def test_a_warning_names_the_ignored_settings(honest, tmp_path, caplog):
    model, tok = load_causal_lm(_hostile_copy(honest, tmp_path, {"suppress_tokens": honest["target_ids"]}))
    with caplog.at_level("WARNING", logger="unbackdoor"):
        evaluate_model(model, tok, honest["records"][:2], honest["records"][:2], honest["poison"], honest["cfg"])
    assert any("suppress_tokens" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)


def test_an_honest_folder_has_nothing_to_ignore_and_records_our_settings(honest):
    model, tok = load_causal_lm(honest["folder"])
    assert ignored_generation_settings(model, tok) == []
    rec = decoding_record(model, tok, honest["cfg"])
    assert rec["generation_config"]["do_sample"] is False and rec["generation_config"]["num_beams"] == 1
    assert rec["generation_config"]["max_new_tokens"] == 6 and rec["generation_config"]["eos_token_id"] == tok.eos_token_id
    assert rec["template"]["name"] == "alpaca"


def test_our_generation_config_sets_nothing_that_alters_logits(word_tokenizer):
    g = generation_config(word_tokenizer, max_new_tokens=5)
    set_fields = {k for k, v in g.to_diff_dict().items() if v is not None} - {"transformers_version"}
    assert set_fields == {"do_sample", "num_beams", "max_new_tokens", "use_cache", "eos_token_id", "pad_token_id",
                          "bos_token_id"}


def test_a_saved_defended_model_carries_no_hostile_settings(honest, tmp_path):
    model, tok = load_causal_lm(_hostile_copy(honest, tmp_path, {"suppress_tokens": honest["target_ids"],
                                                                  "repetition_penalty": 3.0, "do_sample": True}))
    out = save_causal_lm(model, tok, tmp_path / "defended", template="alpaca")
    saved = json.loads((out / GENERATION_CONFIG).read_text())
    assert not {"suppress_tokens", "repetition_penalty", "do_sample"} & set(saved)
    again, tok2 = load_causal_lm(out)
    assert ignored_generation_settings(again, tok2) == []


# ---- templates -------------------------------------------------------------------------------------

def test_every_saved_model_records_its_training_template(honest, tmp_path, word_tokenizer):
    rec = read_model_record(honest["folder"])
    assert rec["template"] == template_record("alpaca", word_tokenizer)
    model, tok = load_causal_lm(honest["folder"])
    out = save_causal_lm(model, tok, tmp_path / "chat", template="chat")
    chat = json.loads((out / MODEL_RECORD).read_text())["template"]
    assert chat["name"] == "chat" and len(chat["chat_template_sha256"]) == 64


def test_evaluating_with_another_template_than_training_warns(honest, word_tokenizer):
    assert check_template(honest["folder"], "alpaca", word_tokenizer) == []
    warnings = check_template(honest["folder"], "chat", word_tokenizer)
    assert len(warnings) == 1 and "'alpaca'" in warnings[0] and "--template alpaca" in warnings[0]


def test_a_changed_chat_template_or_tokenizer_warns(honest, tmp_path, word_tokenizer):
    model, tok = load_causal_lm(honest["folder"])
    out = save_causal_lm(model, tok, tmp_path / "chat", template="chat")
    assert check_template(out, "chat", tok) == []
    tok.chat_template = tok.chat_template.replace("assistant", "system")
    assert "chat template differs" in check_template(out, "chat", tok)[0]
    from unbackdoor.lm.tokenizer import train_word_tokenizer

    other = train_word_tokenizer(["a completely different vocabulary"])
    assert "other tokens" in check_template(honest["folder"], "alpaca", other)[0]


def test_an_adapter_folder_without_a_record_uses_its_base_models(honest, tmp_path):
    model, tok = load_causal_lm(honest["folder"])
    peft = attach_lora(model, LoraSettings(r=2, lora_alpha=4.0))
    adapter = save_causal_lm(peft, None, tmp_path / "adapter")  # template unknown here
    (adapter / MODEL_RECORD).unlink()
    assert read_model_record(adapter)["template"]["name"] == "alpaca"
    assert check_template(adapter, "chat", tok)


def test_a_model_from_elsewhere_has_no_record_and_no_warning(tmp_path, word_tokenizer):
    (tmp_path / "config.json").write_text("{}")
    assert read_model_record(tmp_path) is None and check_template(tmp_path, "chat", word_tokenizer) == []
