"""Method names -> cache classes, read from the cache classes themselves (each declares ``method = "name"``)."""

from __future__ import annotations

from . import methods  # noqa: F401  (imports every method module: their caches register themselves)
from .cache import registered_methods

__all__ = ["METHOD_NAMES", "get_method", "make_cache"]

METHOD_NAMES = tuple(registered_methods())


def get_method(name: str):
    """The cache class of a method name (one of ``METHOD_NAMES``: "turboquant", "kivi", "bonsai").

    Args:
        name: the method name.
    Returns:
        the ``QuantizedKVCache`` subclass.
    """
    found = registered_methods()
    if name not in found:
        raise ValueError(f"method must be one of {tuple(found)}, got {name!r}")
    return found[name]


def make_cache(method: str, config=None, **settings):
    """A fresh cache of `method` for a model `config`, e.g. ``make_cache("kivi", model.config, bits=2)``.

    Args:
        method: a name of ``METHOD_NAMES``.
        config: ``model.config`` or None.
        **settings: the method's settings.
    Returns:
        the new cache.
    """
    return get_method(method)(config, **settings)
