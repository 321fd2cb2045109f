"""Log lines and printed summaries once per job, not once per process.

Under ``accelerate launch`` / ``torchrun`` every process runs the same command, so every log
line and every summary would appear once per process. The CLI installs
:class:`MainProcessFilter` on its stderr handler and runs each command inside
:func:`main_process_stdout`: other ranks stay silent, except for errors, which every rank
still reports (tagged with its rank: an error on rank 1 is not rank 0's). :func:`echo` is
``print`` for the main process only, for code that prints outside the CLI.

The rank is read like :mod:`unbackdoor.core.distributed` reads it (the process group when one
is up, else the launcher's ``RANK``), without importing torch for a plain single-process run.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator


def process_rank() -> int:
    """This process's rank: 0 when not launched (or when ``RANK`` is unreadable: never silence a lone process)."""
    dist_mod = sys.modules.get("unbackdoor.core.distributed")
    if dist_mod is not None:
        try:
            return int(dist_mod.rank())
        except Exception:  # a malformed RANK is reported where the job uses it, not inside a log call
            return 0
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


def is_main_process() -> bool:
    return process_rank() == 0


class MainProcessFilter(logging.Filter):
    """Pass every record on rank 0; on other ranks only errors, prefixed with the rank."""

    def __init__(self, min_level_elsewhere: int = logging.ERROR):
        super().__init__()
        self.min_level_elsewhere = min_level_elsewhere

    def filter(self, record: logging.LogRecord) -> bool:
        rank = process_rank()
        if rank == 0:
            return True
        if record.levelno >= self.min_level_elsewhere:
            if not getattr(record, "_rank_tagged", False):
                record.msg = f"[rank {rank}] {record.msg}"
                record._rank_tagged = True  # type: ignore[attr-defined]
            return True
        return False


def install(handler: logging.Handler) -> logging.Handler:
    """Add the main-process filter to ``handler`` (once)."""
    if not any(isinstance(f, MainProcessFilter) for f in handler.filters):
        handler.addFilter(MainProcessFilter())
    return handler


@contextlib.contextmanager
def main_process_stdout() -> Iterator[None]:
    """Discard what other ranks print to stdout (their summaries repeat rank 0's); rank 0 is untouched."""
    if is_main_process():
        yield
        return
    saved = sys.stdout
    with open(os.devnull, "w") as sink:
        sys.stdout = sink
        try:
            yield
        finally:
            sys.stdout = saved


def echo(*args: Any, **kwargs: Any) -> None:
    """``print`` on the main process only."""
    if is_main_process():
        print(*args, **kwargs)
