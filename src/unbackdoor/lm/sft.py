"""Supervised finetuning on Alpaca records, on the Hugging Face ``Trainer``.

One engine for clean pretraining of the tiny world, backdoor injection (a poisoned mix)
and the plain-finetuning baseline. Distribution (``accelerate launch``, DeepSpeed, FSDP),
mixed precision, gradient accumulation and checkpoint/resume come from the ``Trainer``;
this module adds the data, the LoRA set-up, a NaN/inf guard and quiet logging.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from ..core import distributed
from ..core.config import check, check_non_negative, check_positive, option
from ..core.errors import ConfigError, NumericalError
from ..core.progress import progress_enabled
from ..core.runs import atomic_write_json
from ..core.safeio import check_checkpoint_dir
from ..core.seeds import set_seed
from .data import SFTCollator, build_sft_features
from .models import LoraSettings, attach_lora, is_peft_model

log = logging.getLogger("unbackdoor")


@dataclass
class SFTConfig:
    """Supervised finetuning. Defaults: the backdoor-injection SFT of BackdoorLLM (LoRA r8, lr 2e-4, 5 epochs)."""

    lr: float = option(2e-4, "peak learning rate (BackdoorLLM backdoor SFT: 2e-4)")
    epochs: float = option(5.0, "training epochs over the records (ignored when max_steps > 0)")
    max_steps: int = option(-1, "optimizer steps; -1 = run for `epochs`")
    per_device_batch_size: int = option(2, "micro-batch size per device")
    grad_accum: int = option(4, "gradient accumulation steps (effective batch = batch x accum x devices)")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = option(
        "cosine", "learning-rate schedule")
    warmup_ratio: float = option(0.1, "fraction of the optimizer steps spent in linear warm-up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient-norm clip; 0 disables clipping")
    max_length: int = option(512, "tokens per example (prompt + response); longer responses are cut")
    long_prompts: Literal["error", "skip"] = option(
        "error", "a record whose prompt alone exceeds max_length: stop with an error, or skip it (counted in the log)")
    finetune: Literal["lora", "full"] = option("lora", "train a LoRA adapter or every weight")
    lora: LoraSettings = option(factory=LoraSettings, help="LoRA settings (used when finetune='lora')")
    continue_adapter: bool = option(
        False, "keep training the adapter the model already carries, instead of merging it and adding a fresh one")
    seed: int = option(0, "seed for LoRA init, data order and dropout")
    logging_steps: int = option(10, "log the loss every N optimizer steps")
    save_steps: int = option(50, "checkpoint every N optimizer steps so a killed run can resume; 0 = never")
    save_total_limit: int = option(2, "checkpoints kept on disk (the newest ones)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "auto = bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    deepspeed: str = option("", "path to a DeepSpeed JSON config (run under `accelerate launch` / `deepspeed`)")
    nan_guard: bool = option(True, "stop with a NumericalError on a NaN/inf loss or gradient")

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_positive(self, "lr", "per_device_batch_size", "grad_accum", "max_length", "logging_steps")
        check(self.max_steps > 0 or self.max_steps == -1, "max_steps", self.max_steps, "> 0, or -1 for epochs", name)
        if self.max_steps == -1:
            check_positive(self, "epochs")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "in [0, 1)", name)
        check_non_negative(self, "weight_decay", "max_grad_norm", "save_steps")
        check_positive(self, "save_total_limit")
        check(self.max_length >= 2, "max_length", self.max_length, ">= 2", name)
        if self.continue_adapter and self.finetune != "lora":
            raise ConfigError(f"{name}: continue_adapter=true needs finetune='lora'", where=name,
                              fix="set finetune=lora, or continue_adapter=false")

    # -- the Trainer's view of this config -----------------------------------------------------

    def mixed_precision(self) -> tuple[bool, bool]:
        """``(bf16, fp16)`` for this machine."""
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

    def training_arguments(self, output_dir: str | Path, **overrides: Any) -> TrainingArguments:
        """The ``TrainingArguments`` this config stands for (``overrides`` win)."""
        bf16, fp16 = self.mixed_precision()
        kw: dict[str, Any] = dict(
            output_dir=str(output_dir),
            per_device_train_batch_size=self.per_device_batch_size,
            gradient_accumulation_steps=self.grad_accum,
            learning_rate=self.lr,
            num_train_epochs=self.epochs,
            max_steps=self.max_steps,
            lr_scheduler_type=self.scheduler,
            warmup_steps=self.warmup_ratio,  # a float < 1 is a ratio of the total steps
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            logging_steps=self.logging_steps,
            logging_first_step=True,
            save_strategy="steps" if self.save_steps > 0 else "no",
            save_steps=max(self.save_steps, 1),
            save_total_limit=self.save_total_limit,
            seed=self.seed,
            data_seed=self.seed,
            bf16=bf16,
            fp16=fp16,
            report_to="none",
            disable_tqdm=not progress_enabled(),
            remove_unused_columns=False,
            dataloader_num_workers=0,
            optim="adamw_torch",
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        if self.gradient_checkpointing:
            # transformers 5 renamed the flag; keep working with 4.x
            new = "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
            prefix = "activation_checkpointing" if new else "gradient_checkpointing"
            kw[prefix] = True
            kw[prefix + "_kwargs"] = {"use_reentrant": False}
        if self.deepspeed:
            kw["deepspeed"] = self.deepspeed
        kw.update(overrides)
        return TrainingArguments(**kw)


@dataclass
class FinetuneConfig(SFTConfig):
    """Plain finetuning on the defender's clean data: the baseline, same budget as CROW (SPEC: lr 2e-4)."""

    lr: float = option(2e-4, "learning rate of the plain-finetuning baseline (paper: 2e-4)")


# ---- guards and logging ------------------------------------------------------------------------


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` folder that was written to the end, or ``None``.

    The Trainer writes ``trainer_state.json`` last; a run killed while saving leaves a folder
    without it (or with a truncated one). Such folders are skipped, with a warning.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for p in root.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    for step, p in sorted(found, reverse=True):
        try:
            state = json.loads((p / "trainer_state.json").read_text())
            if int(state["global_step"]) == step:
                return p
        except (OSError, ValueError, KeyError, TypeError):
            pass
        log.warning("skipping incomplete checkpoint %s (killed while saving?)", p)
    return None


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
                          data_collator=SFTCollator.from_tokenizer(tokenizer), processing_class=tokenizer,
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
    """Optimizer steps in one epoch (what ``max_steps=-1`` multiplies by ``epochs``)."""
    micro = math.ceil(n_records / (cfg.per_device_batch_size * world_size))
    return max(1, math.ceil(micro / cfg.grad_accum))


def replace(cfg: SFTConfig, **changes: Any) -> SFTConfig:
    """A copy of ``cfg`` with ``changes`` (validated again)."""
    return dataclasses.replace(cfg, **changes)
