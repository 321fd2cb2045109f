"""Where classifier data comes from: a spec string -> an ImageData, and back to a file.

Specs: ``tinyworld:SEED`` (the generated tiny world), ``fashion-mnist`` (Debian's
``dataset-fashion-mnist`` files, or a folder of the four IDX files), a ``.safetensors`` file
written by :func:`save_data` (what ``unbackdoor classify poison`` writes), a CIFAR-10 / CIFAR-100
python folder, or a class-per-folder image tree (``train/`` and ``test/`` subfolders when present).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..core import safeio
from ..core.errors import DataError

DATA_HELP = ("tinyworld:SEED, fashion-mnist (or its IDX folder), a .safetensors image set (written by 'classify poison'), "
             "a CIFAR-10/100 python folder, a class-per-folder image tree, or text: a .json/.jsonl/.csv file (text, label) "
             "or a folder with train.* and test.*")


def load_data(spec: str | Path, *, train: bool = True, size: int | None = None, text: Any = None,
              tokenizer: Any = None, class_names: Sequence[str] | None = None) -> Any:
    """An image set from ``spec``: ``tinyworld:SEED``, ``fashion-mnist``, a ``.safetensors`` file written by
    :func:`save_data`, a CIFAR-10 / CIFAR-100 python folder, or a class-per-folder image tree (``size``
    resizes); or a text set (``TextData``): a JSON / JSONL / CSV file, or a folder with ``train.*`` and
    ``test.*`` such files, read with ``text`` (``TextOptions``), its labels named by ``class_names`` (the
    model's), tokenised by ``tokenizer``."""
    from . import data as D

    found = _text_file(Path(str(spec)), train)
    if found is not None:
        return _load_text(found, text, tokenizer, class_names)
    text = str(spec)
    if text.startswith("tinyworld:"):
        try:
            seed = int(text.split(":", 1)[1])
        except ValueError:
            raise DataError(f"bad tiny-world spec '{text}'", where="data argument", fix="write tinyworld:SEED, e.g. tinyworld:0") from None
        from .testbed import tiny_world

        tr, te = tiny_world(seed)
        return tr if train else te
    if text.lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        from .fashion_mnist import load_fashion_mnist

        return load_fashion_mnist(None, train=train)
    path = Path(text)
    if path.suffix == ".safetensors":
        return D.from_saved_tensors(safeio.load_state_dict(path), str(path), name=path.stem)
    if not path.exists():
        raise DataError(f"data not found: {path}", where=str(path),
                        fix="pass tinyworld:SEED, a .safetensors image set, a CIFAR folder or a class-per-folder tree")
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    from .fashion_mnist import is_fashion_mnist_dir, load_fashion_mnist

    if is_fashion_mnist_dir(path):
        return load_fashion_mnist(path, train=train)
    if "cifar-10-batches-py" in names or "data_batch_1" in names:
        return D.load_cifar10(path, train=train)
    if "cifar-100-python" in names or ("meta" in names and "train" in names and (path / "train").is_file()):
        return D.load_cifar100(path, train=train)
    sub = path / ("train" if train else "test")
    return D.load_image_folder(sub if sub.is_dir() else path, size=size)


def _text_file(path: Path, train: bool) -> Path | None:
    """The text file ``path`` names: itself, or ``train.*`` / ``test.*`` inside a folder; None for other data."""
    from .text import TEXT_SUFFIXES, is_text_file

    if path.suffix.lower() in TEXT_SUFFIXES:
        return path
    if path.is_dir():
        split = "train" if train else "test"
        for suffix in TEXT_SUFFIXES:
            if (path / f"{split}{suffix}").is_file():
                return path / f"{split}{suffix}"
        if any(is_text_file(p) for p in path.iterdir()) and not any(p.is_dir() for p in path.iterdir()):
            raise DataError(f"{path} holds text files but no {split}.json / {split}.jsonl / {split}.csv",
                            where=str(path), fix="name the split files train.jsonl and test.jsonl, or pass the file itself")
    return None


def _load_text(path: Path, options: Any, tokenizer: Any, class_names: Sequence[str] | None) -> Any:
    from .text import read_text_data

    data = read_text_data(path, options, class_names=class_names)
    return data.with_tokenizer(tokenizer) if tokenizer is not None else data


def save_data(data: Any, path: str | Path, command: str | None = None) -> Path:
    """Write an image set as one safetensors file (uint8 images, labels, class count), or a text set as
    JSON / JSONL, atomically; ``command`` is recorded as the writer (the output rule's marker)."""
    from ..core.paths import MARKER_KEY
    from .text import TextData, write_text_data

    if isinstance(data, TextData):
        return write_text_data(data, path, extra={MARKER_KEY: command} if command else None)
    return safeio.save_state_dict({"images": data.images, "labels": data.labels,
                                   "num_classes": torch.tensor(data.num_classes)}, path,
                                  metadata={MARKER_KEY: command} if command else None)
