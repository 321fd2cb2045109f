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


class FileSystemError(UnbackdoorError):
    """A path that cannot be read or written: read-only, full, missing, a file where a folder belongs."""


# errno name -> (what is wrong, what to do); ``{path}`` is the file or folder concerned
_OS_ERRORS: dict[str, tuple[str, str]] = {
    "EROFS": ("{path} is on a read-only file system", "write the output to a writable location (another --out)"),
    "ENOSPC": ("no space left on the device holding {path}; earlier outputs were left as they were",
               "free some space, or write the output to another disk"),
    "EDQUOT": ("the disk quota is exceeded on the device holding {path}; earlier outputs were left as they were",
               "free some space within your quota, or write the output elsewhere"),
    "ENOTDIR": ("{blocker} is a file, but {path} needs it to be a folder",
                "choose another output path (a folder path for --out), or remove that file"),
    "EEXIST": ("{blocker} is a file, but {path} needs it to be a folder",
               "choose another output path (a folder path for --out), or remove that file"),
    "EISDIR": ("{path} is a folder, but a file is needed there", "pass a file path, not a folder"),
    "EACCES": ("permission denied for {path}", "choose a location you may write to, or fix the permissions"),
    "EPERM": ("the operation is not permitted on {path}", "choose another location, or fix the permissions"),
    "ENOENT": ("{path} does not exist (or cannot be created there)", "check the path; create its parent folder"),
    "ENAMETOOLONG": ("the path {path} is too long for the file system", "choose a shorter output path"),
    "ELOOP": ("{path} leads into a loop of symbolic links", "fix or remove the links"),
    "EMFILE": ("too many open files while using {path}", "raise the open-file limit (ulimit -n)"),
}


def os_error(e: OSError, path: str | Path | None = None) -> FileSystemError:
    """An ``OSError`` (read-only, full disk, a file where a folder belongs...) as a clear error.

    ``path`` is the path the user gave (a temporary sibling name in ``e`` would only confuse).
    """
    import errno as _errno

    name = _errno.errorcode.get(e.errno or 0, "")
    target = str(path if path is not None else (e.filename or "the output"))
    problem, fix = _OS_ERRORS.get(name, ("cannot use {path}: " + (e.strerror or str(e)),
                                         "check the path, the free space and the permissions"))
    detail = f" ({name}: {e.strerror})" if name and e.strerror else ""
    return FileSystemError(problem.format(path=target, blocker=_blocking_file(target)) + detail, where=target,
                           fix=fix)


def _blocking_file(path: str) -> str:
    """The first of ``path`` and its parents that exists and is not a folder (what ENOTDIR/EEXIST hit)."""
    p = Path(path)
    for candidate in [*reversed(p.parents), p]:
        if candidate.exists() and not candidate.is_dir():
            return str(candidate)
    return str(p)
