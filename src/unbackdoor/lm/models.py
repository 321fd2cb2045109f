"""Causal LMs: tiny configs, safe loading (full weights or a PEFT adapter), LoRA, saving.

A model handed to a defense is untrusted: weights are read as safetensors when present,
pickles only with ``weights_only=True``, repository code never runs unless asked, and
outputs are written atomically and never into an input folder.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel

from ..core.config import check, check_positive, option
from ..core.errors import ConfigError, ModelError
from ..core.progress import progress_enabled
from ..core.runs import atomic_dir
from ..core.safeio import check_model_folder, check_output_path, hf_pretrained_kwargs
from .decoding import write_clean_generation_config
from .model_record import write_model_record

log = logging.getLogger("unbackdoor")

ADAPTER_CONFIG = "adapter_config.json"
DECODING_DEFENSE_FILE = "decoding_defense.json"


def tiny_llama_config(vocab_size: int, *, hidden_size: int = 128, num_layers: int = 6, num_heads: int = 4,
                      intermediate_size: int | None = None, max_position_embeddings: int = 512,
                      pad_token_id: int | None = 0, bos_token_id: int | None = 2,
                      eos_token_id: int | None = 3) -> LlamaConfig:
    """A small ``LlamaConfig`` for CPU experiments (defaults fit the word tokenizer's ids).

    ``intermediate_size`` defaults to Llama's SwiGLU ratio (8/3 of hidden, rounded up to 32).
    """
    if vocab_size < 4:
        raise ConfigError(f"vocab_size = {vocab_size} is too small", where="tiny_llama_config",
                          fix="pass len(tokenizer)")
    if hidden_size % num_heads:
        raise ConfigError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}",
                          where="tiny_llama_config", fix="choose num_heads dividing hidden_size")
    if intermediate_size is None:
        intermediate_size = -(-(8 * hidden_size // 3) // 32) * 32
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, tie_word_embeddings=False,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )


@contextlib.contextmanager
def _hf_bars() -> Iterator[None]:
    """Silence the Hugging Face load/save bars when our progress bars are off (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not progress_enabled():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()


# ---- loading -----------------------------------------------------------------------------------


def is_adapter_dir(path: str | Path) -> bool:
    """A PEFT adapter folder (has ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_decoding_defense_dir(path: str | Path) -> bool:
    """A decoding-time defense folder (``decoding_defense.json``: the models it combines and its settings)."""
    return (Path(path) / DECODING_DEFENSE_FILE).is_file()


def _adapter_base(adapter: Path) -> str:
    try:
        cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"adapter config is not valid JSON: {e}", where=str(adapter / ADAPTER_CONFIG),
                         fix="the adapter folder is damaged; regenerate it") from None
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ModelError("the adapter does not name its base model", where=str(adapter / ADAPTER_CONFIG),
                         fix="pass the base model folder as path and this folder as adapter=")
    if not Path(base).exists() and (adapter / base).exists():  # a path relative to the adapter folder
        return str(adapter / base)
    return str(base)


def _check_adapter_weights(adapter: Path) -> None:
    """Refuse adapter pickles that carry code, and files outside the folder, before peft reads them."""
    if check_model_folder(adapter):  # weights_only=True scan: raises UnsafeFileError on code
        return
    raise ModelError("adapter folder holds no adapter weights", where=str(adapter),
                     fix="expected adapter_model.safetensors (or adapter_model.bin) next to adapter_config.json")


def _check_model_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise ModelError(f"{what} not found: {path}", where=str(path), fix="check the path; models are never downloaded")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelError(f"{what} is not a Hugging Face model folder (no config.json): {path}", where=str(path),
                         fix="pass a folder written by save_pretrained (config.json + *.safetensors)")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    """Tokenizer from a folder, with a pad token (EOS when it has none) for batching."""
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}", where=str(path),
                         fix="save the tokenizer next to the model (tokenizer.save_pretrained)") from None
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def _refuse_missing_weights(info: dict[str, Any], path: Path) -> None:
    """A checkpoint without some weights (e.g. ``lm_head``) would be completed with random ones: refuse it."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelError(f"the checkpoint lacks {len(missing)} weight(s) of the model ({shown}): transformers "
                         "would initialise them at random, so the model measured would not be the model given",
                         where=str(path), fix="pass the complete checkpoint (every shard its index names); a model "
                                              "whose lm_head is its input embedding says tie_word_embeddings=true "
                                              "in config.json")


def load_causal_lm(path: str | Path, *, adapter: str | Path | None = None, trust_remote_code: bool = False,
                   dtype: torch.dtype | str | None = None, trainable_adapter: bool = True) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a model folder, optionally with a PEFT adapter on top.

    ``path`` may itself be an adapter folder: its base model is then read from
    ``adapter_config.json``. The tokenizer comes from the adapter folder when it holds one,
    else from the base. ``dtype`` defaults to float32 (training on CPU needs it). ``path`` may
    also be a ``.gguf`` file, a folder holding one, or a named model such as
    ``smollm2-135m-instruct`` (see :mod:`unbackdoor.lm.gguf`: converted once into a cached folder).
    """
    from .gguf import resolve_model_source  # a named model or a GGUF file/folder: its converted folder

    path = Path(resolve_model_source(path)).resolve()  # adapters record this as their base: keep it absolute
    if adapter is None and is_decoding_defense_dir(path):  # e.g. CleanGen: a folder naming its two models
        from .decoding_defense import load_decoding_defense

        return load_decoding_defense(path, trust_remote_code=trust_remote_code, dtype=dtype)
    if adapter is None and is_adapter_dir(path):
        adapter, path = path, Path(resolve_model_source(_adapter_base(path)))
    _check_model_dir(path, "base model" if adapter is not None else "model")
    kwargs = hf_pretrained_kwargs(path, trust_remote_code)
    kwargs["dtype"] = dtype if dtype is not None else torch.float32
    try:
        with _hf_bars():
            model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except (ValueError, OSError, RuntimeError) as e:  # unknown architecture, damaged config, mis-shaped weights
        raise ModelError(f"cannot load a causal LM from {path}: {str(e).splitlines()[0]}", where=str(path),
                         fix="pass a causal language model folder (e.g. LlamaForCausalLM); "
                             "custom architectures need --trust-remote-code") from None
    _refuse_missing_weights(info, path)
    tok_dir = path
    if adapter is not None:
        from peft import PeftModel

        adapter = Path(adapter)
        if not is_adapter_dir(adapter):
            raise ModelError(f"not a PEFT adapter folder (no {ADAPTER_CONFIG}): {adapter}", where=str(adapter),
                             fix="pass the folder written by the adapter's save_pretrained")
        _check_adapter_weights(adapter)
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable_adapter)
        if (adapter / "tokenizer_config.json").is_file() or (adapter / "tokenizer.json").is_file():
            tok_dir = adapter
    return model, load_tokenizer(tok_dir, trust_remote_code)


# ---- LoRA ----------------------------------------------------------------------------------------


@dataclass
class LoraSettings:
    """LoRA as in the CROW paper: rank 8, alpha 16, no dropout, every linear layer but ``lm_head``."""

    r: int = option(8, "LoRA rank (paper: 8)")
    lora_alpha: float = option(16.0, "LoRA scaling numerator; scale = lora_alpha / r (paper: 16)")
    dropout: float = option(0.0, "dropout on the LoRA input (paper: 0)")
    target_modules: str = option("all-linear", "modules to adapt: 'all-linear' (every nn.Linear except lm_head) "
                                               "or comma-separated module names, e.g. 'q_proj,v_proj'")

    def __post_init__(self) -> None:
        check_positive(self, "r", "lora_alpha")
        check(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)", type(self).__name__)
        check(bool(self.target_modules.strip()), "target_modules", self.target_modules, "non-empty",
              type(self).__name__)

    def peft_config(self) -> Any:
        from peft import LoraConfig

        targets: Any = self.target_modules.strip()
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        return LoraConfig(task_type="CAUSAL_LM", r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.dropout,
                          target_modules=targets, bias="none")


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def attach_lora(model: Any, settings: LoraSettings, *, continue_adapter: bool = False) -> Any:
    """Make ``model`` LoRA-trainable.

    ``continue_adapter=True`` keeps training the adapter the model already carries (the
    official CROW setting: it continues the attacker's adapter). Otherwise any existing
    adapter is merged into the weights first and a fresh one is attached on top.
    """
    from peft import get_peft_model

    if is_peft_model(model):
        if continue_adapter:
            n = 0
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
                n += int("lora_" in name)
            if n == 0:
                raise ModelError("continue_adapter=True but the model's adapter has no LoRA weights",
                                 where="attach_lora", fix="use continue_adapter=False for a fresh adapter")
            return model
        model = model.merge_and_unload()
    elif continue_adapter:
        raise ConfigError("continue_adapter=True but the model carries no adapter", where="continue_adapter",
                          fix="load the model with its adapter (load_causal_lm(adapter=...)) or set "
                              "continue_adapter=false")
    try:
        return get_peft_model(model, settings.peft_config())
    except ValueError as e:
        raise ConfigError(f"cannot attach LoRA: {str(e).splitlines()[0]}", where="lora.target_modules",
                          fix="name modules that exist in the model, or use 'all-linear'") from None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


# ---- saving --------------------------------------------------------------------------------------


def save_causal_lm(model: Any, tokenizer: Any, out_dir: str | Path, *, merge: bool = False,
                   inputs: Iterable[str | Path | None] = (), in_place: bool = False,
                   template: str | None = None) -> Path:
    """Save with ``save_pretrained``, atomically: an adapter folder, merged weights, or a full model.

    ``merge=True`` on a PEFT model writes a standalone model with the adapter merged in; the
    merge runs on a copy unless ``in_place=True`` (saves memory on large models, but leaves
    ``model`` merged). ``inputs`` are the folders the model came from: writing inside one of
    them is refused. The folder gets a clean ``generation_config.json`` (token ids only: no
    suppressed or forced tokens, penalties or sampling the input model may have carried) and
    ``unbackdoor.json`` recording ``template``, the prompt template the model was trained with
    (:mod:`unbackdoor.lm.model_record`).
    """
    out = Path(out_dir)
    check_output_path(out, *[p for p in inputs if p is not None])
    to_save = model
    if getattr(model, "is_decoding_defense", False):  # weights unchanged: a small folder naming both models
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        return out
    if merge and is_peft_model(model):
        to_save = (model if in_place else copy.deepcopy(model)).merge_and_unload()
    if not isinstance(to_save, PreTrainedModel) and not is_peft_model(to_save):
        raise ModelError(f"cannot save a {type(to_save).__name__} with save_pretrained", where=str(out),
                         fix="pass a Hugging Face PreTrainedModel or a PeftModel")
    with atomic_dir(out) as tmp, _hf_bars():
        to_save.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_clean_generation_config(tmp, tokenizer, to_save)
        write_model_record(tmp, tokenizer, template)
    return out
