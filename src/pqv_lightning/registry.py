"""One registry class for every extension point.

Model families (:data:`pqv_lightning.models.MODELS`), importance criteria
(:data:`pqv_lightning.pruning.importance.IMPORTANCE`), model adapters
(:data:`pqv_lightning.pruning.adapters.ADAPTERS`), export formats
(:data:`pqv_lightning.export.targets.TARGETS`), precisions
(:data:`pqv_lightning.export.precisions.PRECISIONS`) and delegation swaps
(:data:`pqv_lightning.export.delegation.DELEGATION_SWAPS`) are all a :class:`Registry`: a read-only
mapping from a name to an entry, filled with :meth:`Registry.register`. Every list of allowed values
(CLI choices, error messages, config validation) is read from the registry at the moment it is
needed, so an entry registered by a user is accepted everywhere at once.

Registries whose entries apply to module types (adapters, delegation swaps) also answer "which
entry handles this module?" with :meth:`Registry.for_type`.

Example::

    from pqv_lightning.registry import Registry

    GREETINGS = Registry("greeting", argument="style")

    @GREETINGS.register("plain")
    def plain(name): return f"hello {name}"

    GREETINGS["plain"]("ada")        # 'hello ada'
    GREETINGS["loud"]                # ConfigError: style='loud' is not registered; allowed: ['plain']
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from .errors import ConfigError

__all__ = ["Registry", "UnknownNameError"]

T = TypeVar("T")


class UnknownNameError(ConfigError, KeyError):
    """A name that is not in a registry (a ``ConfigError`` for users, a ``KeyError`` for mappings)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one extension point.

    Args:
        kind: what an entry is, for messages (``"importance criterion"``).
        argument: the option users spell the name in, for messages (``"importance"``); defaults to
            ``kind``.
        types: for registries of per-type entries: ``entry -> tuple of types`` it applies to
            (enables :meth:`for_type`).
        mro: :meth:`for_type` also matches base classes (closest first); ``False`` = exact type only.
        builtins: modules that register the built-in entries, imported on the first read or
            registration (so a registry defined apart from its entries is complete however it was
            reached, and importing it alone stays cheap); their entries are listed first, in this
            order (by the module that defines each entry), then the others in registration order.
    """

    def __init__(
        self,
        kind: str,
        *,
        argument: str | None = None,
        types: Callable[[T], Iterable[type]] | None = None,
        mro: bool = True,
        builtins: Sequence[str] = (),
    ) -> None:
        self.kind = kind
        self.argument = argument or kind
        self._types = types
        self._mro = mro
        self._builtins = self._pending = tuple(builtins)
        self._registered: dict[str, T] = {}

    @property
    def _entries(self) -> dict[str, T]:
        if self._pending:  # the built-ins first (they register through this property too: clear it first)
            pending, self._pending = self._pending, ()
            try:
                for module in pending:
                    importlib.import_module(module)
            except BaseException:
                self._pending = pending
                raise
        return self._registered

    # ------------------------------------------------------------------ filling
    def register(self, name: str, entry: T | None = None, *, overwrite: bool = False) -> Any:
        """Add ``entry`` under ``name``; without ``entry``, a decorator that registers what it decorates
        (and returns it unchanged). Registering a taken name raises unless ``overwrite=True``."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{self.kind} name={name!r} must be a non-empty string")

        def add(obj: T) -> T:
            if name in self._entries and not overwrite:
                raise ConfigError(f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it")
            self._entries[name] = obj
            if self._builtins:  # built-ins in their declared order, whichever module was imported first
                rank = {module: i for i, module in enumerate(self._builtins)}
                key = {
                    n: rank.get(getattr(e, "__module__", None) or type(e).__module__, len(rank))
                    for n, e in self._registered.items()
                }
                self._registered = dict(sorted(self._registered.items(), key=lambda item: key[item[0]]))
            return obj

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> T:
        """Remove and return the entry (for tests and plugins that replace a built-in)."""
        entry = self[name]
        del self._entries[name]
        return entry

    # ------------------------------------------------------------------ reading
    def _unknown(self, name: object, argument: str | None = None) -> UnknownNameError:
        return UnknownNameError(
            f"{argument or self.argument}={name!r} is not registered; allowed: {list(self._entries)}"
        )

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self._unknown(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:
            return False

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order (what CLI choices and messages list)."""
        return tuple(self._entries)

    def check(self, values: str | Iterable[str], argument: str | None = None) -> None:
        """Raise one :class:`UnknownNameError` naming every unknown value (and an empty list)."""
        argument = argument or self.argument
        if isinstance(values, str) or not isinstance(values, (list, tuple, set, frozenset)):
            if values not in self:  # also a number or None: not a name
                raise self._unknown(values, argument)
            return
        given = list(values)
        bad = [v for v in given if v not in self]
        if bad or not given:
            raise UnknownNameError(
                f"{argument}={given!r}: " + (f"unknown {bad}" if bad else "empty") + f"; allowed: {list(self._entries)}"
            )

    def for_type(self, obj: Any) -> T | None:
        """The entry that applies to ``type(obj)`` — the closest class along its MRO, or only the
        exact type when the registry was made with ``mro=False`` — or None. An entry's types may be
        classes or ``"module.Class"`` strings (an optional library's classes, matched without importing it)."""
        if self._types is None:
            raise TypeError(f"the {self.kind} registry is not keyed by type")
        classes = type(obj).__mro__ if self._mro else (type(obj),)
        for klass in classes:
            path = f"{klass.__module__}.{klass.__qualname__}"
            for entry in reversed(list(self._entries.values())):  # a later registration wins
                types = tuple(self._types(entry))
                if klass in types or path in types:  # a "module.Class" string: matched without importing it
                    return entry
        return None

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"
