"""Analytic memory of a KV cache, counted to the byte, for any model config.

`estimate_cache_bytes` returns the same breakdown as `cache.memory_footprint()` of a cache that has seen
`seq_len` tokens, and projects to models you do not have loaded (Llama-3.1-8B at 32K, say).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, DynamicLayer

from .base import head_dim_of
from .registry import get_method


def _layers_of(config) -> list:
    """The layer objects a DynamicCache builds for `config` (full attention: DynamicLayer; others keep theirs)."""
    return DynamicCache(config=config).layers


def estimate_cache_bytes(
    config,
    seq_len: int,
    batch_size: int = 1,
    method: str = "fp16",
    dtype: torch.dtype = torch.float16,
    **method_kwargs,
) -> dict[str, int]:
    """Bytes held by a cache after `seq_len` tokens: codes, metadata, window, unquantized_layers, total.

    method: "fp16" (a DynamicCache in `dtype`), "turboquant", "kivi" or "bonsai" with that cache's keyword
    arguments (bits, group_size, residual_length, ...). `dtype` is the model's dtype (the window's).
    """
    if not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be a non-negative integer, got {seq_len!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    text = config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = head_dim_of(config)
    item = torch.empty((), dtype=dtype).element_size()
    per_token_fp = 2 * heads * head_dim * item  # K and V of one token, all heads, one row
    cfg = None if method == "fp16" else get_method(method).config_class(**method_kwargs)
    if cfg is not None:
        cfg.check_head_dim(head_dim)
    out = {"codes": 0, "metadata": 0, "window": 0, "unquantized_layers": 0}
    for layer in _layers_of(config):
        if type(layer) is not DynamicLayer:
            window = getattr(layer, "sliding_window", None)
            held = seq_len if window is None else min(seq_len, window - 1)
            out["unquantized_layers"] += batch_size * held * per_token_fp
            continue
        if cfg is None:
            out["window"] += batch_size * seq_len * per_token_fp
            continue
        q = cfg.num_quantized(seq_len)
        codes, meta = cfg.storage_bytes(head_dim, q)
        out["codes"] += batch_size * heads * codes
        out["metadata"] += batch_size * heads * meta
        out["window"] += batch_size * (seq_len - q) * per_token_fp
    out["total"] = sum(out.values())
    return out


MIB = 2**20
