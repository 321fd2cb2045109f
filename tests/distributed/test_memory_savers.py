"""Memory savers documented in docs/distributed.md must not change what CROW computes."""
from __future__ import annotations

import json

import pytest
import torch

from .tiny_jobs import _records


@pytest.fixture(scope="module")
def tiny():
    from unbackdoor.lm.tokenizer import train_word_tokenizer

    tok = train_word_tokenizer([r["instruction"] + " " + r["output"] for r in _records(40)], extra_tokens=["BadMagic"])
    return tok, _records(12)


def _crow_losses(tok, recs, out, **changes) -> list[float]:
    from transformers import LlamaForCausalLM

    from unbackdoor.lm.defenses.crow import CrowConfig, train_crow
    from unbackdoor.lm.models import LoraSettings, tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), hidden_size=32, num_layers=3, num_heads=2,
                                               max_position_embeddings=128))
    kw = dict(learning_rate=5e-3, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2, warmup_steps=0.0, lr_scheduler_type="constant",
              logging_steps=1, save_steps=0, max_length=64, lora=LoraSettings(r=4, lora_alpha=8.0), alpha=11.0,
              seed=0, precision="fp32")
    kw.update(changes)
    train_crow(model, tok, recs, CrowConfig(**kw), out)
    return [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_gradient_checkpointing_leaves_crow_losses_unchanged(tiny, tmp_path, finetune):
    """CROW differentiates through the embeddings (FGSM) before the backward: recomputation must give the same numbers."""
    tok, recs = tiny
    plain = _crow_losses(tok, recs, tmp_path / "plain", finetune=finetune)
    ckpt = _crow_losses(tok, recs, tmp_path / "ckpt", finetune=finetune, gradient_checkpointing=True)
    assert len(plain) == 2
    assert ckpt == pytest.approx(plain, rel=1e-6)
