"""The classifier tiny world: procedurally generated 32x32 RGB shapes in 10 classes.

No public dataset can be fetched here, so tests and the demo use a world generated
deterministically from a seed (SPEC section 4). Each image is one shape (disk, square, triangle,
plus, ring, crescent, star, hexagon, half-disk, bar) with a random pose (position, scale,
rotation, aspect), a random colour and surface texture, on a random background (colour,
gradient, stripes), with small distractor blobs and pixel noise. Classes are balanced.

It is deliberately not trivially separable: low-contrast shapes, disk vs. hexagon and square
vs. bar at 32 pixels, distractor blobs and noise keep a small CNN below 100%.

Measured (``python -m unbackdoor.classify.tinyworld --seeds 0 1 2``: 4000 train / 2000 test
images, ``preact_resnet_tiny`` width 8 (78 k parameters), :func:`tiny_train_config` = 10 epochs,
batch 64, SGD lr 0.1 cosine, no augmentation, 1 thread, on a shared, heavily loaded 2-core
machine): clean accuracy 0.949 / 0.882 / 0.900 (seeds 0 / 1 / 2); BadNets ASR
0.962 / 0.992 / 0.992 at accuracy 0.728 / 0.866 / 0.837; Blended ASR 0.984 / 0.973 / 0.972 at
accuracy 0.922 / 0.875 / 0.857.
About 35 CPU-seconds of training per model. Accuracy after 10 epochs varies by several points
between seeds (one BadNets run ended at 0.73): report it per seed.

Images are uint8 ``[N, 3, H, W]`` in an :class:`~unbackdoor.classify.data.ImageData`; the whole
generation is vectorised torch code driven by one ``torch.Generator``.
"""
from __future__ import annotations

import math

import torch

from ..core.errors import ConfigError
from .data import ImageData, to_uint8

__all__ = ["CLASS_NAMES", "make_tiny_world", "render_shapes", "DEFAULT_N_TRAIN", "DEFAULT_N_TEST", "TINY_MODEL",
           "TINY_MODEL_KWARGS", "tiny_train_config", "measure"]

CLASS_NAMES = ["disk", "square", "triangle", "plus", "ring", "crescent", "star", "hexagon", "half-disk", "bar"]

# Defaults chosen so that one backdoored preact_resnet_tiny trains in about a minute on 2 CPU cores.
DEFAULT_N_TRAIN = 4000
DEFAULT_N_TEST = 2000


def _polygon(u: torch.Tensor, v: torch.Tensor, sides: int, inradius: float, phase: float) -> torch.Tensor:
    """Signed (L-inf-like) distance to a regular polygon: max over the edge normals."""
    out = None
    for k in range(sides):
        a = phase + 2 * math.pi * k / sides
        d = u * math.cos(a) + v * math.sin(a) - inradius
        out = d if out is None else torch.maximum(out, d)
    return out


def _shape_field(cls: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Implicit function per pixel, negative inside the shape of class ``cls`` (local units: radius ~1)."""
    r = torch.sqrt(u * u + v * v + 1e-12)
    phi = torch.atan2(v, u)
    fields = [
        r - 1.0,                                                                   # disk
        torch.maximum(u.abs(), v.abs()) - 0.82,                                    # square
        _polygon(u, v, 3, 0.55, math.pi / 2),                                      # triangle
        torch.minimum(torch.maximum(u.abs() - 0.3, v.abs() - 0.95),
                      torch.maximum(v.abs() - 0.3, u.abs() - 0.95)),               # plus
        (r - 0.72).abs() - 0.26,                                                   # ring
        torch.maximum(r - 1.0, 0.78 - torch.sqrt((u - 0.5) ** 2 + v * v + 1e-12)),  # crescent
        r - (0.62 + 0.36 * torch.cos(5 * phi)),                                    # star
        _polygon(u, v, 6, 0.88, 0.0),                                              # hexagon
        torch.maximum(torch.sqrt(u * u + (v + 0.45) ** 2 + 1e-12) - 1.05, -(v + 0.45)),  # half-disk
        torch.maximum(u.abs() - 1.0, v.abs() - 0.38),                              # bar
    ]
    stack = torch.stack(fields, 0)  # [10, N, H, W]
    return stack.gather(0, cls.view(1, -1, 1, 1).expand(1, *u.shape)).squeeze(0)


def _u(g: torch.Generator, n: int, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, *shape, generator=g)


def render_shapes(labels: torch.Tensor, g: torch.Generator, size: int = 32, *, noise: tuple[float, float] = (0.03, 0.10),
                  distractors: int = 1, contrast: tuple[float, float] = (0.3, 0.65)) -> torch.Tensor:
    """Float ``[N, 3, size, size]`` images in ``[0, 1]`` of the shapes named by ``labels`` (0..9)."""
    n = len(labels)
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    xx, yy = xx.expand(n, size, size), yy.expand(n, size, size)
    col = lambda t: t.view(n, 1, 1)  # noqa: E731

    # background: colour + linear gradient + stripes
    bg = _u(g, n, 0.0, 1.0, 3)
    grad_dir = _u(g, n, 0, 2 * math.pi)
    grad_amp = _u(g, n, 0.0, 0.15)
    ramp = (xx * col(torch.cos(grad_dir)) + yy * col(torch.sin(grad_dir))) * col(grad_amp) / 2
    freq = _u(g, n, 1.5, 7.0)
    sdir = _u(g, n, 0, 2 * math.pi)
    sphase = _u(g, n, 0, 2 * math.pi)
    stripes = torch.sin(math.pi * col(freq) * (xx * col(torch.cos(sdir)) + yy * col(torch.sin(sdir))) + col(sphase))
    s_amp = _u(g, n, 0.0, 0.04)
    s_col = _u(g, n, -1.0, 1.0, 3)
    img = bg.view(n, 3, 1, 1) + ramp[:, None] + (stripes * col(s_amp))[:, None] * s_col.view(n, 3, 1, 1)

    # the shape: pose, colour (contrast varies), texture, soft edge
    cx, cy = _u(g, n, -0.25, 0.25), _u(g, n, -0.25, 0.25)
    scale = _u(g, n, 0.5, 0.8)
    theta = _u(g, n, 0, 2 * math.pi)
    aspect = _u(g, n, 0.85, 1.18)
    dx, dy = xx - col(cx), yy - col(cy)
    c, s = col(torch.cos(theta)), col(torch.sin(theta))
    u = (dx * c + dy * s) / col(scale * aspect)
    v = (-dx * s + dy * c) / col(scale / aspect)
    field = _shape_field(labels.long(), u, v)
    sharp = col(scale) * size / 2 * 1.2  # about one pixel of soft edge
    mask = torch.sigmoid(-field * sharp)[:, None]
    # luminance contrast (towards the far end of the range) plus a little chroma
    lum = bg.mean(1, keepdim=True)
    sign = torch.where(lum > 0.5, -1.0, 1.0)
    fg = (bg + sign * _u(g, n, contrast[0], contrast[1])[:, None] + _u(g, n, -0.15, 0.15, 3)).clamp(0, 1)
    tex_f = _u(g, n, 2.0, 6.0)
    tex = torch.sin(math.pi * col(tex_f) * u) * torch.sin(math.pi * col(tex_f) * v)
    tex_amp = _u(g, n, 0.0, 0.06)
    fg_img = fg.view(n, 3, 1, 1) * (1 + (tex * col(tex_amp))[:, None])
    img = img * (1 - mask) + fg_img * mask

    # distractors: small blobs of random colour, anywhere
    for _ in range(distractors):
        present = (torch.rand(n, generator=g) < 0.6).float()
        bx, by = _u(g, n, -0.9, 0.9), _u(g, n, -0.9, 0.9)
        br = _u(g, n, 0.05, 0.12)
        d = torch.sqrt((xx - col(bx)) ** 2 + (yy - col(by)) ** 2) - col(br)
        bmask = (torch.sigmoid(-d * size / 2 * 1.2) * col(present))[:, None]
        bcol = _u(g, n, 0, 1, 3).view(n, 3, 1, 1)
        img = img * (1 - bmask) + bcol * bmask

    sigma = _u(g, n, noise[0], noise[1])
    img = img + torch.randn(n, 3, size, size, generator=g) * sigma.view(n, 1, 1, 1)
    return img.clamp(0, 1)


def make_tiny_world(seed: int, n_train: int = DEFAULT_N_TRAIN, n_test: int = DEFAULT_N_TEST, size: int = 32, *,
                    noise: tuple[float, float] = (0.03, 0.10), distractors: int = 1,
                    chunk: int = 2000) -> tuple[ImageData, ImageData]:
    """``(train, test)`` tiny-world sets, deterministic from ``seed``, classes balanced (to within one).

    Train and test are drawn from independent streams of the same generator family, so they
    never share an image.
    """
    if n_train < 10 or n_test < 10:
        raise ConfigError(f"n_train = {n_train}, n_test = {n_test}: need at least 10 images each (one per class)",
                          where="make_tiny_world", fix="ask for more images")
    if size < 8:
        raise ConfigError(f"size = {size} is too small to draw shapes", where="make_tiny_world", fix="use size >= 8 (32 default)")
    if not 0 <= noise[0] <= noise[1]:
        raise ConfigError(f"noise range {noise} must be 0 <= low <= high", where="make_tiny_world", fix="e.g. (0.02, 0.1)")

    def one(split: int, n: int, name: str) -> ImageData:
        g = torch.Generator().manual_seed(int(seed) * 2 + split + 12345)
        labels = torch.arange(n) % 10
        labels = labels[torch.randperm(n, generator=g)]
        parts = [render_shapes(labels[i:i + chunk], g, size, noise=noise, distractors=distractors)
                 for i in range(0, n, chunk)]
        return ImageData(to_uint8(torch.cat(parts)), labels, 10, list(CLASS_NAMES), name)

    return one(0, n_train, f"tinyworld-{seed}-train"), one(1, n_test, f"tinyworld-{seed}-test")


# ---- the recommended tiny-world training recipe ------------------------------------------------

TINY_MODEL = "preact_resnet_tiny"
TINY_MODEL_KWARGS: dict = {"width": 8}


def tiny_train_config(seed: int = 0, **overrides):
    """The training recipe measured on the tiny world (see the module docstring's numbers).

    10 epochs of SGD, batch 64, lr 0.1 with a cosine schedule, no augmentation (the shapes fill
    the frame; crop/flip slowed learning more than they helped in 10 epochs).
    """
    from .loop import TrainConfig

    kw = dict(epochs=10, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4, scheduler="cosine", augment=False,
              seed=seed)
    kw.update(overrides)
    return TrainConfig(**kw)


def measure(seed: int, attack: str | None, *, n_train: int = DEFAULT_N_TRAIN, n_test: int = DEFAULT_N_TEST,
            threads: int = 1) -> dict:
    """Train the tiny model on the (optionally poisoned) tiny world; return accuracy, ASR and CPU seconds."""
    import time

    from .attacks import attack_config, attack_targets, poison, triggered_test_set
    from .models import build_model
    from .loop import evaluate_accuracy, fit
    from .transforms import TINY_WORLD_MEAN, TINY_WORLD_STD

    torch.set_num_threads(threads)
    train, test = make_tiny_world(seed, n_train, n_test)
    data = train
    if attack:
        data, _ = poison(train, attack_config(attack, seed=seed))
    torch.manual_seed(seed)
    model = build_model(TINY_MODEL, 10, mean=TINY_WORLD_MEAN, std=TINY_WORLD_STD, **TINY_MODEL_KWARGS)
    wall, cpu = time.perf_counter(), time.process_time()
    fit(model, data, tiny_train_config(seed))
    out = {"seed": seed, "attack": attack or "none", "threads": threads, "n_train": n_train, "n_test": n_test,
           "train_wall_s": round(time.perf_counter() - wall, 1), "train_cpu_s": round(time.process_time() - cpu, 1),
           "acc": round(evaluate_accuracy(model, test), 4)}
    if attack:
        cfg = attack_config(attack, seed=seed)
        trig = triggered_test_set(test, cfg)
        with torch.no_grad():
            pred = torch.cat([model(x.float() / 255).argmax(1) for x in trig.images.split(500)])
        out["asr"] = round(float((pred == attack_targets(trig.labels, cfg, 10)).float().mean()), 4)
        out["ra"] = round(float((pred == trig.labels).float().mean()), 4)
    return out


if __name__ == "__main__":  # python -m unbackdoor.classify.tinyworld --seeds 0 1 2 --attacks none badnets blended
    import argparse
    import json

    p = argparse.ArgumentParser(description="Measure the tiny world: clean accuracy, backdoor ASR, training time.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--attacks", nargs="+", default=["none", "badnets", "blended"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    for s in args.seeds:
        for a in args.attacks:
            print(json.dumps(measure(s, None if a == "none" else a, threads=args.threads)), flush=True)
