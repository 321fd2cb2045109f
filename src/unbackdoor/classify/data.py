"""Image datasets without torchvision: CIFAR pickles, image folders (GTSRB), in-memory arrays.

Conventions
-----------
* In memory, images are ``uint8`` tensors ``[N, C, H, W]`` and labels ``int64`` tensors ``[N]``
  (:class:`ImageData`). A whole CIFAR-10 training set is 150 MB this way, so no lazy loading.
* Batches are produced by :func:`iterate_batches` as float ``[0, 1]`` tensors; triggers are
  applied in that pixel space before augmentation and normalisation (``transforms.py``).
* Nothing is downloaded. A missing dataset is a :class:`DataError` that names the files to put
  where. CIFAR's official files are Python pickles of numpy arrays: they are read with a
  restricted unpickler that can only rebuild numpy arrays, never with plain ``pickle.load``.
"""
from __future__ import annotations

import csv
import io
import logging
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..core.errors import DataError, UnsafeFileError
from .transforms import BatchTransform

log = logging.getLogger("unbackdoor")

__all__ = [
    "ImageData", "from_arrays", "load_cifar10", "load_cifar100", "load_image_folder", "load_gtsrb",
    "stratified_subset", "iterate_batches", "restricted_unpickle", "to_float", "to_uint8", "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class ImageData:
    """A labelled image set: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``.

    Validated on construction: an empty set, a wrong dtype/shape or a label outside
    ``[0, num_classes)`` is a :class:`DataError` naming the first offending record.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    name: str = "data"

    def __post_init__(self) -> None:
        where = f"dataset '{self.name}'"
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.ndim != 4:
            got = f"{type(self.images).__name__} {getattr(self.images, 'dtype', '')} {tuple(getattr(self.images, 'shape', ()))}"
            raise DataError(f"images must be a uint8 tensor [N, C, H, W], got {got}", where=where,
                            fix="build the set with from_arrays(), which converts NHWC / float images")
        labels = torch.as_tensor(self.labels)
        if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise DataError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}",
                            where=where, fix="pass one integer class index per image")
        self.labels = labels.to(torch.int64)
        if len(self.images) == 0:
            raise DataError("the dataset is empty", where=where, fix="check the data path and any subset/filter")
        if len(self.labels) != len(self.images):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels", where=where,
                            fix="give exactly one label per image")
        if self.images.shape[1] not in (1, 3, 4):
            raise DataError(f"images have {self.images.shape[1]} channels; expected 1, 3 or 4 (shape "
                            f"{tuple(self.images.shape)} should be [N, C, H, W])", where=where,
                            fix="pass channels-first images, or use from_arrays() which detects NHWC")
        self.num_classes = _class_count(self.num_classes, where)
        bad = ((self.labels < 0) | (self.labels >= self.num_classes)).nonzero().flatten()
        if len(bad):
            i = int(bad[0])
            raise DataError(f"label {int(self.labels[i])} at record {i} is outside [0, {self.num_classes}) "
                            f"({len(bad)} such records)", where=f"{where}, record {i}, field 'label'",
                            fix=f"labels must be class indices 0..{self.num_classes - 1}; fix the data or num_classes")
        if not self.class_names:
            self.class_names = [str(i) for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise DataError(f"{len(self.class_names)} class names for {self.num_classes} classes", where=where,
                            fix="give one name per class, or none")
        self.class_names = [str(c) for c in self.class_names]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: Sequence[int] | torch.Tensor, name: str | None = None) -> "ImageData":
        """The records at ``indices`` (a copy), in that order."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise DataError(f"subset index out of range for a dataset of {len(self)} records", where=f"dataset '{self.name}'",
                            fix="use indices in [0, len(data))")
        return ImageData(self.images[idx].clone(), self.labels[idx].clone(), self.num_classes, list(self.class_names),
                         name or self.name)

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)


def _class_count(value: Any, where: str) -> int:
    """``num_classes`` as an int: a number or a one-element integer tensor/array (as a saved set stores it)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(value)
        if t.numel() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise DataError(f"num_classes is a {t.dtype} tensor of shape {tuple(t.shape)}, not one integer",
                            where=f"{where}, field 'num_classes'",
                            fix="store num_classes as a 0-d integer tensor, e.g. torch.tensor(10)")
        value = int(t.reshape(()).item())
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise DataError(f"num_classes = {value!r} must be an integer >= 1", where=f"{where}, field 'num_classes'",
                        fix="pass the number of classes of the dataset")
    return int(value)


def from_saved_tensors(state: Mapping[str, Any], where: str, name: str = "data") -> ImageData:
    """An image set from the tensors of a saved file (``images``, ``labels``, ``num_classes``), every field checked."""
    missing = [k for k in ("images", "labels", "num_classes") if k not in state]
    if missing:
        raise DataError(f"the file lacks {', '.join(missing)}", where=where,
                        fix="write image sets with 'unbackdoor classify poison' (images, labels, num_classes)")
    return ImageData(state["images"], state["labels"], _class_count(state["num_classes"], where), name=name)


def align_classes(data: ImageData, model_classes: Sequence[str] | None, where: str = "data") -> ImageData:
    """Relabel ``data`` to the class order a model recorded (``model.json``'s ``class_names``).

    Class folders are numbered by sorted name; a model trained with another order (or on more
    classes) would be scored against the wrong labels without any error. With the model's names
    known: the same order is returned as is; another order (or a subset of the model's classes)
    is relabelled to the model's indices, with a warning; a class the model does not know is a
    ``DataError``. Without recorded names (``None``) nothing can be checked.
    """
    if not model_classes:
        return data
    names = [str(c) for c in model_classes]
    if list(data.class_names) == names:
        return data
    unknown = [c for c in data.class_names if c not in names]
    if unknown:
        raise DataError(f"class(es) {', '.join(unknown[:5])} of {data.name} are not classes of the model "
                        f"({', '.join(names[:10])}{' ...' if len(names) > 10 else ''})", where=where,
                        fix="name the class folders exactly as the model's classes (model.json, class_names)")
    mapping = torch.tensor([names.index(c) for c in data.class_names], dtype=torch.long)
    log.warning("%s: class folders %s are relabelled to the model's class order %s", where,
                data.class_names[:10], names[:10])
    return ImageData(data.images, mapping[data.labels], len(names), names, data.name)


# ---- conversions ----------------------------------------------------------------------------

def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` -> float32 ``[0, 1]``."""
    return images.float().div_(255.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float ``[0, 1]`` -> uint8, rounded to the nearest level (clamped)."""
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def from_arrays(x: Any, y: Any, num_classes: int | None = None, *, class_names: Sequence[str] | None = None,
                name: str = "arrays") -> ImageData:
    """An :class:`ImageData` from numpy arrays / tensors / a list of per-image arrays.

    Accepts NHWC or NCHW (or NHW for grayscale), uint8 in ``[0, 255]`` or float in ``[0, 1]``.
    ``num_classes`` defaults to ``max(label) + 1``.
    """
    if isinstance(x, (list, tuple)):
        if not x:
            raise DataError("no images given", where=name, fix="pass at least one image")
        shapes = [tuple(np.shape(a)) for a in x]
        for i, s in enumerate(shapes):
            if s != shapes[0]:
                raise DataError(f"image {i} has shape {s} but image 0 has {shapes[0]}", where=f"{name}, record {i}",
                                fix="resize all images to one size first (load_image_folder(size=...) does it)")
        x = np.stack([np.asarray(a) for a in x])
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x.detach().cpu()
    if t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4:
        raise DataError(f"images must be 4-D (N, H, W, C or N, C, H, W), got shape {tuple(t.shape)}", where=name,
                        fix="stack the images into one array with a batch dimension")
    if t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):
        t = t.permute(0, 3, 1, 2)
    t = t.contiguous()
    if t.dtype == torch.uint8:
        images = t
    elif t.is_floating_point():
        if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1 or not bool(torch.isfinite(t).all())):
            raise DataError(f"float images must lie in [0, 1], found values in [{float(t.min()):.3g}, {float(t.max()):.3g}]",
                            where=name, fix="divide 0-255 images by 255, or pass them as uint8")
        images = to_uint8(t)
    elif t.dtype in (torch.int16, torch.int32, torch.int64):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > 255):
            raise DataError(f"integer images must lie in [0, 255], found [{int(t.min())}, {int(t.max())}]",
                            where=name, fix="convert the images to uint8")
        images = t.to(torch.uint8)
    else:
        raise DataError(f"unsupported image dtype {t.dtype}", where=name, fix="pass uint8 or float images")
    labels = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).flatten()
    if labels.is_floating_point():
        if not bool((labels == labels.round()).all()):
            raise DataError("labels are non-integer floats", where=name, fix="pass integer class indices")
        labels = labels.long()
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.numel() else 1
    return ImageData(images, labels, num_classes, list(class_names or []), name)


# ---- the restricted unpickler (CIFAR files) ------------------------------------------------

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol-5 pickles of arrays
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: str):
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeFileError(
            f"refused to unpickle {module}.{name}: this file asks to run code that is not numpy array reconstruction",
            where=self._source,
            fix="use the official CIFAR python files (cs.toronto.edu/~kriz/cifar.html); do not load files of unknown origin",
        )


def restricted_unpickle(path: str | Path) -> Any:
    """Unpickle ``path`` allowing only numpy arrays, dtypes, and plain containers/strings/numbers."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}", where=str(path), fix="check the file and its permissions") from None
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), str(path)).load()
    except UnsafeFileError:
        raise
    except Exception as e:  # truncated / not a pickle
        raise DataError(f"cannot read {path.name} as a CIFAR pickle: {type(e).__name__}: {e}", where=str(path),
                        fix="the file is damaged or not a CIFAR python batch; download it again") from None


def _get(d: dict, key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if isinstance(d, dict) and k in d:
            return d[k]
    keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d) if isinstance(d, dict) else []
    raise DataError(f"{path.name} has no '{key}' entry (found: {', '.join(keys) or 'not a dict'})",
                    where=f"{path}, field '{key}'", fix="this is not a CIFAR python batch file; download the python version")


def _decode_names(names: Any) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _find_folder(root: Path, sub: str, needed: Sequence[str], dataset: str, url_name: str) -> Path:
    for cand in (root, root / sub):
        if all((cand / f).is_file() for f in needed):
            return cand
    missing = [f for f in needed if not (root / sub / f).is_file() and not (root / f).is_file()]
    raise DataError(
        f"{dataset} not found: missing {', '.join(missing)}",
        where=str(root),
        fix=f"nothing is downloaded: get {url_name} (the python version) from https://www.cs.toronto.edu/~kriz/cifar.html, "
            f"extract it so that {root / sub}/ holds {', '.join(needed)}, and pass root={root}",
    )


def _cifar_images(raw: Any, n_expected: int | None, path: Path) -> torch.Tensor:
    arr = np.asarray(raw)
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path.name}: 'data' is {arr.dtype} {arr.shape}, expected uint8 [N, 3072]",
                        where=f"{path}, field 'data'", fix="this is not a CIFAR python batch; download it again")
    if n_expected is not None and arr.shape[0] != n_expected:
        raise DataError(f"{path.name}: {arr.shape[0]} images but {n_expected} labels", where=str(path),
                        fix="the file is damaged; download it again")
    return torch.from_numpy(arr.reshape(-1, 3, 32, 32).copy())


def _int_labels(value: Any, file: Path, field: str) -> torch.Tensor:
    """A batch file's labels as int64, or a DataError naming the file and field."""
    try:
        arr = np.asarray(value)
        if arr.dtype == object or arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise TypeError(f"dtype {arr.dtype}, shape {arr.shape}")
        return torch.as_tensor(arr.astype(np.int64))
    except (TypeError, ValueError) as e:
        raise DataError(f"the labels are not a list of integers ({e})", where=f"{file}, field '{field}'",
                        fix="the batch file is damaged or not a CIFAR batch; restore the original dataset files") from None


def load_cifar10(root: str | Path, train: bool = True) -> ImageData:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (or ``root`` itself): ``data_batch_1..5`` / ``test_batch``."""
    root = Path(root)
    files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    folder = _find_folder(root, "cifar-10-batches-py", files, "CIFAR-10", "cifar-10-python.tar.gz")
    xs, ys = [], []
    for f in files:
        d = restricted_unpickle(folder / f)
        labels = _int_labels(_get(d, "labels", folder / f), folder / f, "labels")
        xs.append(_cifar_images(_get(d, "data", folder / f), len(labels), folder / f))
        ys.append(labels)
    names = [str(i) for i in range(10)]
    if (folder / "batches.meta").is_file():
        names = _decode_names(_get(restricted_unpickle(folder / "batches.meta"), "label_names", folder / "batches.meta"))
    return ImageData(torch.cat(xs), torch.cat(ys), 10, names, "cifar10-train" if train else "cifar10-test")


def load_cifar100(root: str | Path, train: bool = True, *, coarse: bool = False) -> ImageData:
    """CIFAR-100 from ``root/cifar-100-python`` (or ``root``): ``train`` / ``test`` / ``meta``; fine labels by default."""
    root = Path(root)
    fname = "train" if train else "test"
    folder = _find_folder(root, "cifar-100-python", [fname], "CIFAR-100", "cifar-100-python.tar.gz")
    d = restricted_unpickle(folder / fname)
    key = "coarse_labels" if coarse else "fine_labels"
    labels = _int_labels(_get(d, key, folder / fname), folder / fname, key)
    images = _cifar_images(_get(d, "data", folder / fname), len(labels), folder / fname)
    n = 20 if coarse else 100
    names = [str(i) for i in range(n)]
    if (folder / "meta").is_file():
        names = _decode_names(_get(restricted_unpickle(folder / "meta"),
                                   "coarse_label_names" if coarse else "fine_label_names", folder / "meta"))
    return ImageData(images, labels, n, names, f"cifar100-{fname}")


# ---- image files (Pillow) ------------------------------------------------------------------

def _read_image(path: Path, size: int | tuple[int, int] | None, mode: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse before decoding, too
            with Image.open(path) as im:
                im = im.convert(mode)
                if size is not None:
                    wh = (size, size) if isinstance(size, int) else (size[1], size[0])
                    im = im.resize(wh, Image.BILINEAR)
                return np.asarray(im, dtype=np.uint8).copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"image {path.name} is too large to decode safely ({e}): a decompression bomb?",
                        where=str(path), fix="remove the file; resize genuine large images before loading them") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path.name}: {type(e).__name__}: {e}", where=str(path),
                        fix="the file is corrupt or not an image; delete or replace it") from None


def _stack_images(arrays: list[np.ndarray], paths: list[Path], name: str) -> torch.Tensor:
    first = arrays[0].shape
    for a, p in zip(arrays, paths):
        if a.shape != first:
            raise DataError(f"image {p.name} is {a.shape[1]}x{a.shape[0]} but {paths[0].name} is {first[1]}x{first[0]}",
                            where=str(p), fix="pass size=32 (or another size) to resize every image on load")
    x = torch.from_numpy(np.stack(arrays))
    if x.ndim == 3:
        x = x[:, None]
    else:
        x = x.permute(0, 3, 1, 2)
    return x.contiguous()


def load_image_folder(root: str | Path, size: int | tuple[int, int] | None = None, *, mode: str = "RGB",
                      name: str | None = None) -> ImageData:
    """A class-per-folder tree ``root/<class>/<image>``; classes sorted by folder name.

    Images of different sizes are an error unless ``size`` (an int for square, or ``(H, W)``) is given.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}", where=str(root),
                        fix="pass a folder holding one sub-folder per class, each with image files")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {root}", where=str(root),
                        fix="arrange images as root/<class name>/<image file>")
    arrays, paths, labels = [], [], []
    empty = []
    for ci, c in enumerate(classes):
        n = len(arrays)
        for p in sorted((root / c).iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                arrays.append(_read_image(p, size, mode))
                paths.append(p)
                labels.append(ci)
        if len(arrays) == n:
            empty.append(c)
    if arrays and empty:  # a class with no sample: NaN in per-class accuracy, and the numbering still counts it
        raise DataError(f"class folder(s) {', '.join(empty[:5])} hold no image: each would be a class without "
                        f"samples", where=str(root / empty[0]),
                        fix="put that class's images in it (deleting the folder would renumber the classes after "
                            "it), or move the folder out of the data tree if the class does not belong")
    if not arrays:
        raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}", where=str(root),
                        fix="put the images in the class folders")
    return ImageData(_stack_images(arrays, paths, str(root)), torch.tensor(labels), len(classes), classes,
                     name or root.name)


def load_gtsrb(root: str | Path, train: bool = True, size: int = 32) -> ImageData:
    """GTSRB (43 classes), resized to ``size`` x ``size`` as in BackdoorBench.

    Training: ``root/Final_Training/Images/<00000..00042>/*.ppm``. Test:
    ``root/Final_Test/Images/*.ppm`` with the ground truth ``root/GT-final_test.csv`` (or inside
    ``Final_Test/Images``).
    """
    root = Path(root)
    fix = ("nothing is downloaded: get GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip and "
           "GTSRB_Final_Test_GT.zip from https://benchmark.ini.rub.de/gtsrb_dataset.html and extract them into "
           f"{root} (giving {root}/Final_Training/Images/00000/..., {root}/Final_Test/Images/*.ppm, "
           f"{root}/GT-final_test.csv)")
    if train:
        folder = root / "Final_Training" / "Images"
        if not folder.is_dir():
            raise DataError(f"GTSRB training images not found at {folder}", where=str(root), fix=fix)
        data = load_image_folder(folder, size=size, name="gtsrb-train")
        if data.num_classes != 43:
            raise DataError(f"GTSRB training folder has {data.num_classes} class folders, expected 43", where=str(folder),
                            fix="extract the complete archive")
        return data
    images = root / "Final_Test" / "Images"
    gt = next((p for p in (root / "GT-final_test.csv", images / "GT-final_test.csv") if p.is_file()), None)
    if not images.is_dir() or gt is None:
        raise DataError("GTSRB test images or GT-final_test.csv not found", where=str(root), fix=fix)
    arrays, paths, labels = [], [], []
    with gt.open(newline="") as f:
        for i, row in enumerate(csv.DictReader(f, delimiter=";")):
            try:
                fname, label = row["Filename"], int(row["ClassId"])
            except (KeyError, ValueError, TypeError):
                raise DataError(f"row {i + 1} lacks a Filename or integer ClassId", where=f"{gt}, record {i + 1}",
                                fix="use the official GT-final_test.csv (semicolon-separated)") from None
            arrays.append(_read_image(images / fname, size, "RGB"))
            paths.append(images / fname)
            labels.append(label)
    if not arrays:
        raise DataError("GT-final_test.csv lists no images", where=str(gt), fix="use the official ground-truth file")
    return ImageData(_stack_images(arrays, paths, str(images)), torch.tensor(labels), 43, [str(i) for i in range(43)],
                     "gtsrb-test")


# ---- subsets and batches -------------------------------------------------------------------

def stratified_subset(data: ImageData, fraction_or_count: float | int, seed: int) -> torch.Tensor:
    """Sorted indices of a class-stratified random subset (the defender's clean data).

    A float in ``(0, 1]`` is a fraction of the set, an int a count. Each class gets its share
    (largest-remainder rounding), so the total is exactly the requested count.
    """
    n = len(data)
    if isinstance(fraction_or_count, bool) or not isinstance(fraction_or_count, (int, float)):
        raise DataError(f"subset size {fraction_or_count!r} is not a number", where="stratified_subset",
                        fix="pass a fraction in (0, 1] or a count of samples")
    if isinstance(fraction_or_count, float):
        if not 0 < fraction_or_count <= 1:
            raise DataError(f"subset fraction {fraction_or_count} is outside (0, 1]", where="stratified_subset",
                            fix="pass e.g. 0.01 for 1%, or an integer count")
        count = max(1, round(fraction_or_count * n))
    else:
        count = int(fraction_or_count)
    if not 1 <= count <= n:
        raise DataError(f"asked for {count} samples from a set of {n}", where=f"dataset '{data.name}'",
                        fix=f"ask for between 1 and {n} samples")
    g = torch.Generator().manual_seed(int(seed))
    counts = data.class_counts().double()
    share = counts * count / n
    take = share.floor().long()
    remainder = share - take.double()
    left = count - int(take.sum())
    if left > 0:
        order = torch.argsort(-remainder + 1e-9 * torch.arange(len(remainder)), stable=True)  # ties: lower class
        for c in order.tolist():
            if left == 0:
                break
            if take[c] < counts[c]:
                take[c] += 1
                left -= 1
    chosen = []
    for c in range(data.num_classes):
        members = (data.labels == c).nonzero().flatten()
        if take[c] > 0:
            chosen.append(members[torch.randperm(len(members), generator=g)[: int(take[c])]])
    return torch.sort(torch.cat(chosen)).values


def iterate_batches(data: ImageData, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                    transform: BatchTransform | None = None, device: str | torch.device = "cpu",
                    drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)``: float ``[B, C, H, W]`` in ``[0, 1]`` (then ``transform``-ed) and int64 labels.

    One generator seeded with ``seed`` drives the shuffle and the transform, so a batch stream
    is a pure function of ``(data, batch_size, seed)``.
    """
    if batch_size < 1:
        raise DataError(f"batch_size = {batch_size} must be >= 1", where="iterate_batches", fix="use e.g. 128")
    g = torch.Generator().manual_seed(int(seed))
    n = len(data)
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        x = to_float(data.images[idx].to(device))
        if transform is not None:
            x = transform(x, g)
        yield x, data.labels[idx].to(device)
