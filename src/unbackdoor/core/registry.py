"""Registries: one per kind of thing, so CLI names, config names, report names and code names agree.

A registry maps a name to an object (a defense spec, an attack class, an architecture). Built-in
entries are declared lazily, one line each, as ``"package.module:attribute"``: listing the names
(for ``--help``, the report's row order, did-you-mean) imports nothing, and only the entry that
is used is imported. A plug-in registers the same way, or eagerly with :meth:`Registry.register`.

    LM_DEFENSES = Registry("LM defense")
    LM_DEFENSES.add("crow", "unbackdoor.lm.defenses.crow:SPEC")
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects, in registration order; unknown names are a ConfigError with a suggestion."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T | str] = {}
        self._aliases: dict[str, str] = {}

    # -- registration ----------------------------------------------------------------------
    def add(self, name: str, target: T | str, *, aliases: tuple[str, ...] = ()) -> None:
        """Register ``name``: an object, or ``"module:attribute"`` imported on first use."""
        key = self._key(name)
        if key in self._entries or key in self._aliases:
            raise ConfigError(f"{self.what} '{name}' is registered twice", where=f"{self.what} registry",
                              fix="give the new entry another name, or remove the old registration")
        self._entries[key] = target
        for a in aliases:
            self._aliases[self._key(a)] = key

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        def deco(obj: T) -> T:
            self.add(name, obj, aliases=aliases)
            return obj
        return deco

    # -- lookup ----------------------------------------------------------------------------
    @staticmethod
    def _key(name: str) -> str:
        return str(name).strip().lower().replace("_", "-")

    def canonical(self, name: str) -> str:
        """The registered spelling of ``name`` (aliases, case and ``_``/``-`` forgiven); ConfigError if unknown."""
        key = self._key(name)
        key = self._aliases.get(key, key)
        if key not in self._entries:
            close = difflib.get_close_matches(key, self.names() + list(self._aliases), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown {self.what} '{name}'", where=f"{self.what} name",
                              fix=f"{hint}use one of: {', '.join(self.names())}")
        return key

    def get(self, name: str) -> T:
        """The object registered as ``name`` (imported now if it was declared lazily)."""
        key = self.canonical(name)
        target = self._entries[key]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            obj = getattr(importlib.import_module(module), attr or "SPEC")
            self._entries[key] = obj
            return obj
        return target

    def names(self) -> list[str]:
        """Registered names, in registration order (aliases excluded)."""
        return list(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        """``(name, object)`` for every entry (imports lazy entries)."""
        for name in self.names():
            yield name, self.get(name)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = self._key(name)
        return key in self._entries or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self.names())})"


def split_variant(name: str, registry: Registry[Any]) -> tuple[str, str | None]:
    """``'ulrl-kept'`` -> ``('ulrl', 'kept')`` when ``ulrl`` is registered and ``ulrl-kept`` is not.

    How tiny-world runs and sweeps name a preset of a method next to the method itself.
    """
    if name in registry:
        return registry.canonical(name), None
    key = Registry._key(name)
    for method in sorted(registry.names(), key=len, reverse=True):
        if key.startswith(method + "-"):
            return method, key[len(method) + 1:]
    registry.canonical(name)  # raises the did-you-mean error
    raise AssertionError("unreachable")  # pragma: no cover
