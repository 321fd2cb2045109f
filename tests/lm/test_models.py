"""Models: save/load round trips (full, LoRA adapter, merged), LoRA set-up, safe outputs."""
from __future__ import annotations

import pytest
import torch

from unbackdoor.core.errors import ConfigError, ModelError, UnbackdoorError
from unbackdoor.lm.models import (
    LoraSettings, attach_lora, count_parameters, is_peft_model, load_causal_lm, save_causal_lm, tiny_llama_config,
)

IDS = torch.tensor([[2, 9, 10, 11, 12, 13], [2, 14, 15, 16, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def _perturb_lora(model, seed=1):
    """Fresh LoRA B matrices are zero (a no-op adapter); give them values so round trips mean something."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_tiny_config_has_the_requested_shape():
    cfg = tiny_llama_config(100, hidden_size=64, num_layers=3, num_heads=4)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (100, 64, 3, 4)
    assert cfg.intermediate_size == 192 and not cfg.tie_word_embeddings
    with pytest.raises(ConfigError, match="divisible"):
        tiny_llama_config(100, hidden_size=30, num_heads=4)


def test_full_model_round_trip_gives_the_same_logits(tmp_path, make_tiny_lm, word_tokenizer):
    model = make_tiny_lm()
    out = save_causal_lm(model, word_tokenizer, tmp_path / "full")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    back, tok = load_causal_lm(out)
    assert torch.equal(_logits(model), _logits(back))
    assert tok.get_vocab() == word_tokenizer.get_vocab()


def test_lora_adapter_round_trip_from_the_adapter_folder(tmp_path, make_tiny_lm, word_tokenizer):
    base_dir = save_causal_lm(make_tiny_lm(), word_tokenizer, tmp_path / "base")
    base, tok = load_causal_lm(base_dir)
    model = attach_lora(base, LoraSettings())
    _perturb_lora(model)
    adapter_dir = save_causal_lm(model, tok, tmp_path / "adapter", inputs=[base_dir])
    assert (adapter_dir / "adapter_model.safetensors").is_file() and not (adapter_dir / "model.safetensors").exists()
    # the adapter folder alone is enough: its base is read from adapter_config.json
    back, _ = load_causal_lm(adapter_dir)
    assert is_peft_model(back)
    assert torch.allclose(_logits(model), _logits(back), atol=1e-6)
    # and the explicit form gives the same
    back2, _ = load_causal_lm(base_dir, adapter=adapter_dir)
    assert torch.allclose(_logits(back), _logits(back2), atol=0)
    assert not torch.allclose(_logits(back), _logits(load_causal_lm(base_dir)[0]), atol=1e-4)


def test_merged_model_round_trip_is_a_plain_model_with_the_same_logits(tmp_path, make_tiny_lm, word_tokenizer):
    model = attach_lora(make_tiny_lm(), LoraSettings())
    _perturb_lora(model)
    before = _logits(model)
    out = save_causal_lm(model, word_tokenizer, tmp_path / "merged", merge=True)
    assert is_peft_model(model), "merging must not strip the caller's adapter"
    back, _ = load_causal_lm(out)
    assert not is_peft_model(back) and not (out / "adapter_config.json").exists()
    assert torch.allclose(before, _logits(back), atol=1e-5)


def test_lora_targets_every_linear_layer_but_lm_head(make_tiny_lm):
    model = attach_lora(make_tiny_lm(layers=2), LoraSettings())
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all("lm_head" not in n for n, p in model.named_parameters() if p.requires_grad)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total


def test_continue_adapter_keeps_the_attackers_weights_and_fresh_adapter_merges_them(make_tiny_lm):
    attacked = attach_lora(make_tiny_lm(), LoraSettings())
    _perturb_lora(attacked)
    reference = _logits(attacked)
    kept = attach_lora(attacked, LoraSettings(), continue_adapter=True)
    assert kept is attacked and torch.equal(_logits(kept), reference)
    assert all(("lora_" in n) == p.requires_grad for n, p in kept.named_parameters())
    fresh = attach_lora(make_tiny_lm(), LoraSettings())  # a new model with a different adapter
    _perturb_lora(fresh, seed=7)
    merged_then_fresh = attach_lora(fresh, LoraSettings())
    assert torch.allclose(_logits(merged_then_fresh), _logits(fresh), atol=1e-5)  # new adapter starts as a no-op
    with pytest.raises(ConfigError, match="carries no adapter"):
        attach_lora(make_tiny_lm(), LoraSettings(), continue_adapter=True)


def test_lora_settings_reject_out_of_range_values():
    with pytest.raises(ConfigError, match="'LoraSettings.r'"):
        LoraSettings(r=0)
    with pytest.raises(ConfigError, match="dropout"):
        LoraSettings(dropout=1.0)
    with pytest.raises(ConfigError, match="target_modules"):
        attach_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoraSettings(target_modules="no_such_proj"))


def test_save_refuses_to_write_inside_the_input_folder(tmp_path, make_tiny_lm, word_tokenizer):
    base_dir = save_causal_lm(make_tiny_lm(), word_tokenizer, tmp_path / "base")
    listing = sorted(p.name for p in base_dir.iterdir())
    with pytest.raises(UnbackdoorError, match="inside the input"):
        save_causal_lm(make_tiny_lm(), word_tokenizer, base_dir / "out", inputs=[base_dir])
    with pytest.raises(UnbackdoorError, match="inside the input"):
        save_causal_lm(make_tiny_lm(), word_tokenizer, base_dir, inputs=[base_dir])
    assert sorted(p.name for p in base_dir.iterdir()) == listing


def test_loading_a_missing_or_non_model_folder_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_causal_lm(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")


def test_adapter_without_weights_is_a_model_error(tmp_path, make_tiny_lm, word_tokenizer):
    base_dir = save_causal_lm(make_tiny_lm(), word_tokenizer, tmp_path / "base")
    model = attach_lora(load_causal_lm(base_dir)[0], LoraSettings())
    adapter_dir = save_causal_lm(model, word_tokenizer, tmp_path / "adapter")
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match="no adapter weights"):
        load_causal_lm(adapter_dir)
