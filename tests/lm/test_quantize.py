"""Quantization: NF4 (with double quantisation) and int8 round trips against naive references and bitsandbytes."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from unbackdoor.core.errors import ConfigError
from unbackdoor.lm.defenses import LM_DEFENSES, LMDefenseContext
from unbackdoor.lm.defenses.quantize import NF4_CODE, QuantizeConfig, run_quantize
from unbackdoor.lm.defenses.quantize.codes import dynamic_code, int8_roundtrip, nf4_roundtrip

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def nearest(value: float, code: list[float]) -> float:
    """The code value nearest to ``value``; on an exact midpoint the lower one (bitsandbytes' rule)."""
    best = code[0]
    for c in code[1:]:
        if abs(value - c) < abs(value - best):
            best = c
    return best


def naive_blockwise(values: list[float], code: list[float], block: int) -> list[float]:
    out = []
    for start in range(0, len(values), block):
        chunk = values[start:start + block]
        absmax = max(abs(v) for v in chunk)
        out += [nearest(max(-1.0, min(1.0, v / absmax)), code) * absmax for v in chunk]
    return out


def test_nf4_code_book_is_the_qlora_one():
    assert len(NF4_CODE) == 16 and NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[-1] == 1.0
    assert list(NF4_CODE) == sorted(NF4_CODE)


def test_nf4_round_trip_is_the_nearest_code_value_times_the_block_absmax():
    w = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))  # 150 values: blocks of 64, 64, 22
    got = nf4_roundtrip(w, block=64, double_quant=False)
    want = torch.tensor(naive_blockwise(w.flatten().tolist(), list(NF4_CODE), 64)).reshape(w.shape)
    assert torch.allclose(got, want, atol=1e-6)
    # every value is a code value times its block's absmax
    blocks = w.flatten().split(64)
    for b, q in zip(blocks, got.flatten().split(64)):
        assert all(min(abs(float(v) / float(b.abs().max()) - c) for c in NF4_CODE) < 1e-5 for v in q)


def test_nf4_round_trip_is_exact_on_values_already_in_the_code_book():
    w = torch.tensor(NF4_CODE * 4).reshape(4, 16) * 0.37
    assert torch.allclose(nf4_roundtrip(w, double_quant=False), w, atol=1e-7)


def test_double_quantisation_rounds_the_centred_block_scales_with_the_8_bit_dynamic_code():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 64, generator=g) * torch.linspace(0.01, 2.0, 40).unsqueeze(1)  # 40 different scales
    code4, code8 = list(NF4_CODE), dynamic_code().tolist()
    flat = w.flatten().tolist()
    absmax = [max(abs(v) for v in flat[i:i + 64]) for i in range(0, len(flat), 64)]
    mean = sum(absmax) / len(absmax)
    scales = [s + mean for s in naive_blockwise([a - mean for a in absmax], code8, 256)]
    want = []
    for i, s in enumerate(scales):
        chunk = flat[i * 64:(i + 1) * 64]
        a = absmax[i]
        want += [nearest(max(-1.0, min(1.0, v / a)), code4) * s for v in chunk]
    got = nf4_roundtrip(w, 64, double_quant=True, dq_block=256)
    assert torch.allclose(got, torch.tensor(want).reshape(w.shape), atol=1e-5)
    assert not torch.allclose(got, nf4_roundtrip(w, 64, double_quant=False))


def test_dynamic_code_has_256_sorted_values_from_minus_one_to_one():
    code = dynamic_code()
    assert code.numel() == 256 and torch.equal(code, code.sort().values)
    assert float(code[-1]) == 1.0 and 0.0 in code.tolist() and float(code.min()) > -1.0


def test_int8_round_trip_is_symmetric_absmax_per_row():
    w = torch.randn(4, 9, generator=torch.Generator().manual_seed(2))
    got = int8_roundtrip(w)
    for row, q in zip(w.tolist(), got.tolist()):
        s = max(abs(v) for v in row) / 127
        assert q == pytest.approx([round(v / s) * s for v in row], abs=1e-6)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (optional: the reference needs no package)")
def test_reference_matches_bitsandbytes_kernels():
    from unbackdoor.lm.defenses.quantize.codes import bitsandbytes_int8_roundtrip, bitsandbytes_nf4_roundtrip

    w = torch.randn(64, 192, generator=torch.Generator().manual_seed(3)) * 0.05
    assert torch.equal(nf4_roundtrip(w, double_quant=False), bitsandbytes_nf4_roundtrip(w, double_quant=False))
    # double quantisation: bitsandbytes' native CPU kernel may round a few scales to the neighbouring 8-bit code
    diff = (nf4_roundtrip(w) - bitsandbytes_nf4_roundtrip(w)).abs()
    assert float(diff.max()) < 2e-3 and float((diff > 0).float().mean()) < 0.02
    half = w.half().float()
    assert torch.allclose(int8_roundtrip(half), bitsandbytes_int8_roundtrip(half), atol=1e-3)


@pytest.mark.skipif(HAS_BNB, reason="bitsandbytes is installed here")
def test_asking_for_bitsandbytes_without_it_is_a_clear_error(make_tiny_lm):
    with pytest.raises(ConfigError, match="bitsandbytes"):
        run_quantize(make_tiny_lm(), None, [], QuantizeConfig(backend="bitsandbytes"), None)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantize_replaces_decoder_linears_leaves_lm_head_and_records_the_backend(make_tiny_lm, scheme):
    model = make_tiny_lm()
    head = model.lm_head.weight.detach().clone()
    q_proj = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    ctx = LMDefenseContext(work_dir=None)
    out = run_quantize(model, None, [], QuantizeConfig(scheme=scheme, backend="reference"), ctx)
    assert torch.equal(out.lm_head.weight, head)
    fn = int8_roundtrip if scheme == "int8" else nf4_roundtrip
    assert torch.equal(out.model.layers[0].self_attn.q_proj.weight, fn(q_proj))
    assert ctx.record["backend"] == "reference" and ctx.record["scheme"] == scheme
    assert 0 < ctx.record["relative_weight_error"] < (0.15 if scheme == "nf4" else 0.02)


def test_quantize_spec_needs_nothing_and_offers_int8():
    spec = LM_DEFENSES.get("quantize")
    assert not spec.needs.trains and not spec.needs.clean_data and not spec.needs.base_model
    assert spec.make_config(preset="int8").scheme == "int8"
