"""One error type for everything the user can fix.

Every message says what is wrong, where it was found and what to do, so the CLI can
print it without a traceback (``--debug`` shows the traceback).
"""
from __future__ import annotations

from pathlib import Path


class UnbackdoorError(Exception):
    """A problem the user can fix: bad input, bad config, unsafe file, unusable model."""

    def __init__(self, problem: str, *, where: str | None = None, fix: str | None = None):
        self.problem = problem
        self.where = where
        self.fix = fix
        super().__init__(self.format())

    def format(self) -> str:
        parts = [self.problem]
        if self.where:
            parts.append(f"  where: {self.where}")
        if self.fix:
            parts.append(f"  fix:   {self.fix}")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.format()

    def __reduce__(self):
        # keep problem/where/fix across pickling (DataLoader workers, multiprocessing, sweeps)
        return (_rebuild, (type(self), self.problem, self.where, self.fix))


def _rebuild(cls: type[UnbackdoorError], problem: str, where: str | None, fix: str | None) -> UnbackdoorError:
    err = cls.__new__(cls)
    UnbackdoorError.__init__(err, problem, where=where, fix=fix)
    return err


def location(file: str | Path | None = None, index: int | None = None, field: str | None = None) -> str:
    """``"data.json, record 3, field 'output'"``: the ``where`` of an error about one record."""
    parts = []
    if file is not None:
        parts.append(str(file))
    if index is not None:
        parts.append(f"record {index}")
    if field is not None:
        parts.append(f"field '{field}'")
    return ", ".join(parts) or "input"


class DataError(UnbackdoorError):
    """Missing, malformed or inconsistent data."""


class ConfigError(UnbackdoorError):
    """Unknown, ill-typed or out-of-range configuration values."""


class ModelError(UnbackdoorError):
    """A model that cannot be used the way a defense needs (no head, no hidden states...)."""


class UnsafeFileError(UnbackdoorError):
    """A file that could execute code on load, refused."""


class NumericalError(UnbackdoorError):
    """NaN or inf in a loss: the run stops and keeps its last good checkpoint."""
