"""Weight quantization, no training: NF4 with double quantisation (the CROW paper's baseline) or int8.

Every decoder ``nn.Linear`` but ``lm_head`` (what ``load_in_4bit`` / ``load_in_8bit`` quantise) is
replaced by its quantise-dequantise round trip, after merging an adapter. The model stays an
ordinary float model whose weights hold exactly the values the quantised model computes with,
so it is saved, loaded and evaluated like any other (no memory is saved: this measures what
quantization does to the backdoor, not its footprint). The round trip runs through bitsandbytes'
kernels when the package imports (``backend='auto'``), else through the exact PyTorch reference in
:mod:`.codes`; the run records which one produced its numbers (``defense_info.backend``).
int8 is weight-only row-wise absmax: LLM.int8()'s activation outlier decomposition is not simulated.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from ....core.config import check, option
from ....core.defense import DefenseSpec, Needs
from ....core.errors import ConfigError, ModelError
from ..common import linear_layers, merged, skip_list
from .codes import (NF4_CODE, bitsandbytes_int8_roundtrip, bitsandbytes_nf4_roundtrip, dynamic_code, int8_roundtrip,
                    nf4_roundtrip)

log = logging.getLogger("unbackdoor")

__all__ = ["NF4_CODE", "QuantizeConfig", "SPEC", "dynamic_code", "int8_roundtrip", "nf4_roundtrip", "resolve_backend",
           "run_quantize"]


@dataclass
class QuantizeConfig:
    """Quantization (CROW paper: 4-bit NF4 with double quantisation; int8 as the second setting)."""

    scheme: Literal["nf4", "int8"] = option("nf4", "nf4 = 4-bit NormalFloat, blockwise (QLoRA / bitsandbytes); "
                                                   "int8 = row-wise absmax 8-bit")
    block_size: int = option(64, "NF4 block size (bitsandbytes default 64)")
    double_quant: bool = option(True, "also quantise the NF4 block scales to 8 bits (QLoRA double quantisation)")
    double_quant_block_size: int = option(256, "block size of the double quantisation (bitsandbytes: 256)")
    backend: Literal["auto", "bitsandbytes", "reference"] = option(
        "auto", "auto = bitsandbytes when it is installed, else the PyTorch reference (the same numbers up to the "
                "rounding of a few double-quantised scales); the run records which one ran")
    skip: str = option("lm_head", "comma-separated name fragments of linear layers left in full precision "
                                  "(bitsandbytes leaves lm_head)")
    seed: int = option(0, "recorded only: quantization is deterministic")

    def __post_init__(self) -> None:
        check(self.block_size in (32, 64, 128, 256, 512, 1024, 2048, 4096), "block_size", self.block_size,
              "a power of two from 32 to 4096", type(self).__name__)
        check(self.double_quant_block_size > 0, "double_quant_block_size", self.double_quant_block_size, "> 0",
              type(self).__name__)


def resolve_backend(requested: str) -> str:
    """``bitsandbytes`` or ``reference``: the backend that will run, refusing a missing bitsandbytes clearly."""
    available = importlib.util.find_spec("bitsandbytes") is not None
    if requested == "bitsandbytes" and not available:
        raise ConfigError("backend=bitsandbytes but the bitsandbytes package is not installed", where="--backend",
                          fix="pip install bitsandbytes, or use backend=reference (the same numbers on any device)")
    if requested == "auto":
        return "bitsandbytes" if available else "reference"
    return requested


def _roundtrip(cfg: QuantizeConfig, backend: str) -> Any:
    if cfg.scheme == "int8":
        return bitsandbytes_int8_roundtrip if backend == "bitsandbytes" else int8_roundtrip
    if backend == "bitsandbytes":
        if cfg.double_quant_block_size != 256:
            raise ConfigError("bitsandbytes double-quantises with blocks of 256 only", where="double_quant_block_size",
                              fix="use 256, or backend=reference")
        return lambda w: bitsandbytes_nf4_roundtrip(w, cfg.block_size, cfg.double_quant)
    return lambda w: nf4_roundtrip(w, cfg.block_size, cfg.double_quant, cfg.double_quant_block_size)


@torch.no_grad()
def run_quantize(model: Any, tokenizer: Any, clean: Sequence[dict], cfg: QuantizeConfig, ctx: Any) -> Any:
    """Replace every selected linear weight by its quantised value (in place, after merging an adapter)."""
    backend = resolve_backend(cfg.backend)
    fn = _roundtrip(cfg, backend)
    model = merged(model)
    layers = linear_layers(model, skip_list(cfg.skip))
    if not layers:
        raise ModelError(f"{type(model).__name__} has no linear layer to quantize", where="quantize",
                         fix="check --skip: it must not name every linear layer")
    err = num = 0.0
    n = 0
    for _, layer in layers:
        w = layer.weight
        q = fn(w.data).to(w.device, w.dtype)
        err += float(((q.float() - w.float()) ** 2).sum())
        num += float((w.float() ** 2).sum())
        n += w.numel()
        w.copy_(q)
    info: dict[str, Any] = {"scheme": cfg.scheme, "backend": backend, "layers": len(layers), "weights": n,
                            "relative_weight_error": round((err / max(num, 1e-30)) ** 0.5, 6),
                            "device": str(layers[0][1].weight.device)}
    if backend == "bitsandbytes":
        import bitsandbytes

        info["bitsandbytes_version"] = getattr(bitsandbytes, "__version__", "unknown")
    log.info("quantize: %s via %s on %d linear layers (relative weight error %.4f)", cfg.scheme, backend, len(layers),
             info["relative_weight_error"])
    if ctx is not None and hasattr(ctx, "record"):
        ctx.record.update(info)
    return model


SPEC = DefenseSpec(
    name="quantize", kind="lm", config=QuantizeConfig, run=run_quantize, needs=Needs(trains=False, clean_data=False),
    summary="weight quantization round trip: NF4 + double quantisation (default) or int8 (no training, no data)",
    paper="the CROW paper's quantization baseline (4-bit NF4, QLoRA: Dettmers et al., NeurIPS 2023)",
    presets={"int8": {"scheme": "int8"}, "nf4-single": {"double_quant": False},
             "bnb": {"backend": "bitsandbytes"}, "int8-bnb": {"scheme": "int8", "backend": "bitsandbytes"}},
)
