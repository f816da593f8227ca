"""`WindowConfig`: the window settings every method shares, and the window rule (the base of each method's config).

The window rule (docs/METHODS.md, "The window rule"): after ``n`` tokens of a layer exactly
``q(n) = max(0, floor((n - S - R) / F) * F)`` are packed, R = ``residual_length``, F = ``flush_size``, S =
``sink_tokens`` (the first S tokens kept exact); the state depends only on n, so ``estimate_cache_bytes`` counts it to
the byte. The layer that applies it is ``layer.QuantizedKVLayer``; each method's config (``methods``) subclasses
``WindowConfig`` with its own fields and its codecs.
"""

from __future__ import annotations

import dataclasses

from .codec import Codec
from .validation import check_int

__all__ = ["SIDES", "WindowConfig"]

#: the two sides of a layer's cache: keys ("k") and values ("v"), the prefixes of their storage pieces
SIDES = ("k", "v")


@dataclasses.dataclass
class WindowConfig:
    """The window settings every method shares (module docstring), the base of each method's config.

    residual_length: R, the fewest recent tokens kept in full precision.
    flush_size: F, tokens packed at a time (the window holds R to R + F - 1 tokens).
    sink_tokens: S, the first tokens of the sequence kept exact for good (attention sinks; 0: none). The window rule
        then applies to the tokens after them: ``q(n) = max(0, floor((n - S - R) / F) * F)``.

    A method's config adds its own fields and implements, per side (``"k"`` keys, ``"v"`` values), ``make_codec``,
    ``side_bytes`` and ``check_dim``; ``side_config(side)`` is the config that codes a side (itself, except in a
    mixed cache, ``methods.mixed``).
    """

    residual_length: int = 128
    flush_size: int = 128
    sink_tokens: int = 0

    def __post_init__(self):
        check_int("residual_length", self.residual_length, 0)
        check_int("flush_size", self.flush_size, 1)
        check_int("sink_tokens", self.sink_tokens, 0)
        if self.sink_tokens > 0 and self.residual_length + self.flush_size <= self.sink_tokens:
            raise ValueError(
                f"sink_tokens must be smaller than the window (residual_length + flush_size = "
                f"{self.residual_length + self.flush_size}), got sink_tokens={self.sink_tokens}"
            )

    @property
    def window(self) -> tuple[int, int, int]:
        """(residual_length, flush_size, sink_tokens): what decides the window rule (equal across a cache's layers)."""
        return self.residual_length, self.flush_size, self.sink_tokens

    def num_quantized(self, n: int) -> int:
        """How many of `n` tokens are held packed."""
        return max(0, (n - self.sink_tokens - self.residual_length) // self.flush_size * self.flush_size)

    def num_sinks(self, n: int) -> int:
        """How many of `n` tokens are exact sink tokens."""
        return min(n, self.sink_tokens)

    # -- per side ----------------------------------------------------------------------------------------------------
    def side_config(self, side: str) -> WindowConfig:
        """The config that codes `side` ("k" or "v"): this one (a mixed cache's differ per side)."""
        return self

    def token_multiple(self, side: str) -> int:
        """Tokens `side`'s codec packs together (KIVI keys: a group): a flush is a multiple of it."""
        return 1

    def check_dim(self, side: str, dim: int) -> None:
        """Raise a ValueError, saying what would work, if `side` cannot be quantized at head dim `dim`."""
        self.check_head_dim(dim)

    def check_head_dim(self, head_dim: int) -> None:
        """Raise a ValueError if this configuration cannot quantize vectors of `head_dim` (either side)."""

    def check_dims(self, key_dim: int, value_dim: int) -> None:
        """``check_dim`` of both sides."""
        for side, dim in zip(SIDES, (key_dim, value_dim), strict=True):
            self.side_config(side).check_dim(side, dim)

    def make_codec(self, side: str, dim: int, layer_idx: int, device) -> Codec:
        """The codec of `side` of layer `layer_idx` for vectors of `dim`, on `device`."""
        raise NotImplementedError

    def make_codecs(self, key_dim: int, value_dim: int, layer_idx: int, device) -> tuple[Codec, Codec]:
        """The key and value codecs of layer `layer_idx` for keys of `key_dim` and values of `value_dim`, on
        `device` (the two dims differ in MLA-style attention)."""
        return tuple(self.side_config(side).make_codec(side, dim, layer_idx, device)
                     for side, dim in zip(SIDES, (key_dim, value_dim), strict=True))

    def side_bytes(self, side: str, dim: int, num_quantized: int) -> tuple[int, int]:
        """(code bytes, metadata bytes) of `num_quantized` packed tokens of `side`, one head and one batch row."""
        raise NotImplementedError

    def storage_bytes(self, key_dim: int, value_dim: int, num_quantized: int) -> tuple[int, int]:
        """(code bytes, metadata bytes) of `num_quantized` packed tokens of one head and one batch row, K and V."""
        parts = [self.side_config(side).side_bytes(side, dim, num_quantized)
                 for side, dim in zip(SIDES, (key_dim, value_dim), strict=True)]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)
