"""The tiny world: deterministic from its seed, balanced, varied, and never the same image twice."""
from __future__ import annotations

import pytest
import torch

from unbackdoor.classify.tinyworld import CLASS_NAMES, make_tiny_world
from unbackdoor.core.errors import ConfigError


def test_same_seed_same_world_other_seed_other_world():
    a_train, a_test = make_tiny_world(3, n_train=60, n_test=20)
    b_train, b_test = make_tiny_world(3, n_train=60, n_test=20)
    c_train, _ = make_tiny_world(4, n_train=60, n_test=20)
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_test.labels, b_test.labels)
    assert not torch.equal(a_train.images, c_train.images)


def test_shapes_are_uint8_rgb_32px_balanced_and_named(tiny_world_small):
    train, test = tiny_world_small
    assert train.images.shape == (200, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.class_counts().tolist() == [20] * 10 and test.class_counts().tolist() == [10] * 10
    assert train.class_names == CLASS_NAMES and train.num_classes == 10


def test_train_and_test_share_no_image_and_images_vary(tiny_world_small):
    train, test = tiny_world_small
    flat_train = {bytes(x.flatten().tolist()) for x in train.images}
    assert len(flat_train) == len(train)
    assert not flat_train & {bytes(x.flatten().tolist()) for x in test.images}
    x = train.images.float() / 255
    assert 0.3 < float(x.mean()) < 0.7 and float(x.std()) > 0.15


def test_the_class_is_not_given_away_by_colour():
    big, _ = make_tiny_world(1, n_train=1000, n_test=10)
    x = big.images.float() / 255
    means = torch.stack([x[big.labels == c].mean((0, 2, 3)) for c in range(10)])
    assert float((means - means.mean(0)).abs().max()) < 0.07


def test_other_sizes_and_bad_arguments():
    train, _ = make_tiny_world(0, n_train=20, n_test=10, size=16)
    assert train.images.shape == (20, 3, 16, 16)
    with pytest.raises(ConfigError, match="at least 10"):
        make_tiny_world(0, n_train=5)
    with pytest.raises(ConfigError, match="size"):
        make_tiny_world(0, n_train=20, n_test=10, size=4)
