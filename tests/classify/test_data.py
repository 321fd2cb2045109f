"""Datasets without torchvision: CIFAR pickles, image folders, arrays, subsets, batches, transforms."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from unbackdoor.classify.data import (ImageData, from_arrays, iterate_batches, load_cifar10, load_cifar100,
                                      load_gtsrb, load_image_folder, restricted_unpickle, stratified_subset)
from unbackdoor.classify.transforms import Compose, Normalize, RandomCrop, RandomHorizontalFlip, standard_augmentation
from unbackdoor.core.errors import ConfigError, DataError, UnsafeFileError


def _write_cifar10(folder, n_per_batch=4, protocol=2):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", b"labels": labels, b"data": data}, f, protocol=protocol)
        expected.append((data, labels))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=protocol)
    return expected


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_reader_rebuilds_images_labels_and_names(tmp_path, protocol):
    expected = _write_cifar10(tmp_path / "cifar-10-batches-py", protocol=protocol)
    train = load_cifar10(tmp_path, train=True)
    test = load_cifar10(tmp_path / "cifar-10-batches-py", train=False)
    assert len(train) == 20 and len(test) == 4
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    first = expected[0][0][1].reshape(3, 32, 32)
    assert torch.equal(train.images[1], torch.from_numpy(first))  # row-major R, G, B planes
    assert train.labels[:4].tolist() == expected[0][1]
    assert test.labels.tolist() == expected[5][1]
    assert train.class_names[3] == "c3"


def test_cifar100_reader_uses_fine_labels_by_default(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.zeros((3, 3072), np.uint8)
    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": data, b"fine_labels": [5, 99, 0], b"coarse_labels": [1, 19, 0]}, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"f%d" % i for i in range(100)],
                     b"coarse_label_names": [b"k%d" % i for i in range(20)]}, f, protocol=2)
    fine = load_cifar100(tmp_path)
    coarse = load_cifar100(tmp_path, coarse=True)
    assert fine.num_classes == 100 and fine.labels.tolist() == [5, 99, 0] and fine.class_names[99] == "f99"
    assert coarse.num_classes == 20 and coarse.labels.tolist() == [1, 19, 0]


def test_missing_cifar_names_the_files_and_where_to_put_them(tmp_path):
    with pytest.raises(DataError) as e:
        load_cifar10(tmp_path)
    msg = str(e.value)
    assert "data_batch_1" in msg and "cifar-10-batches-py" in msg and "nothing is downloaded" in msg


def test_restricted_unpickler_refuses_a_payload_that_would_run_code(tmp_path):
    bad = tmp_path / "data_batch_1"
    bad.write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(UnsafeFileError, match="posix.system|os.system|nt.system"):
        restricted_unpickle(bad)


def test_restricted_unpickler_reads_numpy_arrays_and_refuses_other_classes(tmp_path):
    ok = tmp_path / "ok"
    ok.write_bytes(pickle.dumps({"a": np.arange(6, dtype=np.uint8).reshape(2, 3)}, protocol=2))
    assert restricted_unpickle(ok)[b"a" if b"a" in restricted_unpickle(ok) else "a"].tolist() == [[0, 1, 2], [3, 4, 5]]
    other = tmp_path / "other"
    other.write_bytes(pickle.dumps(torch.nn.Linear(1, 1)))
    with pytest.raises(UnsafeFileError):
        restricted_unpickle(other)
    truncated = tmp_path / "trunc"
    truncated.write_bytes(ok.read_bytes()[:10])
    with pytest.raises(DataError):
        restricted_unpickle(truncated)


def _write_folder(root, sizes):
    for ci, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            arr = np.full((h, w, 3), 40 * ci + i, np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")


def test_image_folder_reads_classes_sorted_by_folder_name(tmp_path):
    _write_folder(tmp_path, [(8, 6), (8, 6)])
    d = load_image_folder(tmp_path)
    assert d.class_names == ["cat", "dog"] and d.labels.tolist() == [0, 0, 1, 1]
    assert d.images.shape == (4, 3, 6, 8)
    assert d.images[3, 0, 0, 0] == 41


def test_mixed_image_sizes_are_an_error_unless_a_size_is_given(tmp_path):
    _write_folder(tmp_path, [(8, 8), (10, 12)])
    with pytest.raises(DataError, match="size="):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, size=16).images.shape == (4, 3, 16, 16)


def test_corrupt_image_is_named(tmp_path):
    _write_folder(tmp_path, [(8, 8)])
    (tmp_path / "dog" / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError) as e:
        load_image_folder(tmp_path)
    assert "broken.png" in str(e.value) and "corrupt" in str(e.value)


def test_gtsrb_test_split_reads_the_ground_truth_csv(tmp_path):
    images = tmp_path / "Final_Test" / "Images"
    images.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20 + i, 25, 3), i, np.uint8)).save(images / f"{i:05d}.ppm")
    (tmp_path / "GT-final_test.csv").write_text(
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
        + "".join(f"{i:05d}.ppm;25;20;0;0;1;1;{40 + i}\n" for i in range(3)))
    d = load_gtsrb(tmp_path, train=False, size=32)
    assert d.num_classes == 43 and d.labels.tolist() == [40, 41, 42] and d.images.shape == (3, 3, 32, 32)
    with pytest.raises(DataError, match="Final_Training"):
        load_gtsrb(tmp_path, train=True)


def test_labels_outside_the_class_range_are_named_with_their_index():
    x = torch.zeros(5, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(DataError) as e:
        ImageData(x, torch.tensor([0, 1, 2, 10, 3]), 10, name="mine")
    assert "record 3" in str(e.value) and "label 10" in str(e.value)
    with pytest.raises(DataError, match="record 0"):
        ImageData(x, torch.tensor([-1, 1, 2, 3, 3]), 10)
    with pytest.raises(DataError, match="empty"):
        ImageData(x[:0], torch.tensor([], dtype=torch.long), 10)


def test_from_arrays_accepts_nhwc_nchw_uint8_and_float():
    g = np.random.default_rng(0)
    nhwc = g.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    a = from_arrays(nhwc, np.arange(6) % 3)
    b = from_arrays(torch.from_numpy(nhwc).permute(0, 3, 1, 2), torch.arange(6) % 3)
    c = from_arrays(nhwc.astype(np.float32) / 255, np.arange(6) % 3)
    assert a.images.shape == (6, 3, 8, 8) and a.num_classes == 3
    assert torch.equal(a.images, b.images) and torch.equal(a.images, c.images)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        from_arrays(nhwc.astype(np.float32), np.zeros(6))
    with pytest.raises(DataError, match="image 1"):
        from_arrays([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], [0, 1])


def test_stratified_subset_is_exact_balanced_and_seeded(random_images):
    idx = stratified_subset(random_images, 0.2, seed=1)
    assert len(idx) == 20 and torch.equal(idx, torch.sort(idx).values)
    assert random_images.labels[idx].bincount(minlength=10).tolist() == [2] * 10
    assert torch.equal(idx, stratified_subset(random_images, 20, seed=1))
    assert not torch.equal(idx, stratified_subset(random_images, 20, seed=2))
    assert len(stratified_subset(random_images, 13, seed=0)) == 13
    with pytest.raises(DataError):
        stratified_subset(random_images, 101, seed=0)


def test_batches_cover_the_data_once_and_are_a_function_of_the_seed(random_images):
    def run(seed):
        return list(iterate_batches(random_images, 32, shuffle=True, seed=seed, transform=standard_augmentation()))
    a, b, c = run(3), run(3), run(4)
    assert [x.shape[0] for x, _ in a] == [32, 32, 32, 4]
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    assert sorted(torch.cat([y for _, y in a]).tolist()) == sorted(random_images.labels.tolist())
    x0, _ = next(iterate_batches(random_images, 100))
    assert x0.dtype == torch.float32 and 0 <= float(x0.min()) and float(x0.max()) <= 1


def test_random_crop_shifts_content_within_the_padding():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 4, 4] = 1.0
    out = RandomCrop(2)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    pos = out.flatten(1).argmax(1)
    r, c = pos // 8, pos % 8
    assert ((r - 4).abs() <= 2).all() and ((c - 4).abs() <= 2).all()
    assert len(set(zip(r.tolist(), c.tolist()))) > 5  # offsets differ per image
    assert torch.allclose(out.sum((1, 2, 3)), torch.ones(64))


def test_flip_mirrors_about_half_the_images_and_normalize_matches_formula():
    x = torch.rand(400, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = RandomHorizontalFlip(0.5)(x, torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert (flipped | kept).all() and 150 < int(flipped.sum()) < 250
    n = Normalize((0.5, 0.4, 0.3), (0.2, 0.2, 0.1))(x)
    assert torch.allclose(n[:, 2], (x[:, 2] - 0.3) / 0.1)
    with pytest.raises(ConfigError):
        Normalize((0.5,), (0.0,))
    assert Compose([None, RandomCrop(0)])(x) is x
