"""Method names -> cache classes."""

from __future__ import annotations


def _methods() -> dict:
    from .bonsai import BonsaiCache
    from .kivi import KIVICache
    from .turboquant import TurboQuantCache

    return {"turboquant": TurboQuantCache, "kivi": KIVICache, "bonsai": BonsaiCache}


METHOD_NAMES = ("turboquant", "kivi", "bonsai")


def get_method(name: str):
    """The cache class of a method name ("turboquant", "kivi" or "bonsai")."""
    methods = _methods()
    if name not in methods:
        raise ValueError(f"method must be one of {tuple(methods)}, got {name!r}")
    return methods[name]


def make_cache(method: str, config=None, **kwargs):
    """A fresh cache of `method` for a model `config`, e.g. ``make_cache("kivi", model.config, bits=2)``."""
    return get_method(method)(config, **kwargs)
