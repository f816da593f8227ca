"""`QuantizedKVLayer`: one decoder layer's quantized keys and values (the window, the flush rule, the reference path).

For keys and values of shape ``[batch, kv_heads, seq, head_dim]`` a layer holds:

- a full-precision window of the most recent tokens, ``self.keys`` / ``self.values`` ``[B, H, w, D]`` in the
  model's dtype (the attributes a transformers ``DynamicLayer`` uses);
- the older tokens in packed form, ``self.storage``: the pieces of the key codec prefixed ``k_`` and of the value
  codec prefixed ``v_`` (``tq_transformers.codec``), batch on dim 0, tokens (or token groups) on dim 2.
- after a fork (``fork``, ``copy.deepcopy``), the packed history the forks have in common, ``self.shared``: frozen
  segments of storage (oldest first) that every fork reads and none writes (copy-on-write). The packed tokens are then
  the segments followed by ``self.storage`` (the layer's own, appended by its flushes), joined on dim 2
  (``full_storage``). Operations that need one tensor per piece (the fast path's kernels, the static layout, crop,
  batch reorders) first join them into the layer's own storage (``consolidate``).

Nothing writes in place into a tensor of ``storage`` or ``shared`` (a flush writes new tensors); the static layout
writes in place only into buffers it allocated itself (``static_layout``). That is what makes sharing safe.

The window rule (``window.WindowConfig``; docs/METHODS.md, "The window rule"): after ``n`` tokens exactly
``q(n)`` are packed, a function of n alone, so ``estimate_cache_bytes`` counts it to the byte. ``update`` returns the
dequantized packed tokens followed by the window with the new tokens: a prefill attends to its own exact keys, and
every token is exact in the step it arrives.

Departures are the method's (each method module says which). Two optional paths plug in from outside through public
attributes: ``fast_path`` (set by ``fast_attention.prepare_cache``: a decode step returns window placeholders and the
fused kernel reads the packed tokens, ``packed(n)``) and ``static`` (``static_layout``: preallocated buffers for
CUDA-graph replays, entered with ``enter_static``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from transformers.cache_utils import CacheLayerMixin

from .codec import Codec, NonFiniteWatch
from .constants import FLUSH_CHUNK_VALUES
from .formats import PackedFormat
from .static_layout import StaticLayout, StaticShared
from .window import SIDES

__all__ = ["QuantizedKVLayer", "compact", "owns_exactly"]


def compact(t: torch.Tensor) -> torch.Tensor:
    """`t` as a contiguous tensor that owns exactly its own bytes. A slice of a window or of the storage is a view
    that keeps the whole original alive (even an empty slice: ``.contiguous()`` returns such views unchanged), so
    held memory would silently stay at the size before a flush or a crop; this copies those views."""
    if t.is_contiguous() and owns_exactly(t):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _owned_copy(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def owns_exactly(t: torch.Tensor) -> bool:
    """Whether `t` spans its whole storage and nothing more (it keeps no larger tensor alive)."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


class QuantizedKVLayer(CacheLayerMixin):
    """One decoder layer of a quantized cache: the window and the packed history of keys and values.

    Args:
        config: the method's config (``methods``); ``config.make_codecs(key_dim, value_dim, layer_idx, device)``
            gives the key and value codecs at the first update, for the head dims the states really have.
        layer_idx: the decoder layer's index (it seeds the layer's rotations).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True
    supports_early_init = True
    #: attributes that are not saved (``persistence``; ``state``): the config (saved with the cache), what
    #: ``lazy_initialization`` rebuilds from it and the states' dtype and device, the run-time hooks (fast path, static
    #: layout, kernels), the non-finite watch, and the shared segments (saved joined into ``storage``)
    transient_attributes = ("cfg", "codecs", "dtype", "device", "static", "fast_path", "use_kernels", "non_finite",
                            "shared")

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.cfg = config
        self.layer_idx = layer_idx
        self.cumulative_length = 0
        self.num_quantized = 0
        self.storage: dict[str, torch.Tensor] = {}
        #: frozen storage segments shared with forks (module docstring), oldest first; never written
        self.shared: list[dict[str, torch.Tensor]] = []
        self.codecs: dict[str, Codec] = {}
        #: the first ``cfg.sink_tokens`` tokens, exact (attention sinks): ``[B, H, s, D]``, or None before any (in
        #: the static layout, views of the window buffers' first slots)
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        #: the CUDA-graph static layout while in it (``static_layout``), else None
        self.static: StaticLayout | None = None
        #: set by ``fast_attention.prepare_cache``: callable(layer, window_k, window_v) -> placeholder tensors
        self.fast_path: Callable | None = None
        #: encode with the Triton compress kernels on CUDA (set by ``fast_attention.prepare_cache``)
        self.use_kernels = False
        self.non_finite = NonFiniteWatch()

    # ------------------------------------------------------------------------------------------------------------
    # Packed tokens
    # ------------------------------------------------------------------------------------------------------------
    def pieces(self, side: str, storage: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The pieces of one side (``"k"`` or ``"v"``) without their prefix."""
        prefix = f"{side}_"
        storage = self.storage if storage is None else storage
        return {name[2:]: t for name, t in storage.items() if name.startswith(prefix)}

    def full_storage(self) -> dict[str, torch.Tensor]:
        """Every packed piece: the shared segments and the layer's own storage joined on dim 2 (``storage`` itself
        when nothing is shared; otherwise new tensors, the segments untouched)."""
        if not self.shared:
            return self.storage
        segments = [*self.shared, self.storage]
        out = {}
        for name in dict.fromkeys(name for segment in segments for name in segment):
            parts = [segment[name] for segment in segments if name in segment]
            out[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return out

    def consolidate(self) -> None:
        """Join the shared segments and the own storage into the layer's own storage, one tensor per piece (the
        other forks keep reading the segments)."""
        if self.shared:
            self.storage = self.full_storage()
            self.shared = []

    def storage_prefix(self, n: int) -> dict[str, torch.Tensor]:
        """Views of the storage as it was when it held its first `n` packed tokens."""
        storage, out = self.full_storage(), {}
        for side, codec in self.codecs.items():
            out.update({f"{side}_{name}": t for name, t in codec.prefix(self.pieces(side, storage), n).items()})
        return out

    def packed(self, n: int | None = None) -> tuple[PackedFormat | None, PackedFormat | None]:
        """Format views (``formats``) of the first `n` packed keys and values (all held when None; in the static
        layout, ``n = static.capacity`` gives the whole preallocated buffers). None for a side without a format,
        and for both sides before anything is packed. The kernels read one tensor per piece: a fork's shared segments
        are joined into its own storage first."""
        self.consolidate()  # exact sink tokens are not in the views: `sink_keys` / `sink_values` hold them
        storage = self.storage if n is None else self._prefix_or_reserved(n)
        pieces = {side: self.pieces(side, storage) for side in SIDES}
        return tuple(self.codecs[side].packed(pieces[side]) if pieces[side] else None for side in SIDES)

    @property
    def num_sinks(self) -> int:
        """Exact sink tokens held (``cfg.sink_tokens`` once that many have arrived)."""
        return 0 if self.sink_keys is None else self.sink_keys.shape[-2]

    def describe_formats(self) -> str:
        """The layer's storage in words, e.g. "keys CodebookPacked(bits=4, head_dim=128), values ..." (warnings)."""
        parts = []
        for side, name in zip(SIDES, ("keys", "values"), strict=True):
            view = self.codecs[side].packed(self.pieces(side)) if self.codecs else None
            if view is None:
                parts.append(f"{name} {type(self.codecs.get(side)).__name__} (no kernel format)")
            else:
                parts.append(f"{name} {type(view).__name__}(bits={view.bits}, head_dim={view.head_dim})")
        if self.num_sinks:
            parts.append(f"{self.num_sinks} exact sink tokens")
        return ", ".join(parts)

    def dequantize(self, dtype: torch.dtype, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token before the window: the exact sink tokens, then the first `n` packed tokens (all when None)
        decoded, as ``[B, H, s + n, D]`` keys and values in `dtype`.

        Args:
            dtype: the output dtype.
            n: how many packed tokens (at most ``num_quantized``).
        Returns:
            (keys, values).
        """
        storage = self.full_storage() if n is None else self.storage_prefix(n)
        if self.num_quantized == 0 or n == 0:
            out = [self.keys[..., :0, :].to(dtype), self.values[..., :0, :].to(dtype)]
        else:
            out = [self.codecs[side].decode(self.pieces(side, storage)).to(dtype) for side in SIDES]
        if self.num_sinks:
            out = [torch.cat([sink.to(dtype), x], dim=-2)
                   for sink, x in zip((self.sink_keys, self.sink_values), out, strict=True)]
        return out[0], out[1]

    def _prefix_or_reserved(self, n: int) -> dict[str, torch.Tensor]:
        if self.static is not None and n > self.num_quantized:
            return self.static.reserved_storage(self)
        return self.storage_prefix(n)

    @property
    def code_storage(self) -> tuple[str, ...]:
        """Names in ``storage`` that are codes (the rest is metadata)."""
        return tuple(f"{side}_{name}" for side, codec in self.codecs.items() for name in codec.code_pieces)

    def encode_block(self, keys: torch.Tensor, values: torch.Tensor, found: torch.Tensor | None = None
                     ) -> dict[str, torch.Tensor]:
        """Encode `[B, H, T, D]` tokens leaving the window; returns prefixed pieces to append on dim 2.

        Args:
            keys / values: ``[B, H, T, D]`` (key and value head dims may differ).
            found: a bool ``[1]`` tensor on the device that is OR-ed with "non-finite values in this block" (in a CUDA
                graph, whose host side reports it after the replay); None: checked by ``non_finite`` here.
        Returns:
            ``{"k_<piece>" | "v_<piece>": tensor}``, the block's entries on dim 2.
        """
        # the codecs read their static pieces (the means), which a fork finds in the first shared segment
        held = {name: t for segment in self.shared for name, t in segment.items()
                if name[2:] in self.codecs[name[0]].static_pieces}
        held.update(self.storage)
        out = {}
        for side, x, what in (("k", keys, "key_states"), ("v", values, "value_states")):
            if found is None:
                self.non_finite.check(x, f"{what} of layer {self.layer_idx}")
            else:
                found.logical_or_((~torch.isfinite(x)).any().reshape(1))
            new = self.codecs[side].encode(x, self.pieces(side, held), use_kernels=self.use_kernels)
            out.update({f"{side}_{name}": t for name, t in new.items()})
        return out

    # ------------------------------------------------------------------------------------------------------------
    # transformers layer API
    # ------------------------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = key_states.shape[-1]
        self.value_head_dim = value_states.shape[-1]
        for side, t in zip(SIDES, (key_states, value_states), strict=True):
            try:
                self.cfg.side_config(side).check_dim(side, t.shape[-1])
            except ValueError as err:
                method = type(self.cfg.side_config(side)).__name__
                raise ValueError(
                    f"layer {self.layer_idx}: {'key' if side == 'k' else 'value'}_states of shape {tuple(t.shape)} "
                    f"[batch, kv_heads, seq, head_dim] cannot be quantized with {method}: {err}"
                ) from None
        key_codec, value_codec = self.cfg.make_codecs(self.head_dim, self.value_head_dim, self.layer_idx, self.device)
        self.codecs = {"k": key_codec, "v": value_codec}
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()
        self.is_initialized = True

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name} must have shape [batch, kv_heads, seq, head_dim], got {tuple(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be floating point (float32, float16 or bfloat16), got {t.dtype}")
        if key_states.shape[:-1] != value_states.shape[:-1]:
            raise ValueError(
                f"key_states and value_states must agree on [batch, kv_heads, seq], got {tuple(key_states.shape)} "
                f"and {tuple(value_states.shape)}"
            )
        if self.is_initialized and (
            key_states.shape[0] != self.keys.shape[0]
            or key_states.shape[1] != self.keys.shape[1]
            or key_states.shape[-1] != self.head_dim
            or value_states.shape[-1] != self.value_head_dim
        ):
            raise ValueError(
                f"layer {self.layer_idx} holds [batch={self.keys.shape[0]}, kv_heads={self.keys.shape[1]}, "
                f"head_dim={self.head_dim} / {self.value_head_dim}] states, got key_states of shape "
                f"{tuple(key_states.shape)} and value_states of shape {tuple(value_states.shape)}; call "
                "cache.reset() (or use a fresh cache) before a new, unrelated batch"
            )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store `[B, H, T, D]` new keys and values; return what attention reads: ``[B, H, n + T, D]`` each.

        Args:
            key_states / value_states: the new tokens, model dtype.
        Returns:
            (keys, values): every held token, the packed ones dequantized (or, on the fast path's decode step,
            placeholders that "tq_fused" attention recognizes).
        """
        self._check_states(key_states, value_states)
        if self.static is not None:
            if key_states.shape[-2] == 1 and self.fast_path is not None:
                return self.static.decode_update(self, key_states, value_states)
            self.leave_static()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        arrived = key_states.shape[-2]
        window_k, window_v = key_states.to(self.keys.dtype), value_states.to(self.values.dtype)
        to_sinks = self.cfg.num_sinks(self.cumulative_length + arrived) - self.num_sinks
        if to_sinks > 0:  # the first tokens of the sequence become exact sinks (returned first, below)
            sinks = [window_k[..., :to_sinks, :], window_v[..., :to_sinks, :]]
            if self.num_sinks:
                sinks = [torch.cat([old, new], dim=-2) for old, new in
                         zip((self.sink_keys, self.sink_values), sinks, strict=True)]
            self.sink_keys, self.sink_values = (compact(t) for t in sinks)
            window_k, window_v = window_k[..., to_sinks:, :], window_v[..., to_sinks:, :]
        # An empty window takes the new states as they are (DynamicLayer does the same on its first update): no copy
        # of a prefill that is quantized right away (at 8 x 32K, 1 GiB a layer). Only two distinct tensors that own
        # exactly their storage (not slices of a fused QKV output, which would keep it all alive), with unit stride on
        # head_dim as the decode kernels read the window; anything else is copied.
        if (
            self.keys.shape[-2] > 0
            or window_k.data_ptr() == window_v.data_ptr()
            or not all(t.stride(-1) == 1 and owns_exactly(t) for t in (window_k, window_v))
        ):
            window_k = torch.cat([self.keys, window_k], dim=-2)
            window_v = torch.cat([self.values, window_v], dim=-2)
        if self.fast_path is not None and self.num_quantized > 0 and arrived == 1:
            # Fast path: the packed tokens held now are read by the fused kernel (placeholders carry the view)
            out_k, out_v = self.fast_path(self, window_k, window_v)
        elif self.num_quantized > 0 or self.num_sinks:
            old_k, old_v = self.dequantize(key_states.dtype)
            out_k = torch.cat([old_k, window_k.to(key_states.dtype)], dim=-2)
            out_v = torch.cat([old_v, window_v.to(value_states.dtype)], dim=-2)
        else:
            out_k, out_v = window_k, window_v
        self.cumulative_length += arrived
        self.keys, self.values = window_k, window_v
        self._flush()
        return out_k, out_v

    def _flush(self) -> None:
        target = self.cfg.num_quantized(self.cumulative_length)
        count = target - self.num_quantized
        if count <= 0:
            return
        if self.num_quantized == 0 and not self.storage:
            for side, x in (("k", self.keys), ("v", self.values)):
                self.storage.update({f"{side}_{n}": t for n, t in self.codecs[side].prepare(x).items()})
        # A long prefill is quantized in chunks of about FLUSH_CHUNK_VALUES values (a multiple of flush_size, so KIVI's
        # key groups stay whole).
        b, h = self.keys.shape[:2]
        per_token = b * h * max(self.head_dim, self.value_head_dim)
        step = max(1, FLUSH_CHUNK_VALUES // (per_token * self.cfg.flush_size)) * self.cfg.flush_size
        bounds = [(start, min(start + step, count)) for start in range(0, count, step)]
        if len(bounds) == 1 and self.num_quantized == 0:  # nothing held yet (the means are not replaced)
            self.storage.update(self.encode_block(self.keys[..., :count, :], self.values[..., :count, :]))
        else:
            self._append_chunks(bounds)
        self.num_quantized = target
        self.keys = compact(self.keys[..., count:, :])
        self.values = compact(self.values[..., count:, :])

    def _append_chunks(self, bounds: list[tuple[int, int]]) -> None:
        """Encode the window tokens of `bounds` chunk by chunk and append them to the storage, each chunk written
        into its place in one new tensor per entry: a long prefill never holds all its chunks and their concatenation
        at once (peak: old storage + new storage + one chunk)."""
        tokens0, count = bounds[0][1], bounds[-1][1]
        first = self.encode_block(self.keys[..., :tokens0, :], self.values[..., :tokens0, :])
        out, offset = {}, {}
        for name, t in first.items():
            old = self.storage.get(name)
            held = 0 if old is None else old.shape[2]
            new = t.shape[2] * count // tokens0  # entries on dim 2 are proportional to tokens (per token or group)
            out[name] = t.new_empty((*t.shape[:2], held + new, *t.shape[3:]))
            if old is not None:
                out[name][:, :, :held] = old
            out[name][:, :, held : held + t.shape[2]] = t
            offset[name] = held + t.shape[2]
        del first
        for a, b in bounds[1:]:
            chunk = self.encode_block(self.keys[..., a:b, :], self.values[..., a:b, :])
            for name, t in chunk.items():
                out[name][:, :, offset[name] : offset[name] + t.shape[2]] = t
                offset[name] += t.shape[2]
        self.storage.update(out)

    # ------------------------------------------------------------------------------------------------------------
    # Static layout (CUDA-graph decoding): the public protocol the graph runner uses
    # ------------------------------------------------------------------------------------------------------------
    def enter_static(self, capacity: int, shared: StaticShared) -> None:
        """Move the storage and window into preallocated buffers of `capacity` packed tokens (a multiple of
        flush_size, at least the tokens held). Called again with a larger capacity, it moves them again. A fork's
        shared segments are copied into the buffers (they are never written)."""
        self.consolidate()
        self.static = StaticLayout.build(self, capacity, shared)

    def leave_static(self) -> None:
        """Back to the dynamic layout: every tensor exactly its tokens again (the reserved buffers are freed)."""
        if self.static is not None:
            self.static.release(self)
            self.static = None

    def settle(self) -> None:
        """Move the live window tokens to the front of the static window buffers (deferred from the last flush)."""
        if self.static is not None:
            self.static.settle(self)

    def write_step_counts(self) -> None:
        """Write the next single-token step's counts to the layout's shared device tensor (``StaticShared``)."""
        self.static.write_step_counts(self)

    def advance_one(self) -> None:
        """The host side of one non-flushing decode step in the static layout (after a graph replay)."""
        self.static.advance_one(self)

    def advance_flush(self) -> None:
        """The host side of one flushing decode step in the static layout (after a graph replay)."""
        self.static.advance_flush(self)

    # ------------------------------------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0
        self.num_quantized = 0
        self.storage = {}
        self.shared = []
        self.static = None
        self.sink_keys = self.sink_values = None

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.leave_static()
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.storage = {name: fn(t) for name, t in self.full_storage().items()}
        self.shared = []
        if self.num_sinks:
            self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def offload(self):
        """Move every tensor of this layer to the CPU."""
        self._map_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.keys.device != self.device:
            self._map_batch(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"tokens_to_remove must be a negative number of tokens to drop (or 0), got {tokens_to_remove}"
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.leave_static()
        keep = max(0, self.cumulative_length + tokens_to_remove)
        sinks = self.num_sinks
        if keep < sinks:  # into the sinks: nothing packed or in the window is kept
            self.sink_keys, self.sink_values = compact(self.sink_keys[..., :keep, :]), compact(
                self.sink_values[..., :keep, :])
            self.keys, self.values = compact(self.keys[..., :0, :]), compact(self.values[..., :0, :])
            self.storage, self.num_quantized, self.cumulative_length = {}, 0, keep
            return
        self._crop_after_sinks(keep - sinks)
        self.cumulative_length = keep

    def _crop_after_sinks(self, keep: int) -> None:
        """``crop`` of the packed tokens and the window: keep the first `keep` tokens after the sinks."""
        if keep >= self.num_quantized:
            window_keep = keep - self.num_quantized
            self.keys = compact(self.keys[..., :window_keep, :])
            self.values = compact(self.values[..., :window_keep, :])
        else:
            self.consolidate()
            # whole entries stay packed; tokens of a partly kept entry (a KIVI key group) return to the window
            packed = min(codec.whole_entries(keep) for codec in self.codecs.values())
            if packed < keep:
                sinks = self.num_sinks  # all held: a prefix of `keep` keeps only whole groups
                k_all, v_all = (t[..., sinks:, :] for t in self.dequantize(self.dtype))
                self.keys = compact(k_all[..., packed:keep, :])
                self.values = compact(v_all[..., packed:keep, :])
            else:
                self.keys, self.values = compact(self.keys[..., :0, :]), compact(self.values[..., :0, :])
            self.storage = {name: compact(t) for name, t in self.storage_prefix(packed).items()}
            self.num_quantized = packed

    # ------------------------------------------------------------------------------------------------------------
    def memory_footprint(self) -> dict[str, int]:
        """Bytes held: codes, metadata and window (the sink tokens counted in it; in the static layout, the whole
        reserved buffers).

        Returns:
            {"codes": int, "metadata": int, "window": int}
        """
        held = dict(self.storage)
        windows = (self.keys, self.values) if self.is_initialized else ()
        if self.static is not None:
            held.update(self.static.reserved)
            windows = (self.static.win_k, self.static.win_v)
        codes = self.code_storage
        out = {"codes": 0, "metadata": 0, "window": 0}
        for segment in (*self.shared, held):
            for name, t in segment.items():
                out["codes" if name in codes else "metadata"] += _nbytes(t)
        if self.num_sinks and self.static is None:  # in the static layout they are in the window buffers
            windows = (*windows, self.sink_keys, self.sink_values)
        out["window"] = sum(_nbytes(t) for t in windows)
        return out

    def memory_sharing(self) -> dict[str, int]:
        """The bytes of ``memory_footprint`` split into the layer's own and those of the segments it shares with its
        forks (``fork``).

        Returns:
            {"own": int, "shared": int}
        """
        shared = sum(_nbytes(t) for segment in self.shared for t in segment.values())
        return {"own": sum(self.memory_footprint().values()) - shared, "shared": shared}

    def state(self) -> dict:
        """The layer's saved state (``persistence``): every public attribute but ``transient_attributes`` (the
        window, counters, head dims), with ``storage`` holding all packed tokens (``full_storage``). A new attribute
        flows through as long as it is a tensor, a dict of tensors or a plain value (else saving raises naming it).

        Returns:
            {attribute name: value}.
        """
        state = {name: value for name, value in vars(self).items()
                 if not name.startswith("_") and name not in self.transient_attributes}
        state["storage"] = dict(self.full_storage())
        return state

    # ------------------------------------------------------------------------------------------------------------
    # Forks (copy-on-write) and copies
    # ------------------------------------------------------------------------------------------------------------
    def freeze(self) -> None:
        """Move the own storage into a new shared segment (nothing is copied): from now on forks may read it."""
        if self.storage and self.num_quantized > 0 and self.static is None:
            self.shared = [*self.shared, self.storage]
            self.storage = {}

    def fork(self) -> QuantizedKVLayer:
        """A copy of this layer that continues independently and shares the packed history (copy-on-write).

        The fork gets its own window (a copy) and counters, and appends its own flushes; the packed history is
        frozen into shared segments that both layers read (``freeze``). The method config, codecs and fast-path
        hooks are shared (they are never changed after creation). In the static layout (CUDA graphs), whose buffers
        are written in place, the fork copies the packed tokens instead.

        Returns:
            the new layer.
        """
        new = object.__new__(type(self))
        new.__dict__.update(vars(self))
        new.non_finite = NonFiniteWatch()
        new.static = None
        if self.static is None:
            self.freeze()
            new.storage, new.shared = dict(self.storage), list(self.shared)
        else:  # the storage is views of buffers the static layout writes in place
            new.storage, new.shared = {name: _owned_copy(t) for name, t in self.storage.items()}, []
        if self.is_initialized:
            new.keys, new.values = _owned_copy(self.keys), _owned_copy(self.values)
        if self.static is not None and self.num_sinks:  # views of the window buffers (reordered in place by beams)
            new.sink_keys, new.sink_values = _owned_copy(self.sink_keys), _owned_copy(self.sink_values)
        return new

    def __deepcopy__(self, memo):
        """``copy.deepcopy``: a deep copy of everything but the packed history, which the copy shares as a fork does
        (``fork``; in the static layout it is copied too)."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        self.freeze()
        for name, value in vars(self).items():
            setattr(new, name, list(value) if name == "shared" else copy.deepcopy(value, memo))
        return new
