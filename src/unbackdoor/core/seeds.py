"""Seeding: one explicit seed in, reproducible runs out."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def set_seed(seed: int, *, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; on CPU this makes runs bit-identical."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def generator(seed: int) -> torch.Generator:
    """A private torch generator, so data order does not depend on global state."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g
