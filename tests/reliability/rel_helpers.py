"""Helpers of the reliability suite: tiny models and data, a code payload, config discovery.

Named ``rel_helpers`` (not ``helpers``/``conftest``) so that it can never shadow, or be shadowed
by, a helper module of another test folder when the whole ``tests/`` tree runs in one session.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path
from typing import Any

import torch

import unbackdoor


class CodePayload:
    """Unpickling this object runs Python code that creates ``marker`` (what an attacker would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def config_classes() -> list[type]:
    """Every ``*Config`` dataclass in ``unbackdoor.*``, so new configs are covered without editing tests."""
    out: dict[str, type] = {}
    for info in pkgutil.walk_packages(unbackdoor.__path__, "unbackdoor."):
        mod = importlib.import_module(info.name)  # an import error here is a real failure
        for name, obj in vars(mod).items():
            if (isinstance(obj, type) and dataclasses.is_dataclass(obj) and name.endswith("Config")
                    and obj.__module__ == mod.__name__):
                out[f"{obj.__module__}.{name}"] = obj
    return [out[k] for k in sorted(out)]


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def alpaca_records(n: int = 16) -> list[dict[str, str]]:
    return [{"instruction": f"repeat {WORDS[i % 10]} {WORDS[(i * 3) % 10]}", "input": "",
             "output": f"{WORDS[i % 10]} {WORDS[(i * 3) % 10]}"} for i in range(n)]


def tiny_lm(seed: int = 0, num_layers: int = 2) -> tuple[Any, Any]:
    """A ``num_layers``-layer, 32-wide Llama and a word tokenizer over :func:`alpaca_records`."""
    from transformers import LlamaForCausalLM

    from unbackdoor.core.seeds import set_seed
    from unbackdoor.lm.models import tiny_llama_config
    from unbackdoor.lm.tokenizer import train_word_tokenizer

    tok = train_word_tokenizer([r["instruction"] + " " + r["output"] for r in alpaca_records(40)])
    set_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), hidden_size=32, num_layers=num_layers, num_heads=2,
                                               max_position_embeddings=128))
    return model, tok


def save_tiny_lm(folder: Path, seed: int = 0, num_layers: int = 2) -> Path:
    model, tok = tiny_lm(seed, num_layers)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_images(n: int = 64, size: int = 8, classes: int = 4, seed: int = 0):
    from unbackdoor.classify.data import from_arrays

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % classes
    return from_arrays(x, y, classes, name="tiny")


def tiny_classifier(size: int = 8, classes: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * size * size, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, classes))
