"""The fast decode path: fused attention on the packed cache, chosen once per model.

    tq_transformers.enable(model, "turboquant", bits=4, fast=True)
    model.generate(**inputs)          # decode steps run the Triton kernel on the packed codes

How it fits transformers (same mechanism on 5.17 and 5.24):

1. ``install(model)`` registers the attention function ``tq_fused_attention`` under the name ``"tq_fused"`` in
   ``transformers.AttentionInterface`` (with SDPA's mask function in ``AttentionMaskInterface``, so the masks are
   exactly those the ``"sdpa"`` implementation gets) and switches the model to it with
   ``model.set_attn_implementation("tq_fused")``.
2. ``prepare_cache(cache)`` sets the ``fast_path`` hook of every quantized layer (``QuantizedLayer.update``). On a
   single-token decode step with packed tokens, the layer skips dequantizing its history and returns the window
   tensors tagged with a ``FastView``: the layer, how many packed tokens this step attends to (those held before this
   step's flush, exactly what the reference path attends to) and the window. Storing and flushing are unchanged, and
   it also routes the layer's compress-on-write through the Triton kernel when the layer is on CUDA.
3. ``tq_fused_attention`` finds the ``FastView`` on the key tensor it is handed (so it always pairs the right layer
   with the right module, whatever ``module.layer_idx``), and
   - on CUDA, for a configuration the kernels handle: runs the fused split-K decode kernel;
   - otherwise (CPU, an unsupported configuration): rebuilds exactly the tensors the reference path would have
     returned and calls transformers' SDPA attention: identical output;
   - without a view (prefill, layers that are not quantized, any other cache): plain SDPA, as ``"sdpa"`` does.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import kernels
from .base import QuantizedCacheBase, QuantizedLayer

ATTN_NAME = "tq_fused"

__all__ = ["ATTN_NAME", "FastView", "install", "prepare_cache", "register", "tq_fused_attention", "uninstall"]


@dataclasses.dataclass
class FastView:
    """What one decode step of one layer attends to: the first `num_quantized` packed tokens, then the window.

    In a layer's static layout (CUDA-graph decoding, ``base.StaticLayout``), `keys` / `values` are the whole window
    buffers, of which the first `window_len` tokens are live, and the kernels read both counts from `lengths` on the
    device (the host-side ints are exact when the step runs eagerly, stale in a graph replay); `key_mask` is the
    layout's padding mask in a graph step (the model then gets no mask: building one would sync the host)."""

    layer: QuantizedLayer
    num_quantized: int
    keys: torch.Tensor  # [B, Hkv, W, D] full-precision window, this step's token last
    values: torch.Tensor
    window_len: int
    lengths: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None


def _fast_hook(layer: QuantizedLayer, window_k: torch.Tensor, window_v: torch.Tensor, config=None):
    """`QuantizedLayer.fast_path`: placeholders (new tensor objects on the window's memory) carrying the view. Only
    "tq_fused" reads the view: with `config` (the model config the cache was built for) known, any other attention
    implementation is an error rather than attention over the window alone."""
    if config is not None and getattr(config, "_attn_implementation", ATTN_NAME) != ATTN_NAME:
        raise ValueError(
            f"the cache is prepared for the fast path (fast_attention.prepare_cache), but the model's attention "
            f"implementation is {config._attn_implementation!r}, not {ATTN_NAME!r}: call "
            "tq_transformers.fast_attention.install(model) (or enable(model, ..., fast=True)), or use an unprepared cache"
        )
    st = layer.static
    if st is None:
        view = FastView(layer, layer.num_quantized, window_k, window_v, window_k.shape[-2])
    else:  # `window_k` is the window buffer; the new token is in slot keys.shape[-2] (before the host advances)
        view = FastView(layer, layer.num_quantized, window_k, window_v, layer.keys.shape[-2] + 1, st.shared.lengths,
                        st.shared.key_mask if st.shared.graph_step else None)
    key, value = window_k.view_as(window_k), window_v.view_as(window_v)
    key.tq_fast_view = view
    return key, value


def _compress_on_write(layer: QuantizedLayer):
    cls_quantize = type(layer)._quantize_block

    def quantize_block(keys, values):
        if keys.is_cuda and kernels.triton_available() and kernels.compress_supported(layer):
            return kernels.compress_block(layer, keys, values, impl="triton")
        return cls_quantize(layer, keys, values)

    return quantize_block


def prepare_cache(cache, compress: bool = True, cuda_graphs: bool = False):
    """Turn the fast path on for every quantized layer of `cache` (see the module docstring); with `cuda_graphs`, a
    model with ``tq_transformers.cuda_graphs.install`` replays its decode steps from CUDA graphs. Returns the cache."""
    if not isinstance(cache, QuantizedCacheBase):
        raise TypeError(f"cache must be a tq_transformers cache, got {type(cache).__name__}")
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"cuda_graphs must be a bool, got {cuda_graphs!r}")
    cache.cuda_graphs = cuda_graphs

    hook = functools.partial(_fast_hook, config=cache.model_config)

    def setup(layer: QuantizedLayer) -> None:
        layer.fast_path = hook
        if compress:
            layer._quantize_block = _compress_on_write(layer)

    for layer in cache.quantized_layers:
        setup(layer)
    cache.layer_setup = setup  # layers a config-less cache creates later, on their first update
    return cache


def register() -> None:
    """Register "tq_fused" with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTN_NAME, tq_fused_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def install(model) -> str:
    """Register and switch `model` to "tq_fused"; returns the previous attention implementation."""
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    return previous


def uninstall(model, previous: str = "sdpa") -> None:
    model.set_attn_implementation(previous)


def _key_mask(attention_mask: torch.Tensor | None, total: int) -> tuple[bool, torch.Tensor | None]:
    """(usable, key mask `[B, total]` True = attend) from transformers' 4-D decode mask, or None without one."""
    if attention_mask is None:
        return True, None
    if attention_mask.dim() != 4 or attention_mask.shape[-1] != total or attention_mask.shape[-2] != 1:
        return False, None
    key_mask = attention_mask[:, 0, 0, :]  # the mask of a decode step is the same for every head
    if key_mask.dtype != torch.bool:  # additive float mask: 0 where attended
        key_mask = key_mask > torch.finfo(key_mask.dtype).min / 2
    return True, key_mask


def _reference_tensors(view: FastView, dtype: torch.dtype):
    """Exactly the keys and values `QuantizedLayer.update` returns on the reference path for this step. In the static
    layout the counts are read from the device (a sync: inside a CUDA-graph capture this raises rather than bake
    the capture's counts into every replay)."""
    layer = view.layer
    if view.lengths is not None:
        num_quantized, window_len = (int(x) for x in view.lengths[:2].tolist())
        view = dataclasses.replace(view, num_quantized=num_quantized, window_len=window_len)
    if layer.num_quantized == view.num_quantized:
        old_k, old_v = layer._dequantize(dtype)
    else:  # this step flushed: dequantize the storage as it was before the flush, as the reference path did
        held = layer.storage
        layer.storage = layer._storage_prefix(view.num_quantized)
        try:
            old_k, old_v = layer._dequantize(dtype)
        finally:
            layer.storage = held
    w = view.window_len
    keys = torch.cat([old_k, view.keys[:, :, :w].to(dtype)], dim=-2)
    values = torch.cat([old_v, view.values[:, :, :w].to(dtype)], dim=-2)
    return keys, values


def tq_fused_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: fused decode attention on the packed cache, SDPA otherwise.

    query `[B, Hq, q_len, D]`; returns (`[B, q_len, Hq, D]`, None) like ``sdpa_attention_forward``.
    """
    view = getattr(key, "tq_fast_view", None)
    if view is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layer = view.layer
    total = view.num_quantized + view.window_len
    static_mask = view.key_mask is not None
    if static_mask:  # a graph step: the padding mask comes through the layout. The model's own mask was built
        usable, key_mask = True, view.key_mask  # without it (and, capturing, to the capture step's length): unused
    else:
        usable, key_mask = _key_mask(attention_mask, total)
    fused = (
        usable
        and query.is_cuda
        and query.shape[2] == 1
        and (dropout == 0.0 or not module.training)
        and kwargs.get("softcap") is None
        and kwargs.get("sliding_window") is None
        and kernels.triton_available()
        and kernels.decode_supported(layer)
    )
    if not fused:
        keys, values = _reference_tensors(view, query.dtype)
        if static_mask:  # as transformers' SDPA mask: none when nothing is masked (this path may sync)
            used = key_mask[:, : keys.shape[-2]]
            attention_mask = None if bool(used.all()) else used[:, None, None, :]
        return sdpa_attention_forward(module, query, keys, values, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    # static layout: the counts are read on the device and the grid is sized by the capacity
    bound = view.num_quantized if view.lengths is None else layer.static.capacity
    out = kernels.decode_attention(layer, query[:, :, 0], bound, view.keys, view.values, key_mask, scaling,
                                   impl="triton", lengths=view.lengths)  # [B, Hq, D]
    return out.unsqueeze(1), None
