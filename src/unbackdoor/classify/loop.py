"""One training loop for everything that trains a classifier: the attack, ULRL, FT, FP, NAD, ...

The method-specific part is a loss function and hooks, not a new loop: unlearning is
``fit(loss_fn=negated CE, on_batch=stop when accuracy <= 0.2)``, relearning is ``fit`` with a
penalty added to the loss, fine-tuning is plain ``fit``. The loop brings the rest: SGD with
momentum and weight decay, a per-epoch schedule, grad-norm clipping, a NaN/inf guard, progress
bars, and resumable checkpoints.

Checkpoints (``checkpoint_dir/last/``) are a folder replaced in one rename, holding
``model.safetensors``, ``optimizer.safetensors`` (momentum buffers, the global RNG state) and
``state.json`` (epoch, history, optimizer hyper-parameters, scheduler state). The data order and
the augmentation of epoch ``e`` come from a generator seeded with ``(seed, e)``, so a run killed
after any checkpoint and resumed with ``resume=True`` reaches the same final weights.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core import distributed, safeio
from ..core.config import check, check_non_negative, check_positive, option, to_dict
from ..core.errors import ConfigError, ModelError, NumericalError, UnbackdoorError
from ..core.progress import progress
from ..core.runs import atomic_dir, atomic_write_json, read_json
from .batching import Inputs, Prepare, as_inputs_labels, batch_len, clean_batches, to_device
from .data import ImageData, iterate_batches
from .models import forward_logits
from .transforms import Compose, standard_augmentation

log = logging.getLogger("unbackdoor.classify.loop")

__all__ = ["make_optimizer", "TrainConfig", "StepInfo", "EpochInfo", "FitResult", "EpochLog", "fit", "fit_sgd", "evaluate_accuracy",
           "LossFn"]

LossFn = Callable[..., torch.Tensor]
"""``loss_fn(logits, targets, *, model, inputs) -> scalar``; the default is cross-entropy."""


@dataclass
class TrainConfig:
    """SGD training settings; the defaults are BackdoorBench's for training a CIFAR-10 model."""

    epochs: int = option(100, "number of passes over the data (BackdoorBench: 100)")
    batch_size: int = option(128, "images per step (BackdoorBench: 128)")
    lr: float = option(0.01, "initial learning rate (BackdoorBench: 0.01)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "SGD weight decay (L2)")
    nesterov: bool = option(False, "use Nesterov momentum")
    optimizer: Literal["sgd", "adamw"] = option(
        "sgd", "sgd (BackdoorBench's, for CNNs trained from scratch) or adamw (pretrained encoders: momentum is "
               "unused, weight_decay is AdamW's decoupled decay)")
    scheduler: Literal["cosine", "multistep", "constant"] = option(
        "cosine", "learning-rate schedule, stepped once per epoch (BackdoorBench: cosine annealing)")
    milestones: tuple[int, ...] = option((10, 20), "epochs at which 'multistep' multiplies the lr by gamma")
    gamma: float = option(0.1, "lr factor at each 'multistep' milestone")
    warmup_epochs: int = option(0, "linear warm-up epochs before the schedule (0: none)")
    grad_clip: float | None = option(None, "clip the gradient norm to this value (None: no clipping; ULRL: 20)")
    augment: bool = option(True, "random crop (padding 4) and horizontal flip during training")
    flip: bool = option(True, "include the horizontal flip in the augmentation (turn off for traffic signs)")
    crop_padding: int = option(4, "zero padding of the random crop")
    seed: int = option(0, "seed of data order and augmentation (model init is seeded by the caller)")
    checkpoint_every: int = option(0, "write a resumable checkpoint every this many epochs (0: only at the end "
                                      "when a checkpoint folder is given)")
    device: str = option("auto", "'auto' (the model's device), 'cpu', 'cuda', 'cuda:1', ...")
    log_every: int = option(0, "log the running loss every this many steps (0: once per epoch)")

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_positive(self, "epochs", "batch_size", "lr")
        check_non_negative(self, "momentum", "weight_decay", "warmup_epochs", "checkpoint_every", "crop_padding",
                           "log_every")
        check(0 < self.gamma <= 1, "gamma", self.gamma, "in (0, 1]", name)
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "> 0 or None", name)
        check(self.momentum < 1, "momentum", self.momentum, "< 1", name)
        check(all(m > 0 for m in self.milestones), "milestones", self.milestones, "positive epochs", name)
        self.milestones = tuple(sorted(int(m) for m in self.milestones))


@dataclass
class StepInfo:
    """What ``on_batch`` sees after each optimizer step (running values are over the current epoch)."""

    epoch: int
    step: int
    global_step: int
    loss: float
    running_loss: float
    running_acc: float
    seen: int
    lr: float
    grad_norm: float


@dataclass
class EpochInfo:
    """What ``on_epoch_end`` sees after each epoch."""

    epoch: int
    loss: float
    acc: float
    lr: float
    seconds: float
    steps: int


@dataclass
class FitResult:
    epochs_done: int
    global_step: int
    stopped_early: bool
    history: list[dict[str, float]]
    seconds: float
    resumed_from: int | None = None


# ---- helpers ------------------------------------------------------------------------------

def _resolve_device(model: nn.Module, device: str) -> torch.device:
    if device == "auto":
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device '{device}'", where="TrainConfig.device", fix="use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no GPU is available", where="TrainConfig.device",
                          fix="use device=cpu (or auto)")
    return dev


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + 17) % (2**62)


def _total_norm(grads: list[torch.Tensor]) -> float:
    """The global L2 norm of ``grads`` (fused where torch has it: torch >= 2.6)."""
    if not grads:
        return 0.0
    if hasattr(nn.utils, "get_total_norm"):
        return float(nn.utils.get_total_norm(grads))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the CNN recipes) or AdamW (finetuning a pretrained encoder), from ``cfg``."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def _make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-epoch multiplier on the base lr: warm-up, then cosine / multistep / constant."""
    def factor(epoch: int) -> float:
        if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
            return (epoch + 1) / (cfg.warmup_epochs + 1)
        if cfg.scheduler == "cosine":
            span = max(1, cfg.epochs - cfg.warmup_epochs)
            return 0.5 * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))
        if cfg.scheduler == "multistep":
            return cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def default_loss(logits: torch.Tensor, targets: torch.Tensor, **_: Any) -> torch.Tensor:
    return F.cross_entropy(logits, targets)


def _batches_for_epoch(data: Any, cfg: TrainConfig, epoch: int, transform: Any,
                       device: torch.device) -> Iterable[tuple[Inputs, torch.Tensor]]:
    if isinstance(data, ImageData):
        aug = standard_augmentation(cfg.crop_padding, cfg.flip) if cfg.augment else None
        pipeline = Compose([aug, transform]) if (aug or transform) else None
        return iterate_batches(data, cfg.batch_size, shuffle=True, seed=_epoch_seed(cfg.seed, epoch),
                               transform=pipeline, device=device)
    if callable(data):
        return data(epoch)
    return data


# ---- checkpoints ---------------------------------------------------------------------------

def _save_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler, epoch: int, global_step: int,
                     history: list[dict[str, float]], cfg: TrainConfig) -> None:
    opt_state = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v
    scalars = {str(pid): {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
               for pid, st in opt_state["state"].items()}
    sched_state = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    state = {"epoch": epoch, "global_step": global_step, "history": history, "param_groups": opt_state["param_groups"],
             "state_scalars": scalars, "scheduler": sched_state, "config": to_dict(cfg)}
    with atomic_dir(folder / "last") as tmp:
        safeio.save_state_dict(model.state_dict(), tmp / "model.safetensors")
        safeio.save_state_dict(tensors, tmp / "optimizer.safetensors")
        atomic_write_json(tmp / "state.json", state)


def _load_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler) -> tuple[int, int, list[dict[str, float]]]:
    last = folder / "last"
    state = read_json(last / "state.json")
    safeio.load_into(model, last / "model.safetensors")
    tensors = safeio.load_state_dict(last / "optimizer.safetensors")
    dev = next(model.parameters()).device
    opt_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    for pid, sc in state["state_scalars"].items():
        opt_state["state"][int(pid)] = dict(sc)
    for key, v in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            opt_state["state"].setdefault(int(pid), {})[name] = v.to(dev)
    try:
        opt.load_state_dict(opt_state)
    except (ValueError, KeyError) as e:
        raise UnbackdoorError(f"checkpoint optimizer state does not fit this run: {e}", where=str(last),
                              fix="resume with the same model and trainable parameters, or start without resume") from None
    sched.load_state_dict({**sched.state_dict(), **state["scheduler"]})
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return int(state["epoch"]), int(state["global_step"]), list(state["history"])


# ---- the loop ------------------------------------------------------------------------------

def fit(model: nn.Module, data: ImageData | Iterable | Callable[[int], Iterable], cfg: TrainConfig, *,
        loss_fn: LossFn | None = None,
        on_batch: Callable[[StepInfo], bool | None] | None = None,
        on_epoch_end: Callable[[EpochInfo], bool | None] | None = None,
        checkpoint_dir: str | Path | None = None, resume: bool = False,
        parameters: Iterable[nn.Parameter] | None = None, transform: Any = None,
        desc: str = "train") -> FitResult:
    """Train ``model`` in place with SGD and return the per-epoch history.

    ``data`` is an :class:`ImageData` (batches of float ``[0, 1]`` images, shuffled and augmented
    per ``cfg``, then ``transform``-ed), a re-iterable of ``(inputs, targets)`` batches (inputs a
    tensor or a dict of tensors), or a callable ``epoch -> iterable of batches``.
    ``loss_fn(logits, targets, model=, inputs=)`` replaces cross-entropy (negate it to unlearn,
    add a penalty to relearn). ``on_batch`` / ``on_epoch_end`` return True to stop early.
    ``parameters`` restricts what the optimizer updates (default: all parameters that require grad).
    A non-finite loss or gradient raises :class:`NumericalError`; the last checkpoint is kept.
    """
    device = _resolve_device(model, cfg.device)
    if cfg.device == "auto":  # under `accelerate launch` on GPUs: this process's own GPU
        device = distributed.process_device(device)
    model.to(device)
    loss_fn = loss_fn or default_loss
    params = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise ModelError("no trainable parameters", where=type(model).__name__,
                         fix="set requires_grad=True on the parameters to train")
    opt = make_optimizer(params, cfg)
    sched = _make_scheduler(opt, cfg)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start_epoch, global_step, history, resumed_from = 0, 0, [], None
    if resume:
        if ckpt is None:
            raise ConfigError("resume=True needs a checkpoint_dir", where="fit", fix="pass checkpoint_dir=...")
        if (ckpt / "last" / "state.json").is_file():
            start_epoch, global_step, history = _load_checkpoint(ckpt, model, opt, sched)
            resumed_from = start_epoch
            log.info("resumed from %s after epoch %d", ckpt / "last", start_epoch)
        else:
            log.info("no checkpoint in %s: starting from scratch", ckpt)
    last_good = f"{ckpt / 'last'} (after epoch {start_epoch})" if resumed_from else "none written yet"
    t_start = time.perf_counter()
    stopped = False
    epoch = start_epoch
    # Under `accelerate launch` each rank builds the same global batch and computes its slice (DDP,
    # BatchNorm synchronised); logged numbers and stop rules read global values. One process: a no-op.
    with distributed.DataParallel(model) as dp:
        net = dp.module
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            t0 = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            tot_loss, correct, seen, steps = 0.0, 0, 0, 0
            batches = _batches_for_epoch(data, cfg, epoch, transform, device)
            bar = progress(batches, desc=f"{desc} {epoch + 1}/{cfg.epochs}")
            for step, (inputs, targets) in enumerate(bar):
                inputs, targets = to_device(inputs, device), targets.to(device)
                n_global = n = batch_len(inputs)
                if dp.active:
                    inputs, targets = dp.shard(inputs, targets)
                    n = int(targets.shape[0])
                logits = forward_logits(net, inputs)
                if n > 0:
                    loss = loss_fn(logits, targets, model=model, inputs=inputs)
                else:  # a rank with no sample of a short last batch still joins the gradient all-reduce
                    loss = logits.sum() * 0.0
                batch_correct = int((logits.detach().argmax(1) == targets).sum())
                loss_value = float(loss.detach())
                if dp.active:  # one all-reduce: global mean loss (so every rank agrees on the NaN check), counts
                    loss_sum, batch_correct, _ = dp.global_stats(loss_value * n, batch_correct, n)
                    loss_value = loss_sum / n_global
                if not math.isfinite(loss_value):
                    raise NumericalError(f"loss is {loss_value} at epoch {epoch + 1}, step {step + 1}",
                                         where=f"{desc}; last good checkpoint: {last_good}",
                                         fix="lower the learning rate, enable grad_clip, or check the inputs for NaN")
                opt.zero_grad(set_to_none=True)
                if dp.active:  # weighted so that DDP's gradient average is the global-batch gradient
                    (loss * dp.weight(n, n_global)).backward()
                else:
                    loss.backward()
                if cfg.grad_clip is not None:
                    gnorm = float(nn.utils.clip_grad_norm_(params, cfg.grad_clip))
                else:
                    grads = [p.grad for p in params if p.grad is not None]  # fused norms (the NaN/inf guard)
                    gnorm = _total_norm(grads)
                if not math.isfinite(gnorm):
                    raise NumericalError(f"gradient norm is {gnorm} at epoch {epoch + 1}, step {step + 1}",
                                         where=f"{desc}; last good checkpoint: {last_good}",
                                         fix="lower the learning rate or enable grad_clip")
                opt.step()
                global_step += 1
                steps += 1
                seen += n_global
                tot_loss += loss_value * n_global
                correct += batch_correct
                info = StepInfo(epoch, step, global_step, loss_value, tot_loss / seen, correct / seen, seen, lr, gnorm)
                if cfg.log_every and global_step % cfg.log_every == 0:
                    log.info("%s epoch %d step %d loss %.4f acc %.4f", desc, epoch + 1, step + 1, info.running_loss,
                             info.running_acc)
                if on_batch is not None and on_batch(info):
                    stopped = True
                    break
            if steps == 0:
                raise UnbackdoorError("the data yielded no batches", where=desc, fix="check that the training data is not empty")
            sched.step()
            rec = {"epoch": epoch + 1, "loss": tot_loss / seen, "acc": correct / seen, "lr": lr,
                   "seconds": round(time.perf_counter() - t0, 4), "steps": steps}
            history.append(rec)
            log.info("%s epoch %d/%d loss %.4f acc %.4f lr %.4g (%.1fs)", desc, epoch + 1, cfg.epochs, rec["loss"],
                     rec["acc"], lr, rec["seconds"])
            if on_epoch_end is not None and on_epoch_end(EpochInfo(epoch, rec["loss"], rec["acc"], lr, rec["seconds"], steps)):
                stopped = True
            done = epoch + 1
            if ckpt is not None and (stopped or done == cfg.epochs or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
                distributed.on_main_process(_save_checkpoint, ckpt, model, opt, sched, done, global_step, history,
                                            cfg)
                last_good = f"{ckpt / 'last'} (after epoch {done})"
            if stopped:
                break
    model.eval()
    return FitResult(len(history), global_step, stopped, history, round(time.perf_counter() - t_start, 4), resumed_from)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, data: ImageData, *, batch_size: int = 512, transform: Any = None,
                      device: str | torch.device | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (eval mode, no augmentation)."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = iterate_batches(data, batch_size, transform=transform, device=dev)
    if distributed.is_distributed():  # each rank scores whole batches (round-robin); counts are exact
        counts = distributed.distributed_map(lambda b: int((forward_logits(model, b[0]).argmax(1) == b[1]).sum()),
                                             list(batches))
        correct = sum(counts)
    else:
        correct = 0
        for x, y in batches:
            correct += int((forward_logits(model, x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / len(data)


# ---- the loop as the defenses use it ------------------------------------------------------------

@dataclass
class EpochLog:
    acc: float
    loss: float


def augmentation(enabled: bool) -> Callable[..., torch.Tensor] | None:
    """BackdoorBench's training augmentation for image batches, or None."""
    return standard_augmentation() if enabled else None


def fit_sgd(model: nn.Module, data: Any, *, epochs: int, batch_size: int, lr: float, momentum: float,
            weight_decay: float, scheduler: str, milestones: tuple[int, ...] | list[int] = (10, 20),
            gamma: float = 0.1, clip: float | None = None, augment: bool = True, seed: int = 0,
            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
            on_step: Callable[[int, float, float], None] | None = None,
            stop: Callable[[int, EpochLog], bool] | None = None, prepare: Prepare | None = None,
            desc: str = "train", optimizer: str = "sgd", warmup_epochs: int = 0) -> list[EpochLog]:
    """Train ``model`` in place with :func:`fit` on an ``ImageData`` or ``(inputs, labels)``.

    ``loss_fn(logits, y)`` is minimised (default CE). The log holds each epoch's running accuracy
    and running loss (of ``loss_fn``); ``stop(epoch, log)`` ends training after an epoch. ``optimizer``
    is ``sgd`` or ``adamw`` (:func:`make_optimizer`).
    """
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                       scheduler=scheduler, milestones=tuple(milestones), gamma=gamma, grad_clip=clip,
                       augment=augment, seed=seed, optimizer=optimizer, warmup_epochs=warmup_epochs)
    if isinstance(data, ImageData):
        batches: Any = data
    else:
        inputs, labels = as_inputs_labels(data)
        batches = clean_batches(inputs, labels, batch_size, seed, prepare, augmentation(augment))
    result = fit(model, batches, tcfg,
                 loss_fn=(lambda z, y, **_: loss_fn(z, y)) if loss_fn is not None else None,
                 on_batch=(lambda info: on_step(info.global_step, info.running_acc, info.running_loss))
                 if on_step is not None else None,
                 on_epoch_end=(lambda info: stop(info.epoch, EpochLog(info.acc, info.loss))) if stop is not None else None,
                 desc=desc)
    return [EpochLog(acc=float(h["acc"]), loss=float(h["loss"])) for h in result.history]
