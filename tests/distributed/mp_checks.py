"""Checks of ``unbackdoor.core.distributed`` that need a real 2-process gloo group.

Not a test module: ``test_core_distributed.py`` launches it with
``python -m torch.distributed.run --nproc_per_node 2 mp_checks.py OUT`` and reads ``OUT/checks.json``
(written by rank 0). Each check computes the single-process reference in the same process
(every rank can, the data are tiny) and records the largest difference, so the test states
the tolerance and a failure shows the number.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)

from unbackdoor.core import distributed as D  # noqa: E402


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def check_data_parallel_step(n_global: int, sync_bn: bool) -> dict:
    """One SGD step of DataParallel on a split batch vs one process on the whole batch (incl. a penalty term)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n_global, 3, 6, 6, generator=g) * 2 + 1
    y = torch.randint(0, 5, (n_global,), generator=g)

    def loss_fn(logits: torch.Tensor, t: torch.Tensor, model: nn.Module) -> torch.Tensor:
        penalty = 0.3 * model[-1].weight.pow(2).sum()  # a per-batch term, like ULRL's cosine penalty
        return F.cross_entropy(logits, t) + penalty

    ref = _net(0)
    ref.train()
    ref_loss_t = loss_fn(ref(x), y, ref)
    ref_loss = float(ref_loss_t.detach())
    ref_loss_t.backward()
    ref_grads = _grads(ref)
    ref_bufs = {n: b.clone() for n, b in ref.named_buffers()}

    model = _net(0)
    model.train()
    with D.DataParallel(model, sync_batchnorm=sync_bn) as dp:
        classes_inside = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
        xs, ys = dp.shard(x, y)
        n = int(ys.shape[0])
        loss = loss_fn(dp.module(xs), ys, model)
        (loss * dp.weight(n, n_global)).backward()
        total, count = dp.global_stats(float(loss.detach()) * n, n)
    grads = _grads(model)
    bufs = {k: b.clone() for k, b in model.named_buffers()}
    return {
        "classes_inside": classes_inside,
        "classes_after": sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__}),
        "grad_max_abs_diff": max(float((grads[k] - ref_grads[k]).abs().max()) for k in grads),
        "grad_max_abs": max(float(v.abs().max()) for v in ref_grads.values()),
        "buffer_max_abs_diff": max(float((bufs[k].double() - ref_bufs[k].double()).abs().max()) for k in bufs),
        "global_count": count, "local_count": n, "mean_loss": total / count, "ref_loss": ref_loss,
    }


def fit_with_a_one_sample_last_batch() -> dict:
    """``train.fit`` on 17 samples in batches of 16: under 2 processes one rank gets no sample of the last batch.

    Called in-process by the test (one process) and inside the 2-process job; the results must agree.
    """
    from unbackdoor.classify.loop import TrainConfig, fit

    g = torch.Generator().manual_seed(11)
    x = torch.randn(17, 3, 6, 6, generator=g)
    y = torch.randint(0, 5, (17,), generator=g)
    model = _net(1)
    steps: list[list[float]] = []
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, scheduler="constant", augment=False, seed=0)
    result = fit(model, lambda epoch: [(x[:16], y[:16]), (x[16:], y[16:])], cfg,
                 on_batch=lambda i: steps.append([i.loss, i.running_acc, i.seen]))
    return {"steps": steps, "history": result.history,
            "weight_sum": float(sum(p.detach().double().sum() for p in model.parameters())),
            "classes": sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})}


def check_sharding() -> dict:
    me, world = D.rank(), D.world_size()
    parts = D.gather_objects(D.shard_indices(11, me, world, shuffle=True, seed=3, epoch=1))
    batch = D.gather_objects(list(range(11))[D.batch_shard(11, me, world)])
    mapped = D.distributed_map(lambda i: (i, D.rank()), list(range(7)))
    acc = D.global_accuracy(correct=3 if me == 0 else 1, total=4 if me == 0 else 6)
    return {"shard_parts": parts, "batch_parts": batch, "mapped": mapped, "global_acc": acc,
            "sum": D.all_reduce_sum([1.0, me])}


def check_main_process_writes(out: Path) -> dict:
    target = out / "written-by.txt"
    D.on_main_process(lambda: target.write_text(f"rank {D.rank()}\n"))
    seen_by_all = D.gather_objects(target.read_text())  # the barrier made it visible to every rank
    order = out / "first.txt"
    with D.main_process_first():
        if D.is_main_process():
            order.write_text("main\n")
        else:
            order.write_text(order.read_text() + "other\n")
    D.barrier()
    error = None
    try:
        D.on_main_process(lambda: (_ for _ in ()).throw(RuntimeError("disk full")))
    except Exception as e:  # noqa: BLE001 - rank 0: the RuntimeError itself; others: UnbackdoorError
        error = str(e)
    errors = D.gather_objects(error)
    return {"seen_by_all": seen_by_all, "first": order.read_text(), "errors": errors}


def check_map_failure() -> list[str] | None:
    """An item failing on rank 1 must stop BOTH ranks with an error (none may wait in the gather)."""
    def fn(i: int) -> int:
        if i == 3:  # dealt to rank 1
            raise ValueError("bad item 3")
        return i

    try:
        D.distributed_map(fn, list(range(6)))
    except Exception as e:  # noqa: BLE001 - what each rank saw is the result
        return D.gather_objects(f"{type(e).__name__}: {str(e).splitlines()[0]}")
    return D.gather_objects("no error")


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    info = D.init(cpu=True)
    results = {
        "info": [info.rank, info.world_size, info.backend],
        "step_even_syncbn": check_data_parallel_step(8, True),
        "step_uneven_syncbn": check_data_parallel_step(7, True),
        "step_even_local_bn": check_data_parallel_step(8, False),
        "sharding": check_sharding(),
        "writes": check_main_process_writes(out),
        "map_failure": check_map_failure(),
        "fit_tail": fit_with_a_one_sample_last_batch(),
    }
    D.barrier()
    if D.is_main_process():
        (out / "checks.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
