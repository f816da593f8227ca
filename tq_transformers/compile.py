"""torch.compile with the quantized caches: a fixed-capacity layer whose decode step has static shapes.

    cache = TurboQuantCache(model.config, bits=4, max_cache_len=32768 + 256)
    fast_attention.install(model)                      # or enable(model, "turboquant", fast=True, ...)
    model.generate(**inputs, past_key_values=cache)    # transformers compiles the decode step itself

A cache built with ``max_cache_len`` (``QuantizedKVCache``) makes each full-attention layer a
``FixedCapacityLayer``. Its first update (the prefill, eager) runs the ordinary layer, then moves the packed storage
and the window into buffers preallocated for ``max_cache_len`` tokens (``FixedBuffers``), and the layer declares
``is_compileable = True``, so ``generate`` takes transformers' own auto-compile path (``get_compiled_call``) with no
other user code, exactly as with a ``StaticCache``.

A single-token step then touches only device tensors, with shapes fixed by the capacity (no Python int of the layer
changes, so a compiled step never recompiles):

1. flush due? The counts live on the device: tokens held ``length`` (L) and packed tokens ``packed`` (P). A flush is
   due when the window is full (``L - P == R + F``: the previous step filled it). Whether or not it is due, the first
   F window tokens are encoded (static shape ``[B, H, F, D]``; the method's own codec, i.e. the Triton compress
   kernels through their custom operators on CUDA) and written at packed offset P: past the packed tokens attended,
   so when no flush is due they are overwritten by the real flush later. Only when due does the window move down
   by F (``torch.where``) and P grow by F. The centering mean is prepared, as on the ordinary path, from the full
   window at the first flush (``where`` again). This is the ordinary layer's flush at the end of the step before,
   moved to the start of this one: attention never sees the difference.
2. the new token is written at window slot ``L - P`` (``index_copy_`` at a device index), and the step's counts
   ``lengths = [P, L - P + 1, L - P]`` go, with the window buffers, to "tq_fused" attention (``FixedView``), which
   calls the decode kernel through its custom operator (``kernels.ops``) over the capacity buffers;
3. L grows by one.

The attention mask is the one transformers builds for a compileable cache: over ``max_cache_len`` absolute positions
(``get_mask_sizes``); packed token i is position i and window token j position P + j, which is how the kernels read
a mask with ``lengths``.

Host-side counters (``cumulative_length``, ``num_quantized``, ``storage``, ``keys``) go stale during compiled steps;
every eager operation (a prefill or continuation, crop, reorders, saving, copies) first brings them back from the
device (``sync_host``: one sync, and the flush that was due, if any) and afterwards moves the result into the same
buffers again (their addresses stay, so the compiled graph and its CUDA graphs stay valid).
``get_seq_length`` returns the device count (a tensor, as ``StaticLayer`` does).

Not covered: exact sink tokens (``sink_tokens > 0``), formats without a kernel view (TurboQuant's QJL and fractional
rates) and, on CUDA, views the GPU kernels do not cover (each raises a ValueError at the prefill); the non-finite
watch (``codec.NonFiniteWatch``) does not run inside a compiled step; a fork of a fixed-capacity cache copies its
buffers (nothing is shared). Going past ``max_cache_len`` cannot be detected inside a compiled step (as with
``StaticCache``): the packed writes are clamped to the buffers, so the output is wrong but memory is not corrupted;
eager operations raise a ValueError.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from .kernels import ops
from .layer import QuantizedKVLayer
from .validation import check_int
from .window import SIDES

__all__ = ["FixedBuffers", "FixedCapacityLayer", "FixedView", "fixed_attention"]


@dataclasses.dataclass
class FixedBuffers:
    """The preallocated state of one ``FixedCapacityLayer`` (module docstring).

    capacity: packed tokens the growing buffers hold (``cfg.num_quantized(max_cache_len)`` plus one flush, so the
        speculative write of step 1 always fits).
    length, packed: int64 ``[]`` device counts L (tokens held) and P (packed tokens written).
    prepared: bool ``[]``: the static pieces (the centering means) hold their values.
    win_k, win_v: ``[B, H, R + F, D]`` window buffers, model dtype.
    growing: prefixed piece name -> buffer with ``capacity`` packed tokens on dim 2.
    static: prefixed piece name -> buffer of a piece that does not grow (the means).
    per_flush: prefixed piece name -> entries on dim 2 that F packed tokens take.
    prepare_pending: host-side: the means may still be due (not prepared when the layer last synced). While False a
        compiled step skips preparing them; it turns False at most once (one recompile, at an eager operation).
    """

    capacity: int
    length: torch.Tensor
    packed: torch.Tensor
    prepared: torch.Tensor
    win_k: torch.Tensor
    win_v: torch.Tensor
    growing: dict[str, torch.Tensor]
    static: dict[str, torch.Tensor]
    per_flush: dict[str, int]
    prepare_pending: bool = True

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer (for ``torch._dynamo.mark_static_address`` and the memory count)."""
        return [self.length, self.packed, self.prepared, self.win_k, self.win_v, *self.growing.values(),
                *self.static.values()]


@dataclasses.dataclass
class FixedView:
    """What "tq_fused" attention reads for one fixed-capacity decode step: the layer and the step's device counts
    ``lengths`` int64 ``[3]`` = [packed tokens attended, window tokens attended, the new token's slot]."""

    layer: FixedCapacityLayer
    lengths: torch.Tensor


class FixedCapacityLayer(QuantizedKVLayer):
    """A ``QuantizedKVLayer`` with storage preallocated for `max_cache_len` tokens and a static-shape decode step
    (module docstring).

    Args:
        config: the method's config (``sink_tokens`` must be 0).
        layer_idx: the decoder layer's index.
        max_cache_len: the most tokens the layer will hold (prompt and generated), at least 1.
        model_config: the model's config: its attention implementation must be "tq_fused" when decoding starts.
    """

    is_compileable = True
    transient_attributes = (*QuantizedKVLayer.transient_attributes, "fixed", "model_config")

    def __init__(self, config, layer_idx: int = 0, max_cache_len: int = 0, model_config=None):
        super().__init__(config, layer_idx)
        check_int("max_cache_len", max_cache_len, 1)
        if config.sink_tokens:
            raise ValueError(f"max_cache_len (a fixed-capacity cache) does not hold exact sink tokens; use "
                             f"sink_tokens=0, got sink_tokens={config.sink_tokens}")
        self.max_cache_len = max_cache_len
        self.model_config = model_config
        self.fixed: FixedBuffers | None = None
        self.use_kernels = True

    #: the dynamic fast path's hook is never used: the decode step is this layer's own (and the CUDA-graph runner,
    #: which needs the hook, leaves a fixed-capacity cache to torch.compile). Setting it is accepted and ignored.
    fast_path = property(lambda self: None, lambda self, value: None)

    # ------------------------------------------------------------------------------------------------------------
    # The decode step (traced by torch.compile)
    # ------------------------------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """A single-token step once the buffers exist: ``decode_step``; anything else runs the ordinary layer
        (eagerly, host counters synced first) and then moves its state into the buffers.

        Returns:
            (keys, values): ``[B, H, R + F, D]`` window buffers tagged for "tq_fused" attention on a decode step;
            the ordinary layer's ``[B, H, n + T, D]`` otherwise.
        """
        self._check_attention()
        if self.fixed is not None and self.is_initialized and key_states.shape[-2] == 1:
            self._check_states(key_states, value_states)
            return self.decode_step(key_states, value_states)
        self.sync_host()
        out = super().update(key_states, value_states, *args, **kwargs)
        self.enter_fixed()
        return out

    def decode_step(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """One token ``[B, H, 1, D]`` on the device counts only (module docstring, steps 1-3)."""
        fx = self.fixed
        self._flush_if_due(fx)
        n, slot = fx.packed, fx.length - fx.packed
        fx.win_k.index_copy_(2, slot.reshape(1), key_states.to(fx.win_k.dtype))
        fx.win_v.index_copy_(2, slot.reshape(1), value_states.to(fx.win_v.dtype))
        lengths = torch.stack([n, slot + 1, slot])
        fx.length.add_(1)
        key, value = fx.win_k.view_as(fx.win_k), fx.win_v.view_as(fx.win_v)
        key.tq_fast_view = FixedView(self, lengths)
        return key, value

    def _flush_if_due(self, fx: FixedBuffers) -> None:
        R, F = self.cfg.residual_length, self.cfg.flush_size
        due = (fx.length - fx.packed) == R + F
        if fx.prepare_pending:  # the means, from the full window at the first flush (as the ordinary path)
            first = due & ~fx.prepared
            for side, window in (("k", fx.win_k), ("v", fx.win_v)):
                for name, t in self.codecs[side].prepare(window).items():
                    buf = fx.static[f"{side}_{name}"]
                    buf.copy_(torch.where(first, t.to(buf.dtype), buf))
            fx.prepared.logical_or_(due)
        flushes = torch.clamp(fx.packed // F, max=fx.capacity // F - 1)  # clamped: never written past the buffers
        for side, window in (("k", fx.win_k), ("v", fx.win_v)):
            block = self.codecs[side].encode(window[:, :, :F], self.pieces(side, fx.static),
                                             use_kernels=self.use_kernels)
            for name, t in block.items():
                buf = fx.growing[f"{side}_{name}"]
                per = fx.per_flush[f"{side}_{name}"]
                buf.index_copy_(2, flushes * per + torch.arange(per, device=buf.device), t.to(buf.dtype))
        if R:
            for buf in (fx.win_k, fx.win_v):
                buf[:, :, :R].copy_(torch.where(due, buf[:, :, F : F + R], buf[:, :, :R]))
        fx.packed.add_(due.to(fx.packed.dtype) * F)

    def packed_buffers(self):
        """Format views (``formats``) of the whole capacity buffers: what the decode kernels read with ``lengths``."""
        pieces = {**self.fixed.growing, **self.fixed.static}
        return tuple(self.codecs[side].packed(self.pieces(side, pieces)) for side in SIDES)

    # ------------------------------------------------------------------------------------------------------------
    # Host side (eager)
    # ------------------------------------------------------------------------------------------------------------
    def sync_host(self) -> None:
        """Bring the host-side counters, ``storage`` and window views back from the device counts (one sync), and
        run the flush that is due (the device runs it at the start of the next step). No-op before the buffers."""
        fx = self.fixed
        if fx is None or not self.is_initialized:
            return
        length, packed, prepared = (int(x) for x in torch.stack([fx.length, fx.packed, fx.prepared.long()]).tolist())
        self._host_views(length, packed, bool(prepared))
        if length - packed == self.cfg.residual_length + self.cfg.flush_size:
            self._flush()
            self.enter_fixed()

    def _host_views(self, length: int, packed: int, prepared: bool) -> None:
        fx, F = self.fixed, self.cfg.flush_size
        storage = {name: buf[:, :, : packed // F * fx.per_flush[name]] for name, buf in fx.growing.items()}
        if prepared:
            storage.update(fx.static)
        self.storage, self.shared = storage, []
        self.cumulative_length, self.num_quantized = length, packed
        self.keys, self.values = fx.win_k[:, :, : length - packed], fx.win_v[:, :, : length - packed]
        fx.prepare_pending = not prepared

    def _check_attention(self) -> None:
        """A ValueError unless the model decodes through "tq_fused" (plain SDPA would attend to the window alone)."""
        from .fast_attention import ATTN_NAME, attn_implementation_of

        impl = attn_implementation_of(self.model_config) if self.model_config is not None else ATTN_NAME
        if impl != ATTN_NAME:
            raise ValueError(f"a fixed-capacity cache (max_cache_len) decodes through {ATTN_NAME!r} attention, but "
                             f"the model's attention implementation is {impl!r}: call "
                             "tq_transformers.fast_attention.install(model) (or enable(model, ..., fast=True))")

    def _check_ready(self) -> None:
        """ValueErrors, when the buffers are entered, for formats the fixed-capacity decode step cannot run."""
        from . import kernels

        views = self.packed_buffers()
        described = ", ".join(f"{name} {type(v).__name__}" for name, v in zip(("keys", "values"), views, strict=True))
        if not all(type(v) in ops.FORMAT_KINDS.values() for v in views):
            raise ValueError(f"layer {self.layer_idx}: a fixed-capacity cache (max_cache_len) needs packed formats "
                             f"the decode kernels read ({sorted(c.__name__ for c in ops.FORMAT_KINDS.values())}); "
                             f"this layer holds {described}")
        if self.keys.is_cuda and not (kernels.triton_available()
                                      and kernels.decode_supported(*views, self.keys.dtype)):
            raise ValueError(f"layer {self.layer_idx}: the GPU decode kernels do not cover {described} (bits "
                             f"{[getattr(v, 'bits', None) for v in views]}, model dtype {self.keys.dtype}), which a "
                             "fixed-capacity cache needs on CUDA")
        kernels.keep_decode_constants(*views, self.keys.dtype)  # outside any graph: the operator keeps nothing

    def _allocate(self) -> FixedBuffers:
        R, F = self.cfg.residual_length, self.cfg.flush_size
        capacity = self.cfg.num_quantized(self.max_cache_len) + F
        window = self.keys.new_zeros((*self.keys.shape[:2], R + F, self.keys.shape[-1]))
        window_v = self.values.new_zeros((*self.values.shape[:2], R + F, self.values.shape[-1]))
        growing, static, per_flush = {}, {}, {}
        for side, x in (("k", window), ("v", window_v)):  # the pieces' shapes, from one flush of zeros
            prepared = self.codecs[side].prepare(x)
            static.update({f"{side}_{name}": torch.zeros_like(t) for name, t in prepared.items()})
            block = self.codecs[side].encode(x[:, :, :F], prepared, use_kernels=self.use_kernels)
            for name, t in block.items():
                per_flush[f"{side}_{name}"] = t.shape[2]
                growing[f"{side}_{name}"] = t.new_zeros((*t.shape[:2], t.shape[2] * capacity // F, *t.shape[3:]))
        device = self.keys.device
        fx = FixedBuffers(capacity, torch.zeros((), dtype=torch.int64, device=device),
                          torch.zeros((), dtype=torch.int64, device=device),
                          torch.zeros((), dtype=torch.bool, device=device), window, window_v, growing, static,
                          per_flush)
        self._mark_static(fx)
        return fx

    def _mark_static(self, fx: FixedBuffers) -> None:
        """Fixed addresses for CUDA graphs (mode "reduce-overhead"): the buffers, written in place, and the codecs'
        tensors (rotations, codebooks), which the step reads; a graph input not marked is copied at every replay."""
        if torch.compiler.is_compiling():
            return
        codec_tensors = [t for codec in self.codecs.values() for value in vars(codec).values()
                         for t in (value if isinstance(value, (tuple, list)) else (value,))
                         if isinstance(t, torch.Tensor)]
        for t in (*fx.tensors(), *codec_tensors):
            torch._dynamo.mark_static_address(t)

    def _fits(self, fx: FixedBuffers | None) -> bool:
        return (fx is not None and fx.win_k.shape[:2] == self.keys.shape[:2] and fx.win_k.device == self.keys.device
                and fx.win_k.dtype == self.keys.dtype)

    def enter_fixed(self) -> None:
        """Move the layer's state (after an eager operation) into the buffers, allocated at the first call or when
        the batch changed; the host views then point into them."""
        if not self.is_initialized or self.keys is None:
            return
        if self.cumulative_length > self.max_cache_len:
            raise ValueError(f"layer {self.layer_idx}: the cache holds {self.cumulative_length} tokens, more than "
                             f"its max_cache_len={self.max_cache_len}; build the cache with a larger max_cache_len")
        if not self._fits(self.fixed):
            self.fixed = None  # the old buffers are freed before the new ones are allocated
            self.fixed = self._allocate()
        self._check_ready()
        fx = self.fixed
        self.consolidate()
        for name, t in self.storage.items():
            if name in fx.growing:
                fx.growing[name][:, :, : t.shape[2]].copy_(t)
            else:
                fx.static[name].copy_(t)
        w = self.keys.shape[-2]
        fx.win_k[:, :, :w].copy_(self.keys)
        fx.win_v[:, :, :w].copy_(self.values)
        prepared = any(name in fx.static for name in self.storage)
        fx.length.fill_(self.cumulative_length)
        fx.packed.fill_(self.num_quantized)
        fx.prepared.fill_(prepared)
        self._host_views(self.cumulative_length, self.num_quantized, prepared)

    # ------------------------------------------------------------------------------------------------------------
    # transformers layer API and the eager operations: synced first, back in the buffers after
    # ------------------------------------------------------------------------------------------------------------
    def get_seq_length(self):
        """Tokens held: the device count (an int64 ``[]`` tensor, as ``StaticLayer``) once the buffers exist."""
        return self.fixed.length if self.fixed is not None and self.is_initialized else self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): ``max_cache_len`` absolute positions for a decode step on the buffers (a fixed
        shape), the ordinary layer's otherwise."""
        if query_length == 1 and self.fixed is not None and self.is_initialized:
            return self.max_cache_len, 0
        self.sync_host()
        return super().get_mask_sizes(query_length)

    def get_max_length(self) -> int:
        return self.max_cache_len

    def _eager(self, operation, *args) -> None:
        self.sync_host()
        operation(*args)
        self.enter_fixed()

    def crop(self, tokens_to_remove: int) -> None:
        self._eager(super().crop, tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._eager(super().reorder_cache, beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._eager(super().batch_repeat_interleave, repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._eager(super().batch_select_indices, indices)

    def reset(self) -> None:
        super().reset()
        if self.fixed is not None:  # the buffers stay (their addresses are the compiled graph's)
            for t in (self.fixed.length, self.fixed.packed, self.fixed.prepared):
                t.zero_()

    def memory_footprint(self) -> dict[str, int]:
        """Bytes held: the whole preallocated buffers once they exist.

        Returns:
            {"codes": int, "metadata": int, "window": int}
        """
        fx = self.fixed
        if fx is None:
            return super().memory_footprint()
        codes = self.code_storage
        out = {"codes": 0, "metadata": 0, "window": 0}
        for name, t in {**fx.growing, **fx.static}.items():
            out["codes" if name in codes else "metadata"] += t.numel() * t.element_size()
        out["window"] = sum(t.numel() * t.element_size() for t in (fx.win_k, fx.win_v))
        return out

    def state(self) -> dict:
        """``QuantizedKVLayer.state`` of the synced host side, every tensor its own (not a view of the buffers)."""
        self.sync_host()
        state = super().state()
        compact = {k: v.clone(memory_format=torch.contiguous_format) for k, v in state["storage"].items()}
        return {**state, "storage": compact,
                **{k: state[k].clone(memory_format=torch.contiguous_format) for k in ("keys", "values")
                   if isinstance(state.get(k), torch.Tensor)}}

    def freeze(self) -> None:
        """Nothing is shared: the buffers are written in place."""

    def fork(self) -> FixedCapacityLayer:
        """A copy with buffers of its own (``copy.deepcopy``)."""
        return copy.deepcopy(self)

    def __deepcopy__(self, memo):
        new = super().__deepcopy__(memo)
        if new.fixed is not None:
            new._mark_static(new.fixed)
        new.sync_host()
        return new


def fixed_attention(query: torch.Tensor, view: FixedView, attention_mask, scaling: float | None, **kwargs):
    """"tq_fused" attention of a fixed-capacity decode step: the decode kernel's custom operator over the capacity
    buffers with the device counts.

    Args:
        query: ``[B, Hq, 1, D]``.
        view: the step's ``FixedView``.
        attention_mask: transformers' 4-D decode mask over ``max_cache_len`` positions (bool, or additive float), or
            None.
        scaling: the score scale (None: D ** -0.5).
    Returns:
        (``[B, 1, Hq, Dv]``, None).
    """
    if query.shape[2] != 1 or kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise ValueError(f"a fixed-capacity cache decodes one token of plain softmax attention at a time; got "
                         f"query {tuple(query.shape)}, softcap={kwargs.get('softcap')}, sliding_window="
                         f"{kwargs.get('sliding_window')}")
    key_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 4 or attention_mask.shape[-2] != 1:
            raise ValueError(f"attention_mask must be a [B, 1, 1, max_cache_len] decode mask, got "
                             f"{tuple(attention_mask.shape)}")
        key_mask = attention_mask[:, 0, 0, :]
        if key_mask.dtype != torch.bool:  # additive float mask: 0 where attended
            key_mask = key_mask > torch.finfo(key_mask.dtype).min / 2
    layer = view.layer
    keys, values = layer.packed_buffers()
    out = ops.decode_attention(q=query[:, :, 0], keys=keys, values=values, window_k=layer.fixed.win_k,
                               window_v=layer.fixed.win_v, key_mask=key_mask,
                               scaling=scaling if scaling is not None else query.shape[-1] ** -0.5,
                               lengths=view.lengths)
    return out.unsqueeze(1), None
