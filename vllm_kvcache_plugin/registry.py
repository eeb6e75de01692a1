"""Explicit name -> class registries backed by Python entry points.

Built-in entries are listed here (so a source checkout works without installation); other packages
add or override entries through their own entry points, with no factory to edit.
"""

from __future__ import annotations

import importlib
import logging
import threading
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")
logger = logging.getLogger(__name__)


class Registry(Generic[T]):
    def __init__(self, kind: str, group: str, builtins: dict[str, str]) -> None:
        self.kind = kind
        self.group = group
        self._targets: dict[str, str] = dict(builtins)
        self._loaded: dict[str, T] = {}
        self._scanned = False
        self._lock = threading.Lock()

    def _scan(self) -> None:
        if self._scanned:
            return
        with self._lock:
            if self._scanned:
                return
            try:
                eps = entry_points(group=self.group)
            except Exception as exc:  # broken metadata of an unrelated package
                logger.warning("Could not read %s entry points: %s", self.group, exc)
                eps = []
            for ep in eps:
                if self._targets.get(ep.name) != ep.value:
                    logger.debug("%s %r provided by entry point %s", self.kind, ep.name, ep.value)
                self._targets[ep.name] = ep.value
            self._scanned = True

    def register(self, name: str, target: str | T) -> None:
        """Add an entry at run time (``"module:attr"`` or the object itself)."""
        with self._lock:
            if isinstance(target, str):
                self._targets[name] = target
                self._loaded.pop(name, None)
            else:
                self._targets[name] = f"<object {target!r}>"
                self._loaded[name] = target

    def names(self) -> list[str]:
        self._scan()
        return sorted(self._targets)

    def __contains__(self, name: str) -> bool:
        self._scan()
        return name in self._targets

    def load(self, name: str) -> T:
        """The registered object; KeyError for unknown names, ImportError if it cannot load."""
        self._scan()
        if name in self._loaded:
            return self._loaded[name]
        target = self._targets[name]
        module_name, _, attr = target.partition(":")
        obj = getattr(importlib.import_module(module_name), attr)
        self._loaded[name] = obj
        return obj
