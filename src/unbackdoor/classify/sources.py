"""Where classifier data comes from: a spec string -> an ImageData, and back to a file.

Specs: ``tinyworld:SEED`` (the generated tiny world), a ``.safetensors`` file written by
:func:`save_data` (what ``unbackdoor classify poison`` writes), a CIFAR-10 / CIFAR-100 python
folder, or a class-per-folder image tree (``train/`` and ``test/`` subfolders when present).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..core import safeio
from ..core.errors import DataError
from .data import ImageData

DATA_HELP = ("tinyworld:SEED, a .safetensors image set (written by 'classify poison'), a CIFAR-10/100 python "
             "folder, or a class-per-folder image tree")


def load_data(spec: str | Path, *, train: bool = True, size: int | None = None) -> ImageData:
    """An image set from ``spec``: ``tinyworld:SEED``, a ``.safetensors`` file written by :func:`save_data`,
    a CIFAR-10 / CIFAR-100 python folder, or a class-per-folder image tree (``size`` resizes)."""
    from . import data as D

    text = str(spec)
    if text.startswith("tinyworld:"):
        try:
            seed = int(text.split(":", 1)[1])
        except ValueError:
            raise DataError(f"bad tiny-world spec '{text}'", where="data argument", fix="write tinyworld:SEED, e.g. tinyworld:0") from None
        from .testbed import tiny_world

        tr, te = tiny_world(seed)
        return tr if train else te
    path = Path(text)
    if path.suffix == ".safetensors":
        return D.from_saved_tensors(safeio.load_state_dict(path), str(path), name=path.stem)
    if not path.exists():
        raise DataError(f"data not found: {path}", where=str(path),
                        fix="pass tinyworld:SEED, a .safetensors image set, a CIFAR folder or a class-per-folder tree")
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if "cifar-10-batches-py" in names or "data_batch_1" in names:
        return D.load_cifar10(path, train=train)
    if "cifar-100-python" in names or ("meta" in names and "train" in names and (path / "train").is_file()):
        return D.load_cifar100(path, train=train)
    sub = path / ("train" if train else "test")
    return D.load_image_folder(sub if sub.is_dir() else path, size=size)


def save_data(data: ImageData, path: str | Path) -> Path:
    """Write an image set as one safetensors file (uint8 images, labels, class count), atomically."""
    return safeio.save_state_dict({"images": data.images, "labels": data.labels,
                                   "num_classes": torch.tensor(data.num_classes)}, path)
