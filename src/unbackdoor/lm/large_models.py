"""Loading causal LMs too large for a plain fp32 ``from_pretrained``: dtype, QLoRA base weights, placement."""
from __future__ import annotations

from typing import Any

import torch

from ..core.distributed import launched, local_rank, world_size
from ..core.errors import ConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def large_model_kwargs(*, dtype: str = "bf16", quantize: str | None = None,
                       device_map: str | None = "process") -> dict[str, Any]:
    """Keyword arguments for ``AutoModelForCausalLM.from_pretrained`` of a 7B-70B base model.

    - ``dtype``: ``bf16`` (default; half the memory of fp32), ``fp16`` or ``fp32``. Transformers 5
      loads on the meta device and materialises weights once, so host memory stays ~1x the weights.
    - ``quantize``: ``"8bit"`` or ``"4bit"`` (NF4, double quantisation, bf16 compute) frozen base
      weights for LoRA (QLoRA), through bitsandbytes on a CUDA GPU; a ``ConfigError`` says what is
      missing otherwise. Call ``peft.prepare_model_for_kbit_training`` before adding the adapter.
    - ``device_map``: ``"process"`` puts the whole model on this process's GPU (``LOCAL_RANK``), what
      DDP needs; ``"auto"`` splits ONE model over all visible GPUs of ONE process (naive model
      parallelism, refused under a multi-process launch: use FSDP / ZeRO-3 there); ``None`` leaves
      placement to the Trainer (required with FSDP and DeepSpeed, which shard the model themselves).
    """
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}", where="large_model_kwargs",
                          fix="use bf16 on A100/H100-class GPUs, fp16 on older ones, fp32 on CPU")
    kw: dict[str, Any] = {"dtype": _DTYPES[dtype]}
    if quantize is not None:
        if quantize not in ("8bit", "4bit"):
            raise ConfigError(f"quantize {quantize!r} is not '8bit' or '4bit'", where="large_model_kwargs",
                              fix="use quantize='4bit' (QLoRA), '8bit', or None for unquantised base weights")
        if not torch.cuda.is_available():
            raise ConfigError(f"{quantize} base weights need a CUDA GPU (bitsandbytes kernels); none is visible",
                              where="large_model_kwargs(quantize=...)",
                              fix="run on a GPU machine, or load unquantised weights (quantize=None)")
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"{quantize} base weights need the bitsandbytes package, which is not installed",
                              where="large_model_kwargs(quantize=...)",
                              fix="pip install bitsandbytes, or load bf16 base weights (quantize=None; "
                                  "docs/distributed.md gives the memory either way)")
        from transformers import BitsAndBytesConfig

        if quantize == "4bit":
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)
        else:
            kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if device_map == "process":
        if torch.cuda.is_available():
            kw["device_map"] = {"": local_rank()}
    elif device_map == "auto":
        if launched():
            raise ConfigError("device_map='auto' splits one model over the GPUs of one process, but this is one of "
                              f"{world_size()} launched processes (each would claim every GPU)",
                              where="large_model_kwargs(device_map='auto')",
                              fix="use device_map='process' (DDP, one model copy per GPU) or device_map=None with an "
                                  "FSDP / DeepSpeed ZeRO-3 config (configs/accelerate/) to shard the model")
        kw["device_map"] = "auto"
    elif device_map is not None:
        raise ConfigError(f"device_map {device_map!r} is not 'process', 'auto' or None", where="large_model_kwargs",
                          fix="see the docstring of unbackdoor.lm.large_models.large_model_kwargs")
    return kw
