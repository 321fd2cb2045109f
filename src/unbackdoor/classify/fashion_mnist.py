"""Fashion-MNIST (Xiao et al. 2017) from its IDX files, e.g. Debian's ``dataset-fashion-mnist`` package.

Nothing is downloaded: the files are read from a folder (Debian installs them in
:data:`DEBIAN_DIR`). IDX is a plain binary format (a magic number, the dimensions, then the raw
uint8 array), read here with numpy, gzip-compressed or not. Images are 28x28 grayscale, so they
become ``ImageData`` of shape ``[N, 1, 28, 28]`` with the dataset's ten class names.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DataError
from .data import ImageData

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where ``apt-get install dataset-fashion-mnist`` puts the four IDX files (``dpkg -L`` lists them)."""

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

_IDX_UBYTE = 0x08
_FIX = ("install Debian's package (apt-get install dataset-fashion-mnist, which puts the files in "
        f"{DEBIAN_DIR}), or pass a folder holding train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
        "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]")


def read_idx(path: str | Path) -> np.ndarray:
    """A uint8 IDX file (``.gz`` or raw) as a numpy array of its declared shape."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read IDX file {path.name}: {e}", where=str(path),
                        fix="the file is damaged; reinstall the dataset") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path.name} is not an IDX file (bad magic number)", where=str(path),
                        fix="pass the IDX files of the dataset (e.g. train-images-idx3-ubyte.gz)")
    dtype, ndim = raw[2], raw[3]
    if dtype != _IDX_UBYTE:
        raise DataError(f"{path.name} holds IDX type 0x{dtype:02x}, only unsigned bytes (0x08) are supported",
                        where=str(path), fix="pass the dataset's uint8 IDX files")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path.name} is truncated (header)", where=str(path), fix="reinstall the dataset")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(shape)) if shape else 0
    if len(raw) - header != size:
        raise DataError(f"{path.name}: the header declares {shape} ({size} bytes) but {len(raw) - header} follow",
                        where=str(path), fix="the file is truncated or damaged; reinstall the dataset")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {root}", where=str(root), fix=_FIX)


def is_fashion_mnist_dir(path: Path) -> bool:
    """Whether ``path`` holds the Fashion-MNIST training IDX files."""
    return path.is_dir() and any((path / (FILES[True][0] + s)).is_file() for s in (".gz", ""))


def available(root: str | Path | None = None) -> bool:
    """Whether the dataset can be read (from ``root``, default the Debian package's folder)."""
    return is_fashion_mnist_dir(Path(root) if root is not None else DEBIAN_DIR)


def load_fashion_mnist(root: str | Path | None = None, train: bool = True) -> ImageData:
    """The 60k training or 10k test images (``[N, 1, 28, 28]`` uint8) with the ten class names."""
    folder = Path(root) if root is not None else DEBIAN_DIR
    if not folder.is_dir():
        raise DataError(f"Fashion-MNIST folder not found: {folder}", where=str(folder), fix=_FIX)
    img_stem, lab_stem = FILES[train]
    images = read_idx(_find(folder, img_stem))
    labels = read_idx(_find(folder, lab_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST images {images.shape} and labels {labels.shape} do not match",
                        where=str(folder), fix="reinstall the dataset")
    return ImageData(torch.from_numpy(images)[:, None], torch.from_numpy(labels.astype(np.int64)), 10,
                     list(CLASS_NAMES), "fashion-mnist-train" if train else "fashion-mnist-test")
