"""Mixed caches: keys coded by one method's config and values by another's (docs/METHODS.md, "Keys and values apart").

Keys carry most of the error (llama.cpp: 4-bit keys with 1-bit values +57% perplexity on Llama-2-7B where 1-bit keys
and values collapse; KV-AdaQuant: K4V2 75.2% against 54.7% for K2V4), so a cache may give the two sides different
methods, e.g. TurboQuant-4 keys with Bonsai 1-bit values, or KIVI keys with TurboQuant values::

    cache = MixedCache(model.config, key={"method": "turboquant", "bits": 4},
                       value={"method": "bonsai", "center": True, "rotate": True})
    cache = make_cache("mixed", model.config, key=TurboQuantConfig(bits=4), value=KIVIConfig(bits=2))

Each side is a whole method config (``TurboQuantConfig`` etc., or a dict ``{"method": name, **settings}``): it stays
the single source of that side's settings, and codes its side exactly as in a cache of that method alone (the same
codec, seeds and bytes: a mixed cache of two equal configs is that method's cache). Within one method, keys and
values also take different widths with ``key_bits`` / ``value_bits`` (TurboQuant, KIVI).

The window (residual_length, flush_size, sink_tokens) belongs to the cache, not a side: it is this config's own,
by default the key side's window; a dict side may not set it. The flush size must be a multiple of what each side
packs together (KIVI keys: their group of tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..cache import QuantizedKVCache, registered_methods
from ..validation import short_repr
from ..window import WindowConfig

__all__ = ["MixedCache", "MixedConfig"]

WINDOW_FIELDS = ("residual_length", "flush_size", "sink_tokens")
SIDE_SPEC = 'a method config (e.g. TurboQuantConfig(bits=4)) or a dict {"method": name, **settings}'


@dataclasses.dataclass
class MixedConfig(WindowConfig):
    """Mixed settings (the keyword arguments of ``MixedCache``).

    key / value: the configs of the two sides (module docstring), each a method config or
        ``{"method": name, **settings}``; stored resolved, as configs.
    residual_length / flush_size: the window (None: the key side's).
    sink_tokens: the first tokens kept exact (``window.WindowConfig``).
    """

    residual_length: int | None = None
    flush_size: int | None = None
    sink_tokens: int = 0
    key: Any = None
    value: Any = None

    def __post_init__(self):
        self.key = _side_config("key", self.key)
        self.value = _side_config("value", self.value)
        if self.residual_length is None:
            self.residual_length = self.key.residual_length
        if self.flush_size is None:
            self.flush_size = self.key.flush_size
        super().__post_init__()
        for side, name in (("k", "key"), ("v", "value")):
            multiple = self.side_config(side).token_multiple(side)
            if self.flush_size % multiple:
                raise ValueError(
                    f"flush_size must be a multiple of {multiple} (the {name} side, "
                    f"{type(self.side_config(side)).__name__}, packs {multiple} tokens together), got "
                    f"{self.flush_size}; e.g. flush_size={multiple * max(1, self.flush_size // multiple)}"
                )

    def side_config(self, side: str) -> WindowConfig:
        return self.key if side == "k" else self.value

    def token_multiple(self, side: str) -> int:
        return self.side_config(side).token_multiple(side)

    def check_dim(self, side: str, dim: int) -> None:
        self.side_config(side).check_dim(side, dim)

    def check_head_dim(self, head_dim: int) -> None:
        self.check_dims(head_dim, head_dim)


def _side_config(name: str, spec) -> WindowConfig:
    """The config of one side from a config or a ``{"method": ..., **settings}`` dict."""
    if isinstance(spec, MixedConfig):
        raise TypeError(f"{name} must be {SIDE_SPEC} of one method, got a MixedConfig")
    if isinstance(spec, WindowConfig):
        return spec
    if not isinstance(spec, dict):
        raise TypeError(f"{name} must be {SIDE_SPEC}, got {type(spec).__name__} {short_repr(spec)}")
    methods = {k: v for k, v in registered_methods().items() if v.config_class is not MixedConfig}
    method = spec.get("method")
    if method not in methods:
        raise ValueError(f"{name}['method'] must be one of {tuple(methods)}, got {short_repr(method)}")
    settings = {k: v for k, v in spec.items() if k != "method"}
    window = sorted(set(settings) & set(WINDOW_FIELDS))
    if window:
        raise ValueError(f"{name} may not set {window}: the window is the mixed cache's (set it there, e.g. "
                         f"MixedCache(config, residual_length=..., key=..., value=...))")
    return methods[method].make_config(**settings)


class MixedCache(QuantizedKVCache):
    """KV cache whose keys and values are coded by different methods (module docstring).

    Args:
        config: ``model.config`` or None.
        **settings: ``MixedConfig`` fields: key, value (required), residual_length / flush_size (the key side's),
            sink_tokens (0).

    Example::

        cache = MixedCache(model.config, key={"method": "turboquant", "bits": 4}, value={"method": "bonsai"})
    """

    method = "mixed"
    config_class = MixedConfig

