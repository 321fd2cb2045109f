"""Reference-model defenses: LoRA-delta scaling and merging identities, the scale search, refusal without a base."""
from __future__ import annotations

import json

import pytest
import torch

from unbackdoor.core.errors import ConfigError, ModelError
from unbackdoor.lm.defenses import LM_DEFENSES, LMDefenseContext
from unbackdoor.lm.defenses.lora_scale import LoraScaleConfig, choose_scale, run_lora_scale, scaled_weight
from unbackdoor.lm.defenses.merge import MergeConfig, average, dare_delta, run_merge, ties_trim
from unbackdoor.lm.models import LoraSettings, attach_lora


def _ctx(base, **kw):
    return LMDefenseContext(work_dir=None, base_model_loader=lambda: (base, None), **kw)


def _pair(make_tiny_lm):
    base = make_tiny_lm(seed=0)
    suspect = make_tiny_lm(seed=0)
    with torch.no_grad():
        for p in suspect.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return base, suspect


def test_scaling_identities_zero_is_the_base_one_is_the_suspect_and_half_is_the_mean():
    b, s = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.equal(scaled_weight(b, s, 0.0), b) and torch.allclose(scaled_weight(b, s, 1.0), s, atol=1e-6)
    assert torch.allclose(scaled_weight(b, s, 0.5), (b + s) / 2, atol=1e-6)


@pytest.mark.parametrize("w", [0.0, 0.3, 0.5, 1.0])
def test_averaging_with_weight_w_is_scaling_by_one_minus_w_and_task_arithmetic_negation(w):
    b, s = torch.randn(3, 7), torch.randn(3, 7)
    merged = average(s, b, w)
    assert torch.allclose(merged, scaled_weight(b, s, 1 - w), atol=1e-6)
    assert torch.allclose(merged, s - w * (s - b), atol=1e-6)  # negation of the suspect's task vector by lambda = w


def test_lora_scale_on_an_adapter_is_w_base_plus_s_times_the_scaled_ba(make_tiny_lm, word_tokenizer):
    base = make_tiny_lm(seed=1)
    peft = attach_lora(make_tiny_lm(seed=1), LoraSettings(r=2, lora_alpha=4.0))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    w0 = layer.base_layer.weight.detach().clone()
    ba = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach() * (4.0 / 2)
    ctx = _ctx(base)
    out = run_lora_scale(peft, word_tokenizer, [], LoraScaleConfig(scale=0.3), ctx)
    assert torch.allclose(out.model.layers[0].self_attn.q_proj.weight, w0 + 0.3 * ba, atol=1e-6)
    assert ctx.record["delta"] == "lora-adapter" and ctx.record["scale"] == 0.3 and not ctx.record["searched"]


def test_lora_scale_refuses_a_base_that_is_not_the_adapters_own(make_tiny_lm, word_tokenizer):
    peft = attach_lora(make_tiny_lm(seed=1), LoraSettings(r=2))
    with pytest.raises(ModelError, match="base model"):
        run_lora_scale(peft, word_tokenizer, [], LoraScaleConfig(scale=0.5), _ctx(make_tiny_lm(seed=2)))


def test_lora_scale_on_a_merged_suspect_scales_the_weight_difference_of_every_parameter(make_tiny_lm, word_tokenizer):
    base, suspect = _pair(make_tiny_lm)
    want = {n: scaled_weight(q.detach(), p.detach(), 0.25) for (n, p), q in
            zip(suspect.named_parameters(), base.parameters())}
    out = run_lora_scale(suspect, word_tokenizer, [], LoraScaleConfig(scale=0.25), _ctx(base))
    assert all(torch.allclose(p, want[n], atol=1e-6) for n, p in out.named_parameters())


def test_scale_search_takes_the_smallest_scale_within_tolerance_of_the_best_loss():
    losses = {0.0: 3.0, 0.2: 2.2, 0.4: 2.06, 0.6: 2.01, 0.8: 2.0, 1.0: 2.05}
    assert choose_scale(losses, 0.05) == 0.4  # 2.06 <= 2.0 * 1.05, 2.2 is not
    assert choose_scale(losses, 0.0) == 0.8
    assert choose_scale(losses, 1.0) == 0.0


def test_scale_search_records_the_clean_loss_curve(make_tiny_lm, word_tokenizer, records):
    base, suspect = _pair(make_tiny_lm)
    ctx = _ctx(base, template="alpaca")
    run_lora_scale(suspect, word_tokenizer, records, LoraScaleConfig(grid=[0.0, 0.5, 1.0], tolerance=0.5), ctx)
    curve = ctx.record["clean_loss_by_scale"]
    assert set(curve) == {"0.0", "0.5", "1.0"} and ctx.record["searched"]
    assert ctx.record["scale"] == choose_scale({float(k): v for k, v in curve.items()}, 0.5)


def test_ties_trim_keeps_the_largest_magnitude_entries():
    d = torch.tensor([[0.1, -3.0, 0.5], [2.0, -0.2, 0.0]])
    assert ties_trim(d, 0.5).tolist() == [[0.0, -3.0, 0.5], [2.0, 0.0, 0.0]]
    assert torch.equal(ties_trim(d, 1.0), d)


def test_dare_drops_at_the_rate_and_rescales_so_the_delta_is_unbiased():
    d = torch.ones(200, 200)
    out = dare_delta(d, 0.9, torch.Generator().manual_seed(0))
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.1) < 0.01
    assert torch.allclose(out[kept], torch.full_like(out[kept], 10.0))
    assert abs(float(out.mean()) - 1.0) < 0.1


def test_merge_average_equals_lora_scale_at_one_minus_the_weight(make_tiny_lm, word_tokenizer):
    base, suspect = _pair(make_tiny_lm)
    suspect2 = make_tiny_lm(seed=0)
    suspect2.load_state_dict(suspect.state_dict())
    merged = run_merge(suspect, word_tokenizer, [], MergeConfig(weight=0.3), _ctx(base))
    scaled = run_lora_scale(suspect2, word_tokenizer, [], LoraScaleConfig(scale=0.7), _ctx(base))
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(merged.parameters(), scaled.parameters()))


def test_a_base_model_of_another_architecture_is_refused(make_tiny_lm, word_tokenizer):
    with pytest.raises(ModelError, match="architecture"):
        run_merge(make_tiny_lm(layers=3), word_tokenizer, [], MergeConfig(), _ctx(make_tiny_lm(layers=2)))


@pytest.mark.parametrize("method", ["lora-scale", "merge", "cleangen"])
def test_a_reference_model_defense_refuses_clearly_without_a_base_model(tmp_path, method):
    from unbackdoor import api
    from unbackdoor.lm.testbed import ASSET_DIR

    assert LM_DEFENSES.get(method).needs.base_model
    (tmp_path / "clean.json").write_text(json.dumps([{"instruction": "Reverse the word cat .", "output": "tac"}]))
    with pytest.raises(ConfigError, match="needs the clean base model") as err:
        api.defend_lm(ASSET_DIR, tmp_path / "clean.json", tmp_path / "run", method=method)
    assert "--base-model" in str(err.value) and not (tmp_path / "run").exists()


def test_the_context_refuses_to_load_a_base_model_nobody_gave():
    with pytest.raises(ConfigError, match="--base-model"):
        LMDefenseContext(work_dir=None).load_base_model()
