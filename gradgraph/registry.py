"""One name -> object registry for everything gradgraph looks up by name: reference models, metanetworks,
tasks, benchmarks, capture engines.

Entries are registered eagerly (``@REG.register("name")``) or lazily, as a ``"package.module:attribute"``
string that is imported the first time the entry is used. Listing the names imports nothing, which keeps
``gradgraph --help`` fast (this module imports nothing but the standard library).

    MODELS = Registry("reference model")
    MODELS.register("mlp", "gradgraph.models.reference:MLP")     # lazy
    @MODELS.register("tiny")                                     # eager
    def tiny(): ...
    MODELS.build("mlp", in_features=3)                           # MODELS.get("mlp")(in_features=3)
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator

from .errors import UnknownNameError

__all__ = ["Registry", "load_object"]


def load_object(path: str):
    """The object at ``"package.module:attribute"`` (``attribute`` may be dotted)."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise UnknownNameError(f"'{path}' is not of the form 'package.module:attribute'")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise UnknownNameError(f"cannot import module '{module}' (from '{path}'): {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise UnknownNameError(f"module '{module}' has no attribute '{attr}' (from '{path}')") from e
    return obj


class Registry:
    """Names -> objects (usually constructors), in registration order.

    Args:
        what: what an entry is, for error messages ("task", "metanetwork", ...).
        allow_paths: ``get`` also accepts ``"package.module:attribute"`` for names not registered (a user's
            own factory, as on the command line).
    """

    def __init__(self, what: str, allow_paths: bool = False) -> None:
        self.what = what
        self.allow_paths = allow_paths
        self._entries: dict[str, object] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, obj=None, *, help: str | None = None, replace: bool = False):
        """Register ``obj`` (an object, or a lazy ``"module:attribute"`` string) under ``name``; without
        ``obj``, return a decorator. Registering a taken name raises unless ``replace=True``."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.what} name must be a non-empty string, got {name!r}")

        def put(o):
            if name in self._entries and not replace:
                raise ValueError(f"a {self.what} named '{name}' is already registered; pass replace=True to "
                                 "override it")
            self._entries[name] = o
            if help is not None:
                self._help[name] = help
            return o

        return put if obj is None else put(obj)

    def get(self, name: str):
        """The entry ``name`` (imported now if it was registered lazily)."""
        if name not in self._entries:
            if self.allow_paths and ":" in name:
                return load_object(name)
            extra = " or 'package.module:function'" if self.allow_paths else ""
            raise UnknownNameError(f"unknown {self.what} '{name}': choose one of {', '.join(self.names())}{extra}")
        obj = self._entries[name]
        if isinstance(obj, str):
            obj = self._entries[name] = load_object(obj)
        return obj

    def build(self, name: str, *args, **kwargs):
        """``get(name)(*args, **kwargs)``."""
        return self.get(name)(*args, **kwargs)

    def help(self, name: str) -> str:
        """The help text given at registration, or the first line of the entry's docstring if it is loaded."""
        if name in self._help:
            return self._help[name]
        obj = self._entries.get(name)
        doc = "" if obj is None or isinstance(obj, str) else (obj.__doc__ or "")
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self.names())})"

