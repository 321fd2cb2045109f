"""Supervised finetuning on Alpaca records, on the Hugging Face ``Trainer``: the engine of every LM defense that trains.

One engine for clean pretraining of the tiny world, backdoor injection (a poisoned mix),
the plain-finetuning baseline and CROW (whose trainer subclasses :class:`SFTTrainer`). Distribution (``accelerate launch``, DeepSpeed, FSDP),
mixed precision, gradient accumulation and checkpoint/resume come from the ``Trainer``;
this module adds the data, the LoRA set-up, a NaN/inf guard and quiet logging.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal, Sequence

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from ..core import distributed
from ..core.config import check, check_non_negative, check_positive, from_dict, option
from ..core.errors import ConfigError, NumericalError
from ..core.progress import progress_enabled
from ..core.runs import atomic_write_json, last_complete_checkpoint
from ..core.safeio import check_checkpoint_dir
from ..core.seeds import set_seed
from .data import build_sft_features, sft_collator
from .models import LoraSettings, attach_lora, is_peft_model

log = logging.getLogger("unbackdoor")


def _field(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field documented like the Hugging Face ones (``metadata["help"]``)."""
    return option(default, help, factory=factory)


@dataclass
class SFTConfig(TrainingArguments):
    """Supervised finetuning on Alpaca records: ``transformers.TrainingArguments`` plus what SFT needs.

    Every Trainer option (``report_to``, ``optim``, ``gradient_checkpointing``, ``deepspeed``, ``bf16``,
    ...) is a field; the defaults below are BackdoorLLM's backdoor-injection SFT (LoRA r8, lr 2e-4,
    5 epochs, batch 2 x accumulation 4, cosine, warm-up 0.1). Old short names are accepted as aliases
    (``lr``, ``epochs``, ``grad_accum``, ``per_device_batch_size``, ``scheduler``, ``warmup_ratio``),
    and LLaMA-Factory's LoRA names (``lora_rank``, ``lora_target``...). ``output_dir`` is set by the
    flow that runs the trainer (the run folder); leave it empty.
    """

    ALIASES: ClassVar[dict[str, str]] = {
        "lr": "learning_rate", "epochs": "num_train_epochs", "per_device_batch_size": "per_device_train_batch_size",
        "batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps",
        "scheduler": "lr_scheduler_type", "warmup_ratio": "warmup_steps",
        "lora_rank": "lora.r", "lora_target": "lora.target_modules", "lora_dropout": "lora.dropout",
        "finetuning_type": "finetune",
    }

    # -- Trainer options with this toolkit's defaults -----------------------------------------
    output_dir: str | None = _field(None, "where checkpoints go (set by the run: RUN/trainer)")
    learning_rate: float = _field(2e-4, "peak learning rate (BackdoorLLM backdoor SFT: 2e-4)")
    num_train_epochs: float = _field(5.0, "training epochs over the records (ignored when max_steps > 0)")
    per_device_train_batch_size: int = _field(2, "micro-batch size per device")
    gradient_accumulation_steps: int = _field(4, "gradient accumulation steps (effective batch = batch x accum x devices)")
    lr_scheduler_type: Any = _field("cosine", "learning-rate schedule (cosine, linear, constant, constant_with_warmup...)")
    warmup_steps: float = _field(0.1, "linear warm-up: a float < 1 is a fraction of the optimizer steps (0.1)")
    logging_steps: float = _field(10, "log the loss every N optimizer steps")
    logging_first_step: bool = _field(True, "log the first step too")
    save_steps: float = _field(50, "checkpoint every N optimizer steps so a killed run can resume (0: never)")
    save_total_limit: int | None = _field(2, "checkpoints kept on disk (the newest ones)")
    seed: int = _field(0, "seed for LoRA init, data order and dropout")
    report_to: Any = _field("none", "experiment trackers: none, tensorboard, wandb (offline: WANDB_MODE=offline), "
                                    "trackio, or a list")
    remove_unused_columns: bool = _field(False, "keep every feature column (the collator needs labels)")
    optim: Any = _field("adamw_torch", "optimizer (the Trainer's names; adamw_torch)")
    # -- SFT ------------------------------------------------------------------------------
    max_length: int = _field(512, "tokens per example (prompt + response); longer responses are cut")
    long_prompts: Literal["error", "skip"] = _field(
        "error", "a record whose prompt alone exceeds max_length: stop with an error, or skip it (counted in the log)")
    finetune: Literal["lora", "full"] = _field("lora", "train a LoRA adapter or every weight")
    lora: LoraSettings = _field(factory=LoraSettings, help="LoRA settings (used when finetune='lora')")
    continue_adapter: bool = _field(
        False, "keep training the adapter the model already carries, instead of merging it and adding a fresh one")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _field(
        "auto", "auto = bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU (bf16/fp16 flags override)")
    nan_guard: bool = _field(True, "stop with a NumericalError on a NaN/inf loss or gradient")

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.lora, dict):
            self.lora = from_dict(LoraSettings, self.lora, source=f"{name}.lora")
        if self.save_steps == 0:  # the old spelling of "never"
            self.save_strategy = "no"
            self.save_steps = 500
        check_positive(self, "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                       "max_length", "logging_steps")
        check(self.max_steps > 0 or self.max_steps == -1, "max_steps", self.max_steps, "> 0, or -1 for epochs", name)
        if self.max_steps == -1:
            check_positive(self, "num_train_epochs")
        check(0 <= self.warmup_steps, "warmup_steps", self.warmup_steps, ">= 0 (a float < 1 is a ratio)", name)
        check_non_negative(self, "weight_decay", "max_grad_norm")
        check_positive(self, "per_device_eval_batch_size", "adam_epsilon")  # inherited fields the Trainer takes as given
        if self.neftune_noise_alpha is not None:
            check_non_negative(self, "neftune_noise_alpha")
        check(self.max_length >= 2, "max_length", self.max_length, ">= 2", name)
        if self.continue_adapter and self.finetune != "lora":
            raise ConfigError(f"{name}: continue_adapter=true needs finetune='lora'", where=name,
                              fix="set finetune=lora, or continue_adapter=false")
        if self.deepspeed and importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"{name}: deepspeed={self.deepspeed!r} but the deepspeed package is not installed",
                              where="--deepspeed", fix="pip install deepspeed (on a machine with GPUs), or drop "
                                                       "--deepspeed")
        try:
            super().__post_init__()
        except ValueError as e:  # the Trainer's own checks (e.g. bf16 on a CPU)
            raise ConfigError(f"{name}: {str(e).splitlines()[0]}", where=name,
                              fix="correct the setting named above") from None

    # -- the Trainer's view of this config -----------------------------------------------------

    def precision_flags(self) -> tuple[bool, bool]:
        """``(bf16, fp16)`` for this machine (an explicit bf16/fp16 field wins over ``precision``)."""
        if self.bf16 or self.fp16:
            return bool(self.bf16), bool(self.fp16)
        if self.precision == "fp32":
            return False, False
        cuda = torch.cuda.is_available()
        if self.precision == "auto":
            if not cuda:
                return False, False
            return (True, False) if torch.cuda.is_bf16_supported() else (False, True)
        if not cuda:
            raise ConfigError(f"precision={self.precision} needs a GPU; none is available", where="precision",
                              fix="use precision=auto or fp32 on CPU")
        return self.precision == "bf16", self.precision == "fp16"

    def training_arguments(self, output_dir: str | Path, **overrides: Any) -> "SFTConfig":
        """This config, ready for the Trainer: output folder, precision, quiet bars (``overrides`` win)."""
        bf16, fp16 = self.precision_flags()
        kw: dict[str, Any] = dict(output_dir=str(output_dir), bf16=bf16, fp16=fp16,
                                  data_seed=self.seed if self.data_seed is None else self.data_seed,
                                  dataloader_pin_memory=torch.cuda.is_available() and self.dataloader_pin_memory)
        if self.disable_tqdm is None:
            kw["disable_tqdm"] = not progress_enabled()
        if self.gradient_checkpointing and not self.gradient_checkpointing_kwargs:
            kw["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
        kw.update(overrides)
        return dataclasses.replace(self, **kw)


@dataclass
class FinetuneConfig(SFTConfig):
    """Plain finetuning on the defender's clean data: the baseline, same budget as CROW (SPEC: lr 2e-4)."""

    learning_rate: float = _field(2e-4, "learning rate of the plain-finetuning baseline (paper: 2e-4)")


# ---- guards and logging ------------------------------------------------------------------------


def _last_checkpoint_note(output_dir: str | Path) -> str:
    last = last_complete_checkpoint(output_dir)
    return f"the last good checkpoint is {last} (resume from it with resume=True)" if last else \
        "no checkpoint was written before the fault"


def check_finite(value: torch.Tensor, term: str, step: int, output_dir: str | Path) -> None:
    """Raise ``NumericalError`` naming ``term`` and ``step`` unless ``value`` is finite."""
    if not bool(torch.isfinite(value.detach()).all()):
        raise NumericalError(
            f"the loss term {term} is {value.detach().float().flatten()[0].item()} at optimizer step {step}",
            where=f"training in {output_dir}, step {step}, term {term}",
            fix=f"lower the learning rate, use fp32, or check the data; {_last_checkpoint_note(output_dir)}",
        )


class NanGuard(TrainerCallback):
    """Stops the run before a non-finite gradient reaches the weights."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: D401
        if model is None or args.fp16:  # fp16: the gradient scaler skips overflowing steps by design
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        norms = torch.stack([g.detach().float().norm() for g in grads])
        if not bool(torch.isfinite(norms).all()):
            bad = next(n for n, p in model.named_parameters()
                       if p.grad is not None and not bool(torch.isfinite(p.grad).all()))
            raise NumericalError(
                f"non-finite gradient in {bad} at optimizer step {state.global_step + 1}",
                where=f"training in {args.output_dir}, step {state.global_step + 1}, gradient of {bad}",
                fix=f"lower the learning rate, use fp32, or check the data; {_last_checkpoint_note(args.output_dir)}",
            )


class LogToLogger(TrainerCallback):
    """Trainer logs go to the ``unbackdoor`` logger (and so to the run's log.txt), not stdout."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            items = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
            log.info("step %d: %s", state.global_step, items)


class SFTTrainer(Trainer):
    """The HF ``Trainer`` with a finite-loss check on each micro-batch."""

    def __init__(self, *args: Any, nan_guard: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.nan_guard = nan_guard

    def check_term(self, value: torch.Tensor, term: str) -> None:
        if self.nan_guard:
            check_finite(value, term, self.state.global_step + 1, self.args.output_dir)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = out[0] if return_outputs else out
        self.check_term(loss, "L_LM")
        return out


# ---- entry points ----------------------------------------------------------------------------------


def prepare_model(model: Any, cfg: SFTConfig) -> Any:
    """LoRA (fresh, or the model's own adapter) or full finetuning; seeded for LoRA init."""
    set_seed(cfg.seed)
    if cfg.finetune == "lora":
        return attach_lora(model, cfg.lora, continue_adapter=cfg.continue_adapter)
    if is_peft_model(model):
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def run_trainer(trainer_cls: type[Trainer], model: Any, tokenizer: Any, features: Sequence[dict], cfg: SFTConfig,
                output_dir: str | Path, *, resume: bool = False, callbacks: Iterable[TrainerCallback] = (),
                **trainer_kwargs: Any) -> Any:
    """Prepare the model, train with ``trainer_cls``, write ``log_history.json``; return the trained model."""
    output_dir = Path(output_dir)
    model = prepare_model(model, cfg)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # no KV cache in training (and required by gradient checkpointing)
    distributed.cpu_env()  # under `accelerate launch` without GPUs: gloo DDP, not N lone copies
    args = cfg.training_arguments(output_dir)
    distributed.check_trainer_distributed(args)
    cbs: list[TrainerCallback] = [LogToLogger(), *callbacks]
    if cfg.nan_guard:
        cbs.insert(0, NanGuard())
    trainer = trainer_cls(model=model, args=args, train_dataset=list(features),
                          data_collator=sft_collator(tokenizer), processing_class=tokenizer,
                          callbacks=cbs, nan_guard=cfg.nan_guard, **trainer_kwargs)
    trainer.remove_callback(PrinterCallback)
    if not progress_enabled():
        trainer.remove_callback(ProgressCallback)
    checkpoint = None
    if resume:
        found = last_complete_checkpoint(output_dir)
        if found:
            check_checkpoint_dir(found)  # every file inside it, every pickle pre-scanned (core.safeio)
        checkpoint = str(found) if found else None
        log.info("resume: %s", f"from {checkpoint}" if checkpoint else "no checkpoint found, starting afresh")
    trainer.train(resume_from_checkpoint=checkpoint)
    distributed.on_main_process(atomic_write_json, output_dir / "log_history.json", trainer.state.log_history)
    trained = trainer.model
    if getattr(trained.config, "use_cache", None) is False:
        trained.config.use_cache = True
    return trained.eval()


def train_sft(model: Any, tokenizer: Any, records: Sequence[dict], cfg: SFTConfig, output_dir: str | Path, *,
              template: str = "alpaca", resume: bool = False, callbacks: Iterable[TrainerCallback] = ()) -> Any:
    """Finetune ``model`` on Alpaca ``records`` (prompt masked, response + EOS learned).

    Checkpoints go to ``output_dir/checkpoint-N`` every ``cfg.save_steps``; ``resume=True``
    continues from the newest one. Returns the trained model (a ``PeftModel`` for LoRA) in
    eval mode; save it with :func:`unbackdoor.lm.models.save_causal_lm`.
    """
    features = build_sft_features(records, tokenizer, template, cfg.max_length, long_prompts=cfg.long_prompts)
    return run_trainer(SFTTrainer, model, tokenizer, features, cfg, output_dir, resume=resume, callbacks=callbacks)


def steps_per_epoch(n_records: int, cfg: SFTConfig, world_size: int = 1) -> int:
    """Optimizer steps in one epoch (what ``max_steps=-1`` multiplies by ``num_train_epochs``)."""
    micro = math.ceil(n_records / (cfg.per_device_train_batch_size * world_size))
    return max(1, math.ceil(micro / cfg.gradient_accumulation_steps))
