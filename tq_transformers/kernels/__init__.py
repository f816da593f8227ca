"""GPU kernels for the quantized caches, and their PyTorch references.

``reference`` (pure PyTorch, any device) and ``triton_kernels`` (CUDA, imported lazily, on first use) expose the same
functions: ``turboquant_compress``, ``kivi_compress``, ``bonsai_compress`` and the decode attentions
``turboquant_decode_attention``, ``kivi_decode_attention``, ``bonsai_decode_attention``.

The layer-level entry points below read a layer's configuration and storage and call one implementation:

- ``compress_block(layer, keys, values, impl)`` returns exactly what ``layer._quantize_block`` returns;
- ``decode_attention(layer, q, num_quantized, window_k, window_v, key_mask, scaling, impl)`` is one decode step of
  attention over the first ``num_quantized`` packed tokens of ``layer`` followed by the window.

``impl`` is ``"triton"`` or ``"reference"``; ``compress_supported`` / ``decode_supported`` say whether the Triton
kernels handle a layer's configuration (the fast path falls back to the PyTorch path otherwise).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from . import reference

__all__ = [
    "compress_block",
    "compress_supported",
    "decode_attention",
    "decode_supported",
    "get_impl",
    "reference",
    "triton_available",
]


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton is installed and a CUDA device is present."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


_IMPLS: dict = {}


def get_impl(impl: str):
    """The module implementing the kernels: "triton" (imported now) or "reference"."""
    if impl == "reference":
        return reference
    if impl == "triton":
        if "triton" not in _IMPLS:
            _IMPLS["triton"] = importlib.import_module(".triton_kernels", __name__)
        return _IMPLS["triton"]
    raise ValueError(f"impl must be one of ('triton', 'reference'), got {impl!r}")


_METHODS: dict[type, str] = {}  # layer class -> method name (decode runs this lookup for every layer and step)


def _method(layer) -> str:
    name = _METHODS.get(type(layer))
    if name is not None:
        return name
    from ..bonsai import BonsaiLayer
    from ..kivi import KIVILayer
    from ..turboquant import TurboQuantLayer

    for cls, name in ((TurboQuantLayer, "turboquant"), (KIVILayer, "kivi"), (BonsaiLayer, "bonsai")):
        if isinstance(layer, cls):
            _METHODS[type(layer)] = name
            return name
    raise TypeError(f"no kernels for layer type {type(layer).__name__}")


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def compress_supported(layer) -> bool:
    """Whether the Triton compress kernel handles this layer's configuration."""
    cfg, d = layer.cfg, layer.head_dim
    method = _method(layer)
    if method == "turboquant":
        return not cfg.qjl
    if method == "kivi":
        return cfg.bits in (1, 2, 4, 8) and _pow2(d) and _pow2(cfg.group_size)
    return cfg.group_size % 8 == 0


def decode_supported(layer) -> bool:
    """Whether the Triton decode-attention kernel handles this layer's configuration."""
    cfg, d = layer.cfg, layer.head_dim
    method = _method(layer)
    if method == "turboquant":
        return not cfg.qjl and cfg.bits in (1, 2, 4)
    if method == "kivi":
        return cfg.bits in (1, 2, 4, 8) and _pow2(d) and _pow2(cfg.group_size) and _pow2(d // cfg.group_size)
    return True


def compress_block(layer, keys: torch.Tensor, values: torch.Tensor, impl: str = "triton") -> dict:
    """Quantize `[B, H, T, D]` tokens leaving the window of `layer`: the same dict as `layer._quantize_block`."""
    from ..base import warn_non_finite

    mod = get_impl(impl)
    method = _method(layer)
    cfg, s = layer.cfg, layer.storage
    warn_non_finite(keys, f"key_states of layer {layer.layer_idx}")
    warn_non_finite(values, f"value_states of layer {layer.layer_idx}")
    if method == "turboquant":
        out = {}
        for kv, x, codec in (("k", keys, layer.k_codec), ("v", values, layer.v_codec)):
            codes, norms = mod.turboquant_compress(
                x, s.get(f"{kv}_mean") if cfg.center else None, codec.rotation, codec.levels, cfg.bits,
                cfg.norm_correction,
            )
            out[f"{kv}_codes"], out[f"{kv}_norms"] = codes, norms
        return out
    if method == "kivi":
        names = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
        return dict(zip(names, mod.kivi_compress(keys, values, cfg.bits, cfg.group_size)))
    out = {}
    for kv, x in (("k", keys), ("v", values)):
        rot = layer.rotations[kv] if cfg.rotate else None
        signs, scale = mod.bonsai_compress(x, s.get(f"{kv}_mean") if cfg.center else None, rot, cfg.group_size,
                                           cfg.scale)
        out[f"{kv}_signs"], out[f"{kv}_scale"] = signs, scale
    return out


def decode_attention(layer, q, num_quantized: int, window_k, window_v, key_mask, scaling: float,
                     impl: str = "triton", lengths: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of attention on `layer`: q `[B, Hq, D]` -> `[B, Hq, D]`.

    Attends to the first `num_quantized` packed tokens of the layer's storage, then to `window_k` / `window_v`
    `[B, Hkv, W, D]`; `key_mask` `[B, num_quantized + W]` (True = attend) or None. With `lengths` (int64 on the
    device, ``[n, W, ...]``), the counts are read there and `num_quantized` is an upper bound (see ``reference``).
    """
    mod = get_impl(impl)
    method = _method(layer)
    cfg, s = layer.cfg, layer.storage
    if method == "turboquant":
        return mod.turboquant_decode_attention(
            q, s["k_codes"], s["k_norms"], s["v_codes"], s["v_norms"], num_quantized, layer.k_codec.levels,
            cfg.bits, layer.k_codec.rotation, layer.v_codec.rotation, s.get("k_mean"), s.get("v_mean"),
            window_k, window_v, key_mask, scaling, lengths,
        )
    if method == "kivi":
        return mod.kivi_decode_attention(
            q, s["k_codes"], s["k_scale"], s["k_zero"], s["v_codes"], s["v_scale"], s["v_zero"], num_quantized,
            cfg.bits, cfg.group_size, window_k, window_v, key_mask, scaling, lengths,
        )
    rot = layer.rotations if cfg.rotate else {"k": None, "v": None}
    return mod.bonsai_decode_attention(
        q, s["k_signs"], s["k_scale"], s["v_signs"], s["v_scale"], num_quantized, cfg.group_size, rot["k"],
        rot["v"], s.get("k_mean"), s.get("v_mean"), window_k, window_v, key_mask, scaling, lengths,
    )
