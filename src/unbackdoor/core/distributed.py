"""Data parallelism on an existing engine: the same code on one CPU or many GPUs.

Under ``accelerate launch`` (or ``torchrun``) every process runs the same script; the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) says who
it is. The Hugging Face ``Trainer`` (CROW, SFT) handles that on its own. This module gives the
plain-PyTorch loops (ULRL, the classifier baselines, the evaluations) what they need to match
a single-process run:

- who am I: :func:`info`, :func:`rank`, :func:`world_size`, :func:`is_main_process`;
- a process group when launched (:func:`init`, through ``accelerate.PartialState``: gloo on
  CPU, NCCL on GPU) and nothing at all in a plain single-process run;
- deterministic sharding: :func:`shard_indices` (``DistributedSampler`` semantics),
  :func:`batch_shard` (one global batch split across ranks, so every optimizer step sees the
  same global batch as a single process would);
- global numbers: :func:`all_reduce_sum`, :func:`global_accuracy`, :func:`gather_objects`,
  :func:`distributed_map` (batches round-robin across ranks, results back in input order:
  identical to the single-process loop, batch for batch);
- :class:`DataParallel`: DDP with SyncBatchNorm and the loss weighting that makes the
  averaged gradient equal the single-process gradient of the global batch;
- :func:`convert_sync_batchnorm`: ``torch.nn.SyncBatchNorm`` on GPU, :class:`GlooSyncBatchNorm`
  (same maths, all-reduce over gloo) on CPU, where torch's version refuses to run;
- :func:`main_process_first` and :func:`on_main_process` for files: only rank 0 writes.

Every function is a no-op (or the identity) in a single process, so callers need no branches.
"""
from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, DataError, UnbackdoorError

T = TypeVar("T")
R = TypeVar("R")

__all__ = [
    "DistInfo", "info", "rank", "world_size", "local_rank", "is_main_process", "is_distributed", "launched",
    "init", "process_device", "cpu_env", "check_trainer_distributed", "barrier", "main_process_first", "on_main_process", "all_reduce_sum", "global_accuracy",
    "gather_objects", "broadcast_object", "shard_indices", "batch_shard", "shard_sizes", "round_robin",
    "distributed_map", "loss_weight", "convert_sync_batchnorm", "revert_sync_batchnorm", "GlooSyncBatchNorm",
    "DataParallel",
]


# ---- who am I --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (``rank`` 0 of ``world_size`` 1 when not launched)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None  # None when no process group is initialised

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer", where=f"${name}",
                          fix="launch with `accelerate launch` or `torchrun`, which set it, or unset it") from None


def launched() -> bool:
    """True when a launcher started this process as one of several (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def info() -> DistInfo:
    """Rank and world size: from the process group if initialised, else from the launcher's environment."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), str(dist.get_backend()))
    return DistInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0), None)


def rank() -> int:
    return info().rank


def world_size() -> int:
    return info().world_size


def local_rank() -> int:
    return info().local_rank


def is_main_process() -> bool:
    """Rank 0 (also true in a plain single-process run): the one process that writes files."""
    return info().rank == 0


def is_distributed() -> bool:
    """True when more than one process takes part and a process group is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(*, cpu: bool | None = None) -> DistInfo:
    """Join the launcher's process group (idempotent); in a single-process run do nothing.

    Initialisation goes through ``accelerate.PartialState``, the same object the HF
    ``Trainer`` uses, so a script that mixes both gets one process group: gloo when no GPU is
    visible (or ``cpu=True``), NCCL on GPUs.
    """
    if not launched():
        return info()
    cpu_env()
    if dist.is_available() and dist.is_initialized():
        return info()
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed", where="torch",
                          fix="install a PyTorch build with distributed support, or run one process")
    from accelerate import PartialState

    use_cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    PartialState(cpu=use_cpu)
    if not dist.is_initialized():  # pragma: no cover - accelerate always initialises when WORLD_SIZE > 1
        dist.init_process_group("gloo" if use_cpu else "nccl")
    atexit.register(shutdown)
    return info()


def shutdown() -> None:
    """Leave the process group (idempotent). Registered at exit by :func:`init`: a process that exits with
    its group alive can abort in the group's destructor ("terminate called without an active exception",
    seen on a 2-process gloo run), which the launcher reports as a failed job."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cpu_env() -> bool:
    """Under a launcher on a machine without a visible GPU, tell accelerate to run on CPU. Returns True if so.

    ``accelerate launch`` (torchrun launcher) on a CPU-only machine starts the processes, but
    unless ``ACCELERATE_USE_CPU`` is set, the HF ``Trainer`` there sees ``DistributedType.NO``
    and every process trains ALONE on the whole data set (transformers only logs a warning).
    Setting the variable before the first ``TrainingArguments`` makes it a real gloo DDP run.
    An explicit value set by the user is left alone.
    """
    if launched() and not torch.cuda.is_available() and "ACCELERATE_USE_CPU" not in os.environ:
        os.environ["ACCELERATE_USE_CPU"] = "true"
        return True
    return False


def check_trainer_distributed(args: Any) -> None:
    """Fail fast when a launched job's ``TrainingArguments`` would train each process alone.

    ``args`` is a ``transformers.TrainingArguments``. Under ``accelerate launch`` with N > 1
    processes its world size must be N; otherwise every process would silently run the whole
    training on its own, N times over.
    """
    if not launched():
        return
    expected = _env_int("WORLD_SIZE", 1)
    got = int(getattr(args, "world_size", 1))
    if got != expected:
        raise ConfigError(
            f"launched as {expected} processes, but the Trainer sees a world of {got} "
            f"(parallel mode {getattr(args, 'parallel_mode', '?')}): each process would train alone",
            where="accelerate launch / TrainingArguments",
            fix="on CPU-only machines set ACCELERATE_USE_CPU=true (or call unbackdoor.core.distributed.init() "
                "before building the Trainer); on GPUs check that each process sees its GPU")


def process_device(default: torch.device) -> torch.device:
    """This process's GPU (``cuda:LOCAL_RANK``) under a launcher on a GPU machine, else ``default``.

    What a loop's ``device='auto'`` should mean when each process owns one GPU: without it,
    every process would put its replica on ``cuda:0`` (or stay on CPU while NCCL needs GPUs).
    """
    if launched() and torch.cuda.is_available() and default.type in ("cpu", "cuda"):
        return torch.device("cuda", local_rank())
    return default


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a cache), the others after it, reading its result."""
    if not is_distributed():
        yield
        return
    if not is_main_process():
        dist.barrier()
    try:
        yield
    finally:
        if is_main_process():
            dist.barrier()


def on_main_process(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R | None:
    """Call ``fn`` on rank 0 only (writing files), then wait so no rank reads a half-written output.

    Returns ``fn``'s result on rank 0 and ``None`` elsewhere. If ``fn`` fails on rank 0, its
    exception is re-raised there and every other rank raises an :class:`UnbackdoorError`
    naming it, instead of waiting at the next collective until the timeout.
    """
    result: R | None = None
    error: BaseException | None = None
    if is_main_process():
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others were told
            error = e
    if is_distributed():
        message = broadcast_object(f"{type(error).__name__}: {error}" if error is not None else None)
        if message is not None and not is_main_process():
            raise UnbackdoorError(f"the main process failed while writing: {message}",
                                  where=f"rank 0, in {getattr(fn, '__name__', 'a write')}",
                                  fix="see rank 0's error above; this rank stops with it")
    if error is not None:
        raise error
    return result


# ---- collective numbers ------------------------------------------------------------------------------

def _collective_device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float] | torch.Tensor) -> list[float]:
    """Element-wise sum over all processes, in float64 (counts up to 2**53 stay exact)."""
    t = torch.as_tensor(values if isinstance(values, torch.Tensor) else list(values), dtype=torch.float64)
    t = t.detach().reshape(-1).to(_collective_device(), torch.float64).clone()
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def global_accuracy(correct: int | float, total: int | float) -> float:
    """``sum(correct) / sum(total)`` over all processes: the accuracy of the whole batch or data set.

    This, not one process's accuracy, is what a stop rule must read (all ranks then agree
    on when to stop; a per-rank rule would let them diverge and deadlock).
    """
    c, n = all_reduce_sum([correct, total])
    return c / n if n > 0 else float("nan")


def gather_objects(obj: T) -> list[T]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled; for small results)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ---- deterministic sharding (pure) ---------------------------------------------------------------------

def shard_indices(n: int, rank: int, world: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                  drop_last: bool = False) -> list[int]:
    """The indices of ``range(n)`` that ``rank`` of ``world`` processes reads: ``DistributedSampler``'s rule.

    The (optionally shuffled, by ``seed + epoch``) order is padded by wrapping around to a
    multiple of ``world`` (or cut, with ``drop_last``), and rank ``r`` takes every
    ``world``-th index from ``r``. Every rank computes the same order, so the union over
    ranks is the whole data set and no two ranks share an index (except the padding).
    """
    _check_rank(rank, world)
    if n < 0:
        raise DataError(f"cannot shard {n} samples", where="shard_indices", fix="pass a non-negative size")
    if shuffle:
        g = torch.Generator().manual_seed(int(seed) + int(epoch))
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    if drop_last:
        total = (n // world) * world
        order = order[:total]
    elif n > 0:
        total = -(-n // world) * world
        pad = total - n
        while pad > 0:
            take = order[:pad]
            order = order + take
            pad -= len(take)
    return order[rank::world]


def shard_sizes(n: int, world: int) -> list[int]:
    """How ``n`` samples split over ``world`` ranks: sizes differ by at most one, larger first."""
    if world < 1:
        raise ConfigError(f"world size {world} must be >= 1", where="shard_sizes", fix="pass the number of processes")
    base, extra = divmod(n, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def batch_shard(n: int, rank: int, world: int) -> slice:
    """The contiguous slice of a global batch of ``n`` samples that ``rank`` computes.

    The slices of all ranks tile ``range(n)`` in order, so concatenating the per-rank
    outputs gives the single-process batch back exactly.
    """
    _check_rank(rank, world)
    sizes = shard_sizes(n, world)
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def round_robin(n: int, rank: int, world: int) -> list[int]:
    """Items ``rank, rank + world, ...`` of ``range(n)``: how whole evaluation batches are dealt out."""
    _check_rank(rank, world)
    return list(range(rank, n, world))


def loss_weight(n_local: int, n_global: int, world: int) -> float:
    """Factor for a rank's mean loss so that DDP's gradient AVERAGE is the global-batch gradient.

    With ``loss_r = mean over the n_r local samples + c`` (``c`` a per-batch term such as a
    weight penalty, equal on every rank), ``(1/W) * sum_r w_r * grad(loss_r)`` with
    ``w_r = W * n_r / N`` equals ``grad(mean over all N samples + c)``, even when the
    shards differ in size. 0 for an empty shard.
    """
    if n_global <= 0:
        raise DataError(f"global batch of {n_global} samples", where="loss_weight", fix="pass a non-empty batch")
    return world * n_local / n_global


def _check_rank(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is not in 0..{world - 1} (world size {world})", where="sharding",
                          fix="pass the process's rank and the number of processes (see distributed.info())")


def distributed_map(fn: Callable[[T], R], items: Sequence[T], *, desc: str = "") -> list[R]:
    """``[fn(x) for x in items]``, the items dealt round-robin across ranks, every result on every rank.

    Pass whole batches as items: each batch is then computed exactly as in the
    single-process loop (same members, same padding), so gathered results are identical
    to it, not merely close. Needs the same ``items`` on every rank. An exception on any
    rank is raised on every rank (none is left waiting in the gather). ``desc`` labels the
    progress bar (rank 0 only).
    """
    from .progress import progress

    items = list(items)
    if launched():
        init()
    if not is_distributed():
        return [fn(x) for x in progress(items, desc=desc)]
    me, world = rank(), world_size()
    mine: list[tuple[int, Any]] = []
    failure: str | None = None
    try:
        mine_idx = round_robin(len(items), me, world)
        for i in (progress(mine_idx, desc=desc) if me == 0 else mine_idx):
            mine.append((i, fn(items[i])))
    except Exception as e:  # noqa: BLE001 - reported on every rank below
        failure = f"rank {me}: {type(e).__name__}: {e}"
        error = e
    parts = gather_objects((failure, mine if failure is None else []))
    failures = [f for f, _ in parts if f is not None]
    if failures:
        if failure is not None:
            raise error
        raise UnbackdoorError(f"another process failed: {failures[0]}", where=f"distributed_map {desc}".strip(),
                              fix="see that process's error above")
    out: list[Any] = [None] * len(items)
    filled = 0
    for _, part in parts:
        for i, r in part:
            out[i] = r
            filled += 1
    if filled != len(items):  # pragma: no cover - ranks disagreed on the items
        raise DataError(f"gathered {filled} results for {len(items)} items", where="distributed_map",
                        fix="every process must pass the same items (same data, same order)")
    return out


# ---- SyncBatchNorm ----------------------------------------------------------------------------------------

class _SyncBNFunction(torch.autograd.Function):
    """Batch norm whose statistics (and their gradient terms) are summed over a process group."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                group: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dims = [d for d in range(x.dim()) if d != 1]
        xf = x.double()
        count = x.numel() // x.shape[1] if x.numel() else 0
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims),
                           torch.tensor([float(count)], dtype=torch.float64, device=x.device)])
        dist.all_reduce(stats, group=group)
        c = x.shape[1]
        total = stats[-1]
        if float(total) <= 0:
            raise DataError("SyncBatchNorm got an empty global batch", where="batch norm",
                            fix="give every optimizer step at least one sample")
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp(min=0.0)
        invstd = torch.rsqrt(var + eps)
        shape = [1, c] + [1] * (x.dim() - 2)
        xhat = ((xf - mean.view(shape)) * invstd.view(shape)).to(x.dtype)
        y = xhat if (weight is not None or bias is not None) else xhat.clone()  # never hand out the saved xhat
        if weight is not None:
            y = y * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        out_mean, out_var = mean.to(x.dtype), var.to(x.dtype)
        ctx.mark_non_differentiable(out_mean, out_var, total)  # statistics for the running averages only
        ctx.save_for_backward(xhat, invstd.to(x.dtype), weight)
        ctx.total, ctx.group, ctx.has_bias = float(total), group, bias is not None
        return y, out_mean, out_var, total

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        xhat, invstd, weight = ctx.saved_tensors
        dims = [d for d in range(gy.dim()) if d != 1]
        c = gy.shape[1]
        shape = [1, c] + [1] * (gy.dim() - 2)
        local = torch.cat([gy.double().sum(dims), (gy.double() * xhat.double()).sum(dims)])
        g_bias = local[:c].to(gy.dtype, copy=True)  # copies: the all-reduce below works in place
        g_weight = local[c:].to(gy.dtype, copy=True)
        dist.all_reduce(local, group=ctx.group)
        mean_dy = (local[:c] / ctx.total).to(gy.dtype).view(shape)
        mean_dy_xhat = (local[c:] / ctx.total).to(gy.dtype).view(shape)
        scale = invstd.view(shape) * (weight.view(shape) if weight is not None else 1.0)
        gx = (gy - mean_dy - xhat * mean_dy_xhat) * scale
        # weight/bias get their LOCAL gradient: DDP sums (averages) it across ranks like any parameter's
        return gx, (g_weight if weight is not None else None), (g_bias if ctx.has_bias else None), None, None


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` for CPU (gloo): batch statistics over the whole global batch.

    In training mode with a process group of several ranks, mean and variance come from the
    sum of every rank's per-channel sums (float64), so a global batch split across ranks is
    normalised exactly as one process would normalise it; the backward pass all-reduces the
    two gradient sums the input gradient needs. Otherwise (eval, one process) it is plain
    ``F.batch_norm``. Running statistics use the unbiased global variance, like torch's.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device: Any = None, dtype: Any = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        sync = self.training and dist.is_available() and dist.is_initialized() and \
            dist.get_world_size(self.process_group) > 1
        if not sync:
            bn_training = self.training or (self.running_mean is None and self.running_var is None)
            factor = self._momentum_factor() if self.training else 0.0
            return F.batch_norm(input, self.running_mean if not self.training or self.track_running_stats else None,
                                self.running_var if not self.training or self.track_running_stats else None,
                                self.weight, self.bias, bn_training, factor, self.eps)
        factor = self._momentum_factor()
        y, mean, var, total = _SyncBNFunction.apply(input, self.weight, self.bias, self.eps, self.process_group)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                n = float(total)
                unbiased = var * (n / max(n - 1.0, 1.0))
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach(), alpha=factor)
        return y

    def _momentum_factor(self) -> float:
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else float(self.momentum)


def _swap_bn(module: nn.Module, make: Callable[[nn.modules.batchnorm._BatchNorm], nn.Module],
             kinds: tuple[type, ...]) -> nn.Module:
    if isinstance(module, kinds):
        new = make(module)
        if module.affine:
            new.weight = module.weight  # the same Parameter objects: optimizers holding them stay valid
            new.bias = module.bias
        new.running_mean = module.running_mean
        new.running_var = module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        swapped = _swap_bn(child, make, kinds)
        if swapped is not child:
            setattr(module, name, swapped)
    return module


def _bn_args(bn: nn.modules.batchnorm._BatchNorm) -> dict[str, Any]:
    return dict(num_features=bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                track_running_stats=bn.track_running_stats)


_BN_KINDS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def convert_sync_batchnorm(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace BatchNorm layers by their synchronised version, in place, sharing parameters and buffers.

    Where it matters: when a global batch is split across ranks, per-rank batch statistics
    differ from the single-process ones (and are noisier with small per-rank batches).
    CUDA models get ``torch.nn.SyncBatchNorm``; CPU models :class:`GlooSyncBatchNorm`.
    A single process, or a model without BatchNorm, is returned unchanged.
    """
    if not is_distributed() or not has_batchnorm(model):
        return model
    p = next(model.parameters(), None)
    on_cuda = p is not None and p.device.type == "cuda"
    if on_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return _swap_bn(model, lambda bn: GlooSyncBatchNorm(**_bn_args(bn), process_group=process_group,
                                                        device=bn.running_mean.device if bn.running_mean is not None
                                                        else None), _BN_KINDS)


def revert_sync_batchnorm(model: nn.Module, like: Mapping[str, type] | None = None) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm`: plain ``BatchNorm{1,2,3}d`` again (chosen by input rank).

    ``like`` maps module names to their original classes (what :class:`DataParallel` records);
    without it, 4D-input BatchNorm2d is assumed.
    """
    kinds = (GlooSyncBatchNorm, nn.SyncBatchNorm)
    originals = dict(like or {})

    def walk(module: nn.Module, prefix: str) -> nn.Module:
        if isinstance(module, kinds):
            cls = originals.get(prefix, nn.BatchNorm2d)
            return _swap_bn(module, lambda bn: cls(**_bn_args(bn), device=bn.running_mean.device
                                                    if bn.running_mean is not None else None), kinds)
        for name, child in module.named_children():
            new = walk(child, f"{prefix}.{name}" if prefix else name)
            if new is not child:
                setattr(module, name, new)
        return module

    return walk(model, "")


# ---- a data-parallel training step ----------------------------------------------------------------------------

class DataParallel:
    """DDP for a plain training loop, arranged so that N processes reproduce one process's run.

    Every rank builds the SAME global batch (same seed, same order, same augmentation) and
    computes only its contiguous slice of it (:meth:`shard`); BatchNorm statistics are
    synchronised over the global batch; the loss of each rank is weighted by
    :func:`loss_weight` before ``backward`` so DDP's gradient average is the global-batch
    gradient; and the numbers a loop logs or stops on (loss, correct, seen) are summed over
    ranks (:meth:`global_stats`). Outside a launched job it is a transparent no-op.

    Use as a context manager: on exit the model's BatchNorm layers are plain again (with the
    trained parameters and running statistics), so it saves and loads like before.
    """

    def __init__(self, model: nn.Module, *, sync_batchnorm: bool = True, find_unused_parameters: bool = False):
        self.model = model
        if launched():
            init()  # a script started by `accelerate launch` / torchrun needs no set-up of its own
        self.active = is_distributed()
        self.rank, self.world = (rank(), world_size()) if self.active else (0, 1)
        self._bn_classes = {n: type(m) for n, m in model.named_modules() if isinstance(m, _BN_KINDS)}
        self.synced_bn = False
        self.module: nn.Module = model
        if not self.active:
            return
        p = next(model.parameters(), None)
        if dist.get_backend() == "nccl" and (p is None or p.device.type != "cuda"):
            raise ConfigError("the process group uses NCCL (GPUs) but the model is on the CPU",
                              where="DataParallel", fix="move the model to this process's GPU first "
                              "(unbackdoor.core.distributed.process_device), or hide the GPUs to train on CPU")
        if sync_batchnorm and self._bn_classes:
            # the default group, as torch's SyncBatchNorm: every rank runs the same autograd graph, so
            # the statistics' all-reduces interleave with DDP's gradient buckets in the same order
            convert_sync_batchnorm(model)
            self.synced_bn = True
        device_ids = [p.device.index] if p is not None and p.device.type == "cuda" else None
        self.module = nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                          find_unused_parameters=find_unused_parameters)

    def __enter__(self) -> "DataParallel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Plain BatchNorm layers again; the DDP wrapper is dropped (the model keeps its weights)."""
        if self.synced_bn:
            revert_sync_batchnorm(self.model, self._bn_classes)
            self.synced_bn = False
        self.module = self.model

    def shard(self, inputs: Any, targets: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """This rank's contiguous slice of a global batch (a tensor, or a dict of tensors)."""
        if not self.active:
            return inputs, targets
        n = int(targets.shape[0])
        sl = batch_shard(n, self.rank, self.world)
        if isinstance(inputs, Mapping):
            return {k: (v[sl] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}, targets[sl]
        return inputs[sl], targets[sl]

    def weight(self, n_local: int, n_global: int) -> float:
        """Multiply this rank's mean loss by this before ``backward`` (1 in a single process)."""
        return loss_weight(n_local, n_global, self.world) if self.active else 1.0

    def global_stats(self, *values: float) -> list[float]:
        """Element-wise sums over ranks (the values themselves in a single process)."""
        return all_reduce_sum(values) if self.active else [float(v) for v in values]
