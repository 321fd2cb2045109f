"""Quantise-dequantise of weight tensors, as pure functions: NF4 with double quantisation, and int8.

NF4 (QLoRA, Dettmers et al. 2023) as bitsandbytes computes it: the flattened tensor is cut into
blocks of 64; each block is scaled by its absolute maximum into [-1, 1] and every value is
rounded to the nearest of the 16 NF4 code values (midpoint thresholds; a value exactly on a
midpoint takes the lower code). Double quantisation stores the fp32 block scales themselves in
8 bits: their mean is subtracted, and the centred scales are quantised blockwise (blocks of 256)
with bitsandbytes' signed 8-bit dynamic code, each block by its own absolute maximum. The
dequantised weight is ``code4[q] * (code8[q2] * absmax2 + mean)``. int8 is symmetric absmax
rounding per output row: ``round(w / s) * s`` with ``s = max|w_row| / 127``.
"""
from __future__ import annotations

import functools

import torch

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
"""The 16 NF4 values (quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero), as in QLoRA / bitsandbytes."""


@functools.lru_cache(maxsize=None)
def dynamic_code(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``): 256 sorted values in [-1, 1].

    For each exponent ``i`` below ``max_exponent_bits``, ``2**i`` fraction values (midpoints of a
    linear grid on [0.1, 1]) are scaled by ``10**(i - max_exponent_bits + 1)``, with both signs;
    then 0 and 1.
    """
    data: list[float] = []
    non_sign = total_bits - 1
    for i in range(max_exponent_bits):
        bounds = torch.linspace(0.1, 1, 2 ** (i + non_sign - max_exponent_bits) + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def _padded_blocks(flat: torch.Tensor, block: int) -> torch.Tensor:
    """``flat`` as ``[n_blocks, block]`` rows, the last block padded with zeros (zeros never raise an absmax)."""
    pad = (-flat.numel()) % block
    return torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block)


def blockwise_quantize(x: torch.Tensor, code: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, absmax)``: each block of the flattened ``x`` scaled by its absmax, rounded to the nearest code."""
    flat = x.detach().reshape(-1).float()
    rows = _padded_blocks(flat, block)
    absmax = rows.abs().amax(dim=1)
    scaled = torch.clamp(rows / absmax.clamp(min=1e-38).unsqueeze(1), -1, 1).reshape(-1)[: flat.numel()]
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds), absmax


def blockwise_dequantize(idx: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int) -> torch.Tensor:
    vals = code[idx]
    return (_padded_blocks(vals, block) * absmax.unsqueeze(1)).reshape(-1)[: vals.numel()]


def nf4_roundtrip(w: torch.Tensor, block: int = 64, double_quant: bool = True, dq_block: int = 256) -> torch.Tensor:
    """``w`` quantised to NF4 (and its scales double-quantised) and back, in ``w``'s shape and dtype."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    idx, absmax = blockwise_quantize(w, code, block)
    if double_quant:
        offset = absmax.mean()
        dcode = dynamic_code()
        idx2, absmax2 = blockwise_quantize(absmax - offset, dcode, dq_block)
        absmax = blockwise_dequantize(idx2, absmax2, dcode, dq_block) + offset
    return blockwise_dequantize(idx, absmax, code, block).reshape(w.shape).to(w.dtype)


def int8_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """Symmetric absmax int8 per output row (LLM.int8()'s row-wise weight format, without outlier decomposition)."""
    x = w.detach().float()
    rows = x.reshape(x.shape[0], -1)
    scale = (rows.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
    q = torch.clamp(torch.round(rows / scale), -127, 127)
    return (q * scale).reshape(w.shape).to(w.dtype)


def bitsandbytes_nf4_roundtrip(w: torch.Tensor, block: int = 64, double_quant: bool = True) -> torch.Tensor:
    """The same round trip through bitsandbytes' own kernels (``quantize_4bit`` / ``dequantize_4bit``)."""
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(w.detach().contiguous(), blocksize=block, compress_statistics=double_quant,
                                  quant_type="nf4")
    return bnbf.dequantize_4bit(q, state).reshape(w.shape).to(w.dtype)


def bitsandbytes_int8_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """Row-wise int8 through bitsandbytes (``int8_vectorwise_quant``: the ``Linear8bitLt`` weight format)."""
    import bitsandbytes.functional as bnbf

    q, stats, _ = bnbf.int8_vectorwise_quant(w.detach().contiguous().to(torch.float16))
    return (q.float() * (stats.float().unsqueeze(1) / 127.0)).reshape(w.shape).to(w.dtype)


__all__ = ["NF4_CODE", "bitsandbytes_int8_roundtrip", "bitsandbytes_nf4_roundtrip", "blockwise_dequantize",
           "blockwise_quantize", "dynamic_code", "int8_roundtrip", "nf4_roundtrip"]
