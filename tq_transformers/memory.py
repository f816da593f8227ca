"""Analytic memory of a KV cache, counted to the byte, for any model config.

`estimate_cache_bytes` returns the same breakdown as `cache.memory_footprint()` of a cache that has seen
`seq_len` tokens, and projects to models you do not have loaded (Llama-3.1-8B at 32K, say).
"""

from __future__ import annotations

import warnings

import torch
from transformers import DynamicCache, DynamicLayer

from .cache import cache_dims
from .registry import METHOD_NAMES, get_method
from .validation import check_int

__all__ = ["FULL", "MIB", "estimate_cache_bytes", "kv_heads_per_rank"]

FULL = "full"  # the unquantized baseline: a DynamicCache in the model's dtype
MIB = 2**20


def kv_heads_per_rank(kv_heads: int, tp_size: int) -> int:
    """The KV heads of one tensor-parallel rank: transformers shards k_proj / v_proj column-wise, head by head.

    Args:
        kv_heads: the model's KV heads (``cache_dims(config)[0]``).
        tp_size: tensor-parallel ranks, at least 1, dividing `kv_heads`.
    Returns:
        ``kv_heads // tp_size``.
    """
    check_int("tp_size", tp_size, 1, "a positive integer (tensor-parallel ranks)")
    if kv_heads % tp_size:
        raise ValueError(f"tp_size must divide the model's {kv_heads} KV heads (each rank caches whole heads), "
                         f"got tp_size={tp_size}")
    return kv_heads // tp_size


def estimate_cache_bytes(
    config,
    seq_len: int,
    batch_size: int = 1,
    method: str = FULL,
    dtype: torch.dtype = torch.float16,
    tp_size: int = 1,
    **settings,
) -> dict[str, int]:
    """Bytes held by a cache after `seq_len` tokens.

    Args:
        config: a model config (``model.config`` or ``AutoConfig``), loaded or not.
        seq_len: tokens held.
        batch_size: batch rows.
        method: "full" (a DynamicCache in `dtype`; "fp16" is a deprecated alias) or a quantized method
            ("turboquant", "kivi", "bonsai", "mixed") with that cache's keyword arguments (its settings, and
            ``layer_settings`` / ``edge_layers`` / ``edge_settings``).
        dtype: the model's dtype (the window's and the full cache's).
        tp_size: tensor-parallel ranks (transformers' ``tp_plan``, ``model.tp_size``): the bytes of one rank's cache,
            which holds ``num_key_value_heads / tp_size`` of the KV heads (the ranks' caches sum to the
            single-process one). The KV heads must divide evenly.
    Returns:
        {"codes", "metadata", "window", "unquantized_layers", "total"}, bytes (of one rank with `tp_size` > 1).
    """
    check_int("seq_len", seq_len, 0, "a non-negative integer")
    check_int("batch_size", batch_size, 1, "a positive integer")
    if method == "fp16":
        warnings.warn('method="fp16" is deprecated: the full-precision baseline is method="full" (in `dtype`)',
                      FutureWarning, stacklevel=2)
        method = FULL
    if method != FULL and method not in METHOD_NAMES:
        raise ValueError(f"method must be one of {(FULL, *METHOD_NAMES)}, got {method!r}")
    dims = cache_dims(config)
    if dims is None:
        raise ValueError(f"config must declare its attention head dims (head_dim, or hidden_size and "
                         f"num_attention_heads), got {type(config).__name__}")
    heads, key_dim, value_dim = dims
    heads = kv_heads_per_rank(heads, tp_size)
    item = torch.empty((), dtype=dtype).element_size()
    per_token_fp = heads * (key_dim + value_dim) * item  # K and V of one token, all heads, one row
    template = DynamicCache(config=config).layers
    if method == FULL:
        base, configs = None, {}
    else:
        base, configs = get_method(method).make_layer_configs(len(template), **settings)
        for cfg in {id(c): c for c in (base, *configs.values())}.values():
            cfg.check_dims(key_dim, value_dim)
    out = {"codes": 0, "metadata": 0, "window": 0, "unquantized_layers": 0}
    for i, layer in enumerate(template):
        if type(layer) is not DynamicLayer:
            window = getattr(layer, "sliding_window", None)
            held = seq_len if window is None else min(seq_len, window - 1)
            out["unquantized_layers"] += batch_size * held * per_token_fp
            continue
        if base is None:
            out["window"] += batch_size * seq_len * per_token_fp
            continue
        cfg = configs.get(i, base)
        q = cfg.num_quantized(seq_len)
        codes, meta = cfg.storage_bytes(key_dim, value_dim, q)
        out["codes"] += batch_size * heads * codes
        out["metadata"] += batch_size * heads * meta
        out["window"] += batch_size * (seq_len - q) * per_token_fp  # the exact sink tokens included
    out["total"] = sum(out.values())
    return out
