"""One registry shape for the project's kinds: teacher kinds (teachers/kinds.py), rollout-engine kinds
(actors/kinds.py) and weight-sync transports (opd/weight_sync/transports.py). Losses keep their own in
losses/base.py, the layer below this one."""
from __future__ import annotations

from typing import Generic, Protocol, TypeVar


class Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


class Registry(dict[str, T], Generic[T]):
    """Entries by name (a dict: iterate, `in`, `del` as usual). `key`: the manifest key whose values are the
    names; `what`: how an entry is called in errors; `reserved`: names that mean something else there
    (teacher.kind: none, sync.backend: auto)."""

    def __init__(self, key: str, what: str, reserved: tuple[str, ...] = ()):
        super().__init__()
        self.key, self.what, self.reserved = key, what, reserved

    def add(self, entry: T) -> T:
        """Register `entry`; a name taken already (or reserved) is refused."""
        if entry.name in self or entry.name in self.reserved:
            raise ValueError(f"{self.what} {entry.name!r} is registered already")
        self[entry.name] = entry
        return entry

    def lookup(self, name: str) -> T:
        """The entry named `name`; an unknown name is refused naming the manifest key and the choices."""
        if name not in self:
            raise ValueError(f"{self.key}: {name!r} is not one of {list(self)}")
        return self[name]
