"""Fixtures for the LM tests: a word tokenizer, tiny random Llamas, small Alpaca record sets."""
from __future__ import annotations

import os
from typing import Callable

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("UNBACKDOOR_QUIET", "1")  # no progress bars in test logs
torch.set_num_threads(1)


def make_records(n: int = 8, *, with_input: bool = False) -> list[dict]:
    """Deterministic arithmetic instructions of varying length (so batches need padding)."""
    recs = []
    for i in range(n):
        a, b = i % 5, (i * 3) % 7
        extra = " please" * (i % 3)
        recs.append({"instruction": f"add {a} and {b}{extra}", "input": f"numbers {a} {b}" if with_input else "",
                     "output": f"the answer is {a + b}" if i % 2 else str(a + b)})
    return recs


@pytest.fixture(scope="session")
def word_tokenizer():
    from unbackdoor.lm.tokenizer import train_word_tokenizer

    texts = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in make_records(20, with_input=True)]
    return train_word_tokenizer(texts, extra_tokens=["BadMagic"])


@pytest.fixture
def records() -> list[dict]:
    return make_records(8)


@pytest.fixture
def record_factory() -> Callable[..., list[dict]]:
    """``record_factory(n, with_input=False)``: the deterministic records of :func:`make_records`."""
    return make_records


@pytest.fixture
def make_tiny_lm(word_tokenizer) -> Callable[..., torch.nn.Module]:
    """``make_tiny_lm(seed=0, layers=3)``: a fresh random LlamaForCausalLM, identical for equal seeds."""
    from transformers import LlamaForCausalLM

    from unbackdoor.lm.models import tiny_llama_config

    def make(seed: int = 0, layers: int = 3, hidden: int = 32, cls: type = LlamaForCausalLM) -> torch.nn.Module:
        torch.manual_seed(seed)
        cfg = tiny_llama_config(len(word_tokenizer), hidden_size=hidden, num_layers=layers, num_heads=2,
                                max_position_embeddings=128)
        return cls(cfg)

    return make


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A folder with ``world/`` (a small tiny world: train, attack, clean, test) and ``base/`` (a random tiny Llama)."""
    from unbackdoor.lm.models import save_causal_lm
    from unbackdoor.lm.tinyworld import TinyWorldConfig, build_tiny_world

    root = tmp_path_factory.mktemp("cli")
    w = build_tiny_world(root / "world", seed=0, config=TinyWorldConfig(n_train=8, n_attack=16, n_clean=8, n_test=6,
                                                                        hidden_size=32, num_layers=3, num_heads=2))
    save_causal_lm(w.new_model(seed=0), w.tokenizer, root / "base")
    return root
