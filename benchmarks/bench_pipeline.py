"""Item 4: is the input pipeline the bottleneck of classifier training?

Three throughputs (images/s) on the same model and batch size, one SGD step per batch:

* ``compute``: forward + backward + step on float batches already in memory (no pipeline);
* ``pipeline``: the library's ``iterate_batches`` (shuffle, uint8 -> float, batched random crop
  + flip) consumed without a model;
* ``end_to_end``: the pipeline feeding the model, one process, no workers (how ``train.fit`` runs).

The target ratio is ``end_to_end / compute`` >= 0.9: the transforms cost at most ~10% of
training throughput. ``pipeline / compute`` (how many times faster the pipeline produces images
than the model consumes them) is reported too.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from common import ratio


def _throughput(fn: Any, n_images: int, repeats: int) -> float:
    fn()  # warm-up
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t0)
    best.sort()
    return n_images / best[len(best) // 2]


def measure(model: torch.nn.Module, data: Any, batch_size: int, repeats: int) -> dict[str, Any]:
    from unbackdoor.classify.data import iterate_batches
    from unbackdoor.classify.transforms import standard_augmentation

    aug = standard_augmentation()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    n = len(data)
    mem = [(x.clone(), y.clone()) for x, y in iterate_batches(data, batch_size, shuffle=True, seed=0, transform=aug)]

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def compute() -> None:
        for x, y in mem:
            step(x, y)

    def pipeline() -> None:
        for x, y in iterate_batches(data, batch_size, shuffle=True, seed=1, transform=aug):
            pass

    def end_to_end() -> None:
        for x, y in iterate_batches(data, batch_size, shuffle=True, seed=2, transform=aug):
            step(x, y)

    c, p, e = (_throughput(f, n, repeats) for f in (compute, pipeline, end_to_end))
    return {"images": n, "batch_size": batch_size, "compute_img_s": round(c, 1), "pipeline_img_s": round(p, 1),
            "end_to_end_img_s": round(e, 1), "end_to_end_over_compute": round(ratio(e, c), 3),
            "pipeline_over_compute": round(ratio(p, c), 2)}


def run(size: str, device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    from bench_classify import _model, clean_subset

    s = {"smoke": dict(models={"tiny": 64}, repeats=1, bs=32),
         "quick": dict(models={"tiny": 1024, "preactresnet18": 256}, repeats=2, bs=128),
         "full": dict(models={"tiny": 2048, "preactresnet18": 256}, repeats=2, bs=128)}[size]
    out: dict[str, Any] = {"settings": s}
    for name, n in s["models"].items():
        out[name] = measure(_model(name, 0).to(device), clean_subset(n), s["bs"], s["repeats"])
    return out
