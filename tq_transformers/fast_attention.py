"""The fast decode path: fused attention on the packed cache, chosen once per model.

    tq_transformers.enable(model, "turboquant", bits=4, fast=True)
    model.generate(**inputs)          # decode steps run the Triton kernel on the packed codes

How it fits transformers (same mechanism on 5.17 and 5.24):

1. ``install(model)`` registers the attention function ``tq_fused_attention`` under the name ``"tq_fused"`` in
   ``transformers.AttentionInterface`` (with SDPA's mask function in ``AttentionMaskInterface``, so the masks are
   exactly those the ``"sdpa"`` implementation gets) and switches the model to it with
   ``model.set_attn_implementation("tq_fused")``.
2. ``prepare_cache(cache)`` sets the ``fast_path`` hook of every quantized layer (``QuantizedKVLayer.update``) and
   its ``use_kernels`` flag (compress-on-write through the Triton kernels on CUDA). On a single-token decode step
   with packed tokens, the layer skips dequantizing its history and returns the window tensors tagged with a
   ``FastView``: the layer, how many packed tokens this step attends to (those held before this step's flush, exactly
   what the reference path attends to) and the window. Storing and flushing are unchanged.
3. ``tq_fused_attention`` finds the ``FastView`` on the key tensor it is handed (so it always pairs the right layer
   with the right module, whatever ``module.layer_idx``), asks the layer for the packed tokens the step attends to
   (``layer.packed(n)``, ``formats`` views), and
   - on CUDA, when ``kernels.decode_supported`` covers the views: runs the fused decode kernel;
   - otherwise (CPU, an unsupported configuration): rebuilds exactly the tensors the reference path would have
     returned (``layer.dequantize``) and calls transformers' SDPA attention: identical output;
   - without a view (prefill, layers that are not quantized, any other cache): plain SDPA, as ``"sdpa"`` does.
4. A fixed-capacity cache (``max_cache_len``, ``tq_transformers.compile``) tags its decode steps with a ``FixedView``
   instead: attention then runs ``compile.fixed_attention`` (the kernel's custom operator, device-side counts), the
   step ``torch.compile`` traces.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import cpu_attention, kernels
from .cache import QuantizedKVCache, mla_latent_dims
from .compile import FixedView, fixed_attention
from .layer import QuantizedKVLayer
from .static_layout import sinks_after_packed, sinks_before_packed
from .validation import check_bool

ATTN_NAME = "tq_fused"

__all__ = ["ATTN_NAME", "FastView", "attn_implementation_of", "fallback_reason", "install", "prepare_cache", "register",
           "tq_fused_attention", "uninstall"]


def attn_implementation_of(config) -> str | None:
    """The attention implementation a model config is set to. transformers has no public getter: the documented
    way is the ``_attn_implementation`` property of the config, read here and nowhere else in the library."""
    return getattr(config, "_attn_implementation", None)


@dataclasses.dataclass
class FastView:
    """What one decode step of one layer attends to: the first `num_quantized` packed tokens, then the window.

    In a layer's static layout (``static_layout``), `keys` / `values` are the whole window buffers, whose first slots
    hold the layer's exact sink tokens and the next `window_len` the live window, and the kernels read both counts
    from `lengths` on the device (the host-side ints are exact when the step runs eagerly, stale in a graph replay);
    `key_mask` is the layout's padding mask in a graph step, in kernel order (the model then gets no mask: building
    one would sync the host)."""

    layer: QuantizedKVLayer
    num_quantized: int
    keys: torch.Tensor  # [B, Hkv, W, Dk] full-precision window, this step's token last
    values: torch.Tensor  # [B, Hkv, W, Dv] (Dv may differ from Dk: MLA-style heads, e.g. 192 / 128)
    window_len: int
    lengths: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None

    def packed(self):
        """The packed key and value views this step attends to (capacity-sized buffers in the static layout)."""
        st = self.layer.static
        return self.layer.packed(self.num_quantized if self.lengths is None else st.capacity)


def _fast_hook(layer: QuantizedKVLayer, window_k: torch.Tensor, window_v: torch.Tensor, config=None):
    """`QuantizedKVLayer.fast_path`: placeholders (new tensor objects on the window's memory) carrying the view. Only
    "tq_fused" reads the view: with `config` (the model config the cache was built for) known, any other attention
    implementation is an error rather than attention over the window alone."""
    impl = attn_implementation_of(config) if config is not None else ATTN_NAME
    if impl not in (ATTN_NAME, None):
        raise ValueError(
            f"the cache is prepared for the fast path (fast_attention.prepare_cache), but the model's attention "
            f"implementation is {impl!r}, not {ATTN_NAME!r}: call tq_transformers.fast_attention.install(model) (or "
            "enable(model, ..., fast=True)), or use an unprepared cache"
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


def prepare_cache(cache, compress: bool = True, cuda_graphs: bool = False):
    """Turn the fast path on for every quantized layer of `cache` (module docstring).

    Args:
        cache: a tq_transformers cache.
        compress: also encode with the Triton compress kernels on CUDA.
        cuda_graphs: let a model with ``tq_transformers.cuda_graphs.install`` replay its decode steps from graphs.
    Returns:
        the cache.
    """
    if not isinstance(cache, QuantizedKVCache):
        raise TypeError(f"cache must be a tq_transformers cache, got {type(cache).__name__}")
    check_bool("compress", compress)
    check_bool("cuda_graphs", cuda_graphs)
    if cache.model_config is not None and mla_latent_dims(cache.model_config) is not None:
        # the model expands the cached latents (kv_b_proj) before attention: window placeholders would be expanded
        # as if they were all the tokens, so the fast path stays off (the reference path is exact)
        warnings.warn(
            f"fast path off for {type(cache).__name__}: the model caches MLA latents (kv_lora_rank, qk_rope_head_dim = "
            f"{mla_latent_dims(cache.model_config)}) that its attention expands after the cache, which the fused "
            "kernel cannot read; decoding uses the reference path",
            UserWarning,
            stacklevel=2,
        )
        return cache
    cache.cuda_graphs = cuda_graphs
    hook = functools.partial(_fast_hook, config=cache.model_config)

    def setup(layer: QuantizedKVLayer) -> None:
        layer.fast_path = hook
        layer.use_kernels = compress

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
    previous = attn_implementation_of(model.config)
    model.set_attn_implementation(ATTN_NAME)
    return previous


def uninstall(model, previous: str = "sdpa") -> None:
    """Switch `model` back to `previous` (what ``install`` returned)."""
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
    """Exactly the keys ``[B, Hkv, T, Dk]`` and values ``[B, Hkv, T, Dv]`` that ``QuantizedKVLayer.update`` returns on
    the reference path for this step (cache order: sinks, packed, window), and the packed tokens attended. In the
    static layout the counts are read from the device (a sync: inside a CUDA-graph capture this raises rather than
    bake the capture's counts into every replay), and the window buffers' first slots, the sinks, come with
    ``dequantize`` instead."""
    n, first, w = view.num_quantized, 0, view.window_len
    if view.lengths is not None:
        n, w = (int(x) for x in view.lengths[:2].tolist())
        first = view.layer.num_sinks
    old_k, old_v = view.layer.dequantize(dtype, n)
    keys = torch.cat([old_k, view.keys[:, :, first:w].to(dtype)], dim=-2)
    values = torch.cat([old_v, view.values[:, :, first:w].to(dtype)], dim=-2)
    return keys, values, n


def _sinks_into_window(view: FastView, key_mask: torch.Tensor | None, dtype: torch.dtype):
    """(window_k ``[B, Hkv, S + W, Dk]``, window_v ``[B, Hkv, S + W, Dv]``, key_mask) with the layer's exact sink
    tokens attended as part of the window (each side at its own head dim): the kernels
    read packed tokens then one full-precision run, and softmax attention does not depend on the order of the keys,
    so the sinks go first in that run and the mask's columns follow them::

        cache order   [sinks S | packed n | window W]     mask columns 0..S-1, S..S+n-1, S+n..
        kernel order  [packed n | sinks S, window W]      mask[:, S:S+n], then mask[:, :S], mask[:, S+n:]
    """
    layer = view.layer
    window_k = torch.cat([layer.sink_keys.to(dtype), view.keys.to(dtype)], dim=-2)
    window_v = torch.cat([layer.sink_values.to(dtype), view.values.to(dtype)], dim=-2)
    if key_mask is not None:
        key_mask = sinks_after_packed(key_mask, layer.num_sinks, view.num_quantized)
    return window_k, window_v, key_mask


_WARNED: set[str] = set()


def _on_kernel_device(query: torch.Tensor) -> bool:
    """Whether the GPU decode kernels can run on `query`'s device (CUDA with Triton)."""
    return query.is_cuda and kernels.triton_available()


def fallback_reason(layer: QuantizedKVLayer, packed_k, packed_v, dtype: torch.dtype) -> str | None:
    """Why the fused decode kernel does not read `layer`'s packed tokens (the formats it reports, ``layer.packed``),
    in words naming the combination, or None when ``kernels.decode_supported`` covers them."""
    if packed_k is not None and packed_v is not None and kernels.decode_supported(packed_k, packed_v, dtype):
        return None
    return f"layer {layer.layer_idx}: {layer.describe_formats()}, model dtype {dtype}"


def _warn_fallback(layer: QuantizedKVLayer, packed_k, packed_v, dtype: torch.dtype) -> None:
    """A warning, once per combination, that a decode step on CUDA runs the reference path instead of the kernel."""
    reason = fallback_reason(layer, packed_k, packed_v, dtype)
    if reason is None:
        return
    combination = reason.split(": ", 1)[1]
    if combination not in _WARNED:
        _WARNED.add(combination)
        warnings.warn(f"tq_fused: the GPU decode kernels do not cover {reason}; this combination decodes on the "
                      "reference path (dequantize + SDPA: exact, slower)", UserWarning, stacklevel=3)


def tq_fused_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: fused decode attention on the packed cache, SDPA otherwise.

    Args:
        module: the attention module (its ``training`` flag).
        query: ``[B, Hq, q_len, Dk]``; key ``[B, Hkv, T, Dk]`` / value ``[B, Hkv, T, Dv]``: what the cache returned
            (on a fast decode step the window, tagged with a ``FastView`` / ``FixedView``). Keys and values may have
            different head dims (MLA-style heads that the model expands before the cache, e.g. 192 / 128).
        attention_mask: transformers' 4-D mask or None; dropout, scaling: as for SDPA (scaling None: Dk ** -0.5).
    Returns:
        (``[B, q_len, Hq, Dv]``, None), like ``sdpa_attention_forward``.
    """
    view = getattr(key, "tq_fast_view", None)
    if view is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if isinstance(view, FixedView):  # a fixed-capacity cache's decode step (tq_transformers.compile)
        return fixed_attention(query, view, attention_mask, scaling, **kwargs)
    sinks = view.layer.num_sinks  # exact tokens before the packed ones
    total = sinks + view.num_quantized + view.window_len
    static_mask = view.key_mask is not None
    if static_mask:  # a graph step: the padding mask comes through the layout. The model's own mask was built
        usable, key_mask = True, view.key_mask  # without it (and, capturing, to the capture step's length): unused
    else:
        usable, key_mask = _key_mask(attention_mask, total)
    packed_k, packed_v = view.packed()
    window_k, window_v = view.keys, view.values
    if sinks and usable:
        if view.lengths is None:  # the sinks join the window run here
            window_k, window_v, key_mask = _sinks_into_window(view, key_mask, query.dtype)
        elif not static_mask and key_mask is not None:  # static layout: its window buffers begin with the sinks
            key_mask = sinks_after_packed(key_mask, sinks, view.num_quantized)
    plain = (  # what every fused path needs: one plain softmax decode step over packed views
        usable
        and query.shape[2] == 1
        and (dropout == 0.0 or not module.training)
        and kwargs.get("softcap") is None
        and kwargs.get("sliding_window") is None
        and packed_k is not None
        and packed_v is not None
    )
    fused = plain and _on_kernel_device(query) and kernels.decode_supported(packed_k, packed_v, query.dtype)
    on_cpu = (plain and query.device.type == "cpu" and view.lengths is None
              and cpu_attention.supported(packed_k, packed_v))
    score_scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if on_cpu:
        out = cpu_attention.decode_attention(q=query[:, :, 0], keys=packed_k, values=packed_v, window_k=window_k,
                                             window_v=window_v, key_mask=key_mask, scaling=score_scale)
        return out.unsqueeze(1), None
    if not fused:
        if _on_kernel_device(query):
            _warn_fallback(view.layer, packed_k, packed_v, query.dtype)
        keys, values, n = _reference_tensors(view, query.dtype)
        if static_mask:  # as transformers' SDPA mask: none when nothing is masked (this path may sync)
            used = sinks_before_packed(key_mask[:, : keys.shape[-2]], sinks, n)
            attention_mask = None if bool(used.all()) else used[:, None, None, :]
        return sdpa_attention_forward(module, query, keys, values, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = kernels.decode_attention(q=query[:, :, 0], keys=packed_k, values=packed_v, window_k=window_k,
                                   window_v=window_v, key_mask=key_mask, scaling=score_scale,
                                   lengths=view.lengths)  # [B, Hq, Dv]
    return out.unsqueeze(1), None
