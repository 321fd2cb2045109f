"""BEEAR: the behaviour examples it needs, the perturbation it adds, and a short run that records what it saw."""
from __future__ import annotations

import json

import pytest
import torch

from unbackdoor.core.errors import ConfigError, DataError
from unbackdoor.lm.defenses import LM_DEFENSES, LMDefenseContext
from unbackdoor.lm.defenses.beear import BeearConfig, read_behaviour, run_beear
from unbackdoor.lm.defenses.beear.trainer import _Perturbation, prompt_positions

TARGET = "sorry I cannot"


def _behaviour(tmp_path, records, **extra):
    path = tmp_path / "behaviour.json"
    path.write_text(json.dumps([{**r, "unwanted": TARGET, **extra} for r in records]))
    return path


def test_beear_declares_behaviour_examples_and_no_trigger_or_base_model():
    spec = LM_DEFENSES.get("beear")
    assert spec.needs.behaviour_examples and spec.needs.trains and spec.needs.clean_data
    assert not spec.needs.trigger_knowledge and not spec.needs.base_model


def test_beear_refuses_before_any_compute_without_behaviour_examples(make_tiny_lm):
    spec = LM_DEFENSES.get("beear")
    with pytest.raises(ConfigError, match="--behaviour"):
        spec.check_model(make_tiny_lm(), BeearConfig())


def test_a_behaviour_example_without_an_unwanted_answer_is_named(tmp_path, records):
    path = _behaviour(tmp_path, records, unwanted="")
    with pytest.raises(DataError, match="record 0"):
        read_behaviour(path)


def test_the_default_layer_is_the_papers_depth_fraction():
    assert BeearConfig().resolve_layer(32) == 9 and BeearConfig().resolve_layer(6) == 2
    with pytest.raises(ConfigError, match="layer"):
        BeearConfig(layer=7).resolve_layer(6)


def test_the_perturbation_moves_prompt_positions_only(make_tiny_lm):
    model = make_tiny_lm(layers=2).eval()
    block = model.model.layers[0]
    seen: list[torch.Tensor] = []
    probe = block.register_forward_hook(lambda _m, _a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0]]),
             "labels": torch.tensor([[-100, -100, 7, 8, -100]])}
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hook = _Perturbation(block)
        delta = torch.full((model.config.hidden_size,), 0.5)
        hook.set(delta, batch)
        plain = seen[-1].clone()
        probe.remove()
        out: list[torch.Tensor] = []
        probe2 = model.model.layers[1].register_forward_pre_hook(lambda _m, a: out.append(a[0]))
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        probe2.remove()
        hook.handle.remove()
    moved = out[-1] - plain
    assert prompt_positions(batch).tolist() == [[True, True, False, False, False]]
    assert torch.allclose(moved[0, :2], delta.expand(2, -1), atol=1e-6) and moved[0, 2:].abs().max() < 1e-6


def test_a_short_beear_run_trains_the_adapter_and_records_the_behaviour_examples(make_tiny_lm, word_tokenizer,
                                                                                  records, tmp_path):
    path = _behaviour(tmp_path, records)
    cfg = BeearConfig(behaviour=str(path), max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                      learning_rate=1e-2, save_strategy="no", inner_steps=2, logging_steps=1, max_length=64)
    model = make_tiny_lm(layers=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = LMDefenseContext(work_dir=tmp_path / "trainer", template="alpaca")
    out = run_beear(model, word_tokenizer, records, cfg, ctx)
    info = ctx.record
    assert info["behaviour_examples"]["count"] == len(records) and info["behaviour_examples"]["file"].endswith(".json")
    assert info["layer"] == 1 and info["hidden_scale"] > 0 and info["trace_last"]["delta_norm"] > 0
    # the entrapped perturbation makes the unwanted answer likelier than it is without it
    assert info["trace_first"]["entrapped_unwanted_ce"] < info["unwanted_ce_without_delta"]
    merged = out.merge_and_unload() if hasattr(out, "merge_and_unload") else out
    assert any(not torch.allclose(p, before[n]) for n, p in merged.named_parameters() if n in before)
