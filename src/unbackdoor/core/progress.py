"""Progress bars that stay quiet when nobody is watching."""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) every progress bar of this process (``--quiet``)."""
    global _QUIET
    _QUIET = quiet


def progress_enabled() -> bool:
    if _QUIET or os.environ.get("UNBACKDOOR_QUIET"):
        return False
    return sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", **kw) -> tqdm:
    """``tqdm`` over ``iterable``, disabled when stderr is not a terminal or when quiet."""
    return tqdm(iterable, total=total, desc=desc, disable=not progress_enabled(), leave=False, dynamic_ncols=True, **kw)
