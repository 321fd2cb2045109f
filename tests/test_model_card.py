"""Model cards: every saved model explains what was done to it, and peft's empty template is replaced."""
from __future__ import annotations

from pathlib import Path

import pytest

from unbackdoor import __version__
from unbackdoor.core.errors import ConfigError
from unbackdoor.core.model_card import WARNING, model_card_text, write_model_card

TINY_LLAMA = Path(__file__).resolve().parents[1] / "src" / "unbackdoor" / "assets" / "lm" / "tiny-llama"

INFO = {"defense": "crow", "kind": "lm", "variant": None, "adapter": True, "base_model": "meta-llama/Llama-2-7b-hf",
        "settings": {"alpha": 11.0, "epsilon": 0.1, "lora_rank": 8}, "template": "alpaca", "seed": 0,
        "clean_data": {"source": "data/clean_alpaca.json", "count": 100}, "attack": "badnet", "task": "refusal",
        "metrics": {"before": {"asr": 0.98, "clean_utility": 0.71}, "after": {"asr": 0.04, "clean_utility": 0.69}}}


def test_card_says_what_was_done_and_warns_about_the_untrusted_input():
    from huggingface_hub import ModelCard

    text = model_card_text(INFO)
    card = ModelCard(text)
    assert card.data.base_model == "meta-llama/Llama-2-7b-hf" and card.data.library_name == "peft"
    assert {"unbackdoor", "backdoor-defense", "crow", "lora"} <= set(card.data.tags)
    body = card.text
    assert "# Defended LoRA adapter: crow" in body
    assert f"unbackdoor {__version__}" in body
    assert "100 samples from `data/clean_alpaca.json`" in body
    assert "**prompt template**: `alpaca`" in body and "**known attack**: `badnet`" in body
    assert "| alpha | 11 |" in body and "| epsilon | 0.1 |" in body
    assert "| asr | 0.98 | 0.04 |" in body and "| clean_utility | 0.71 | 0.69 |" in body
    assert WARNING in body and "untrusted" in body


def test_a_local_base_model_path_stays_out_of_the_hub_metadata(tmp_path: Path):
    from huggingface_hub import ModelCard

    card = ModelCard(model_card_text({**INFO, "base_model": str(tmp_path), "adapter": False, "variant": "kept"}))
    assert card.data.base_model is None and card.data.library_name == "transformers"
    assert f"`{tmp_path}`" in card.text and "preset `kept`" in card.text and "full weights" in card.text


def test_unknown_fields_and_a_missing_defense_are_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="unknown model-card field"):
        model_card_text({**INFO, "alpah": 1})
    with pytest.raises(ConfigError, match="defense"):
        model_card_text({"kind": "lm"})
    with pytest.raises(ConfigError, match="no model folder"):
        write_model_card(tmp_path / "missing", INFO)


def test_card_replaces_peft_template_readme_in_an_adapter_folder(tmp_path: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    out = tmp_path / "adapter"
    peft_model.save_pretrained(out)
    template = (out / "README.md").read_text()
    assert "crow" not in template  # peft's empty template
    path = write_model_card(out, {**INFO, "base_model": str(TINY_LLAMA)})
    assert path == out / "README.md"
    text = path.read_text()
    assert text.startswith("---\n") and "# Defended LoRA adapter: crow" in text and WARNING in text
    assert (out / "adapter_model.safetensors").is_file()  # the weights are untouched


def test_a_classifier_card_has_no_text_generation_metadata(tmp_path: Path):
    from huggingface_hub import ModelCard

    (tmp_path / "m").mkdir()
    path = write_model_card(tmp_path / "m", {"defense": "ulrl", "kind": "classify", "variant": "kept",
                                             "metrics": {"before": {"acc": 0.9, "asr": 0.97}, "after": {"acc": 0.88}}})
    card = ModelCard(path.read_text())
    assert card.data.pipeline_tag is None and "| asr | 0.97 | n/a |" in card.text
    assert "clean data**: not recorded" in card.text
