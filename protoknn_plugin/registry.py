"""A tiny timm-style registry: names map to constructors in one place."""
from __future__ import annotations

from typing import Any, Callable, Dict, Generic, List, Optional, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to constructors.

    ``register`` is a decorator, ``create(name, **kw)`` builds, ``names()`` lists.
    ``entry_point_group`` names an importlib entry-point group that third-party
    packages use to add entries without importing us first; it is loaded lazily.
    """

    def __init__(self, kind: str, entry_point_group: Optional[str] = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: Dict[str, Callable[..., T]] = {}
        self._entry_points_loaded = entry_point_group is None

    def register(self, name: Optional[str] = None, *, overwrite: bool = False):
        def decorator(constructor: Callable[..., T]) -> Callable[..., T]:
            key = name or getattr(constructor, "name", None) or constructor.__name__
            if key in self._entries and not overwrite and self._entries[key] is not constructor:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = constructor
            return constructor

        return decorator

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.entry_point_group):
            if ep.name not in self._entries:
                self._entries[ep.name] = ep.load()

    def get(self, name: str) -> Callable[..., T]:
        self._load_entry_points()
        if name not in self._entries:
            raise UnknownNameError(self.kind, name, self._entries)
        return self._entries[name]

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> List[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._entries
