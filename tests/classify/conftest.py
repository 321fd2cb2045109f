"""Shared fixtures for the classifier tests: small, deterministic, CPU-only data."""
from __future__ import annotations

import pytest
import torch

from unbackdoor.classify.data import ImageData
from unbackdoor.classify.tinyworld import make_tiny_world


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests share a 2-core machine: keep torch to one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_world_small() -> tuple[ImageData, ImageData]:
    """200 training and 100 test tiny-world images (seed 0)."""
    return make_tiny_world(0, n_train=200, n_test=100)


@pytest.fixture
def random_images() -> ImageData:
    """100 random 3x16x16 images in 10 balanced classes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (100, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.arange(100) % 10
    return ImageData(x, y, 10, name="random")
