"""Shared machinery of the quantized caches: the full-precision window, flushing, and the Cache container.

Every quantized layer holds, for keys and values of shape ``[batch, kv_heads, seq, head_dim]``:

- a full-precision window of the most recent tokens, ``self.keys`` / ``self.values`` ``[B, H, w, D]`` in the
  model's dtype (the same attributes a transformers ``DynamicLayer`` uses);
- the older tokens in bit-packed form, in method-specific tensors named in ``self.storage`` (every one with the
  batch on dim 0 and the token axis, or the token-group axis, on dim 2).

Tokens leave the window in blocks: after ``n`` tokens, exactly ``q(n) = max(0, floor((n - R) / F) * F)`` are
quantized, R = ``residual_length`` and F = ``flush_size``. So the window holds between R and R + F - 1 tokens,
the state depends only on n (not on how tokens arrived), and ``estimate_cache_bytes`` can count it to the byte.
``update`` returns the dequantized old tokens followed by the window and the new tokens in full precision: a
prefill attends to its own exact keys, and every token is exact in the step it arrives.

For CUDA-graph decoding a layer can move into a static layout (``StaticLayout``, ``enter_static``): the same tokens
and counters, held in preallocated buffers, with the counts a decode step needs also on the device. Anything other
than a single-token step of the fast path (a prefill, crop, reorder, reset) moves it back first.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from transformers import Cache, DynamicCache, DynamicLayer, PreTrainedConfig
from transformers.cache_utils import CacheLayerMixin


def check_int(name: str, value: Any, minimum: int, allowed: str | None = None) -> None:
    """Raise a ValueError naming `name` unless `value` is an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be {allowed or f'an integer >= {minimum}'}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclasses.dataclass
class WindowConfig:
    """Window settings shared by every method (see the module docstring for the flush rule)."""

    residual_length: int = 128
    flush_size: int = 128

    def __post_init__(self):
        check_int("residual_length", self.residual_length, 0)
        check_int("flush_size", self.flush_size, 1)

    def num_quantized(self, n: int) -> int:
        """How many of `n` tokens are held quantized."""
        return max(0, (n - self.residual_length) // self.flush_size * self.flush_size)

    def check_head_dim(self, head_dim: int) -> None:
        """Raise a ValueError if this configuration cannot quantize vectors of `head_dim`."""


# Tokens quantized (or averaged) per pass: bounds the float32 temporaries of a long prefill's first flush.
CHUNK_TOKENS = 4096


def compact(t: torch.Tensor) -> torch.Tensor:
    """`t` as a contiguous tensor that owns exactly its own bytes. A slice of a window or of the storage is a view
    that keeps the whole original alive (even an empty slice: ``.contiguous()`` returns such views unchanged), so
    held memory would silently stay at the size before a flush or a crop; this copies those views."""
    if t.is_contiguous() and owns_exactly(t):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def owns_exactly(t: torch.Tensor) -> bool:
    """Whether `t` spans its whole storage and nothing more (it keeps no larger tensor alive)."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def finite_mean(x: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """float32 mean over `dim` (kept, size 1) of the finite entries only (0 where none is finite): one bad token
    cannot shift the mean. Accumulated in chunks of CHUNK_TOKENS along `dim`, never a whole float32 copy of `x`."""
    shape = list(x.shape)
    shape[dim] = 1
    total = torch.zeros(shape, dtype=torch.float32, device=x.device)
    count = torch.zeros(shape, dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[dim], CHUNK_TOKENS):
        part = x.narrow(dim, start, min(CHUNK_TOKENS, x.shape[dim] - start)).float()
        finite = torch.isfinite(part)
        total += torch.where(finite, part, torch.zeros_like(part)).sum(dim, keepdim=True)
        count += finite.sum(dim, keepdim=True)
    return total / count.clamp_min(1)


def warn_non_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        warnings.warn(
            f"non-finite values in {what}: they are quantized on their own (per token), and do not change the scales "
            "of other tokens, but the affected entries are not recoverable",
            RuntimeWarning,
            stacklevel=3,
        )


@dataclasses.dataclass
class StaticShared:
    """What all layers of a cache in the static layout share: ``lengths`` (int64 ``[3]`` on the device: packed tokens
    the step attends to, window tokens it attends to with its own, and the window slot the new token goes to),
    ``key_mask`` (``[B, capacity + R + F]`` bool on the device, True = attend) and ``graph_step``: True while the graph
    runner captures a step, whose counts and mask it writes to the device itself before every replay. In an eager
    step each layer writes ``lengths`` and the model's own mask is used."""

    lengths: torch.Tensor
    key_mask: torch.Tensor
    graph_step: bool = False


@dataclasses.dataclass
class StaticLayout:
    """Preallocated buffers of one quantized layer, so that a decode step has fixed shapes and addresses and can be
    replayed from a CUDA graph (``tq_transformers.cuda_graphs``).

    ``reserved`` holds each growing storage entry at ``capacity`` packed tokens (``layer.storage`` entries are views of
    their first ``num_quantized`` tokens); ``win_k`` / ``win_v`` ``[B, H, R + F, D]`` hold the window (``layer.keys``
    / ``layer.values`` are views of the live part). ``start`` > 0 after a flush: the window's live tokens begin there
    until the next step moves them to the front (the flushing step's attention still reads the window from slot 0).
    """

    capacity: int
    shared: StaticShared
    reserved: dict[str, torch.Tensor]
    win_k: torch.Tensor
    win_v: torch.Tensor
    start: int = 0


def head_dim_of(config) -> int | None:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None)
    if head_dim is None and getattr(text, "hidden_size", None) and getattr(text, "num_attention_heads", None):
        head_dim = text.hidden_size // text.num_attention_heads
    return head_dim


class QuantizedLayer(CacheLayerMixin):
    """One decoder layer's quantized keys and values (abstract: a method fills in the four storage hooks)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True
    supports_early_init = True
    # Set by tq_transformers.fast_attention.prepare_cache: callable(layer, window_k, window_v) -> placeholders.
    fast_path = None

    def __init__(self, method_config: WindowConfig, layer_idx: int = 0):
        super().__init__()
        self.cfg = method_config
        self.layer_idx = layer_idx
        self.cumulative_length = 0
        self.num_quantized = 0
        self.storage: dict[str, torch.Tensor] = {}
        self.static: StaticLayout | None = None

    # ----------------------------------------------------------------------------------------------------------
    # Method hooks
    # ----------------------------------------------------------------------------------------------------------
    def _quantize_block(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quantize `[B, H, T, D]` tokens leaving the window; returns storage pieces to append on dim 2."""
        raise NotImplementedError

    def _dequantize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """All quantized tokens as `[B, H, num_quantized, D]` keys and values in `dtype`."""
        raise NotImplementedError

    def _before_first_flush(self, window_keys: torch.Tensor, window_values: torch.Tensor) -> None:
        """Called once, with the whole window, before the first tokens are quantized. With ``cfg.center``, stores
        the per-head, per-channel means of keys and values (fp16 ``[B, H, 1, D]``) that the method subtracts."""
        if getattr(self.cfg, "center", False):
            self.storage["k_mean"] = finite_mean(window_keys, 2).to(torch.float16)
            self.storage["v_mean"] = finite_mean(window_values, 2).to(torch.float16)

    def _center(self, x: torch.Tensor, kv: str) -> torch.Tensor:
        """`x` in float32, minus the stored mean of keys (`kv="k"`) or values ("v") when centering is on."""
        x = x.float()
        return x - self.storage[f"{kv}_mean"].float() if getattr(self.cfg, "center", False) else x

    def _uncenter(self, x: torch.Tensor, kv: str) -> torch.Tensor:
        """Inverse of `_center` on a float32 reconstruction."""
        return x + self.storage[f"{kv}_mean"].float() if getattr(self.cfg, "center", False) else x

    def _storage_prefix(self, count: int) -> dict[str, torch.Tensor]:
        """Views of the storage as it was when it held its first `count` quantized tokens (flushes only append on
        dim 2). Default: one entry per token on dim 2; a method that stores groups of tokens overrides this."""
        return {
            name: t if name in self.static_storage else t[:, :, :count] for name, t in self.storage.items()
        }

    def _truncate_quantized(self, keep: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keep the first `keep` quantized tokens (per-token storage: nothing comes back into the window)."""
        self.storage = {name: compact(t) for name, t in self._storage_prefix(keep).items()}
        self.num_quantized = keep
        return None

    # Storage entries that do not grow with tokens (the centering means); batch on dim 0 as well.
    static_storage: tuple[str, ...] = ("k_mean", "v_mean")
    # Which storage entries are codes (the rest are metadata), for `memory_footprint`.
    code_storage: tuple[str, ...] = ()

    # ----------------------------------------------------------------------------------------------------------
    # transformers layer API
    # ----------------------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = key_states.shape[-1]
        self.cfg.check_head_dim(self.head_dim)
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
        ):
            raise ValueError(
                f"layer {self.layer_idx} holds [batch={self.keys.shape[0]}, kv_heads={self.keys.shape[1]}, "
                f"head_dim={self.head_dim}] states, got key_states of shape {tuple(key_states.shape)}; call "
                "cache.reset() (or use a fresh cache) before a new, unrelated batch"
            )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._check_states(key_states, value_states)
        if self.static is not None:
            if key_states.shape[-2] == 1 and self.fast_path is not None:
                return self._static_update(key_states, value_states)
            self.leave_static()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        window_k, window_v = key_states.to(self.keys.dtype), value_states.to(self.values.dtype)
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
        if self.fast_path is not None and self.num_quantized > 0 and key_states.shape[-2] == 1:
            # Fast-path hook (tq_transformers.fast_attention, off unless set): a single-token decode step skips
            # dequantizing the old tokens; `fast_path` records what this step attends to (the packed tokens held
            # now, then this window) and returns placeholders that its attention function recognizes. Storing and
            # flushing below are unchanged.
            out_k, out_v = self.fast_path(self, window_k, window_v)
        elif self.num_quantized > 0:
            old_k, old_v = self._dequantize(key_states.dtype)
            out_k = torch.cat([old_k, window_k.to(key_states.dtype)], dim=-2)
            out_v = torch.cat([old_v, window_v.to(value_states.dtype)], dim=-2)
        else:
            out_k, out_v = window_k, window_v
        self.cumulative_length += key_states.shape[-2]
        self.keys, self.values = window_k, window_v
        self._flush()
        return out_k, out_v

    def _flush(self) -> None:
        target = self.cfg.num_quantized(self.cumulative_length)
        count = target - self.num_quantized
        if count <= 0:
            return
        if self.num_quantized == 0 and not self.storage:
            self._before_first_flush(self.keys, self.values)
        # A long prefill is quantized in chunks (a multiple of flush_size, so KIVI's key groups stay whole).
        step = max(1, CHUNK_TOKENS // self.cfg.flush_size) * self.cfg.flush_size
        bounds = [(start, min(start + step, count)) for start in range(0, count, step)]
        if len(bounds) == 1 and self.num_quantized == 0:  # nothing held yet (the means are not replaced)
            self.storage.update(self._quantize_block(self.keys[..., :count, :], self.values[..., :count, :]))
        else:
            self._append_chunks(bounds)
        self.num_quantized = target
        self.keys = compact(self.keys[..., count:, :])
        self.values = compact(self.values[..., count:, :])

    def _append_chunks(self, bounds: list[tuple[int, int]]) -> None:
        """Quantize the window tokens of `bounds` chunk by chunk and append them to the storage, each chunk written
        into its place in one new tensor per entry: a long prefill never holds all its chunks and their concatenation
        at once (peak: old storage + new storage + one chunk, as a single `torch.cat` of one chunk)."""
        tokens0, count = bounds[0][1], bounds[-1][1]
        first = self._quantize_block(self.keys[..., :tokens0, :], self.values[..., :tokens0, :])
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
            chunk = self._quantize_block(self.keys[..., a:b, :], self.values[..., a:b, :])
            for name, t in chunk.items():
                out[name][:, :, offset[name] : offset[name] + t.shape[2]] = t
                offset[name] += t.shape[2]
        for name, t in out.items():
            if offset[name] != t.shape[2]:  # a method whose storage is not proportional to tokens
                raise RuntimeError(f"storage {name!r}: wrote {offset[name]} of {t.shape[2]} entries on dim 2")
        self.storage.update(out)

    # ----------------------------------------------------------------------------------------------------------
    # Static layout (CUDA-graph decoding; see StaticLayout)
    # ----------------------------------------------------------------------------------------------------------
    def enter_static(self, capacity: int, shared: StaticShared) -> None:
        """Move the storage and window into preallocated buffers of `capacity` packed tokens (a multiple of
        flush_size, at least the tokens held). Called again with a larger capacity, it moves them again."""
        F, R = self.cfg.flush_size, self.cfg.residual_length
        if self.num_quantized == 0:
            raise ValueError(f"layer {self.layer_idx}: the static layout needs packed tokens (none yet)")
        if capacity % F or capacity < self.num_quantized:
            raise ValueError(
                f"capacity must be a multiple of flush_size ({F}) and >= {self.num_quantized} packed tokens, got "
                f"{capacity}"
            )
        self._settle()
        flushes = self.num_quantized // F
        reserved = {}
        for name, t in self.storage.items():
            if name in self.static_storage:
                continue
            per_flush = t.shape[2] // flushes  # entries on dim 2 are proportional to tokens (per token or group)
            buf = t.new_empty((*t.shape[:2], per_flush * (capacity // F), *t.shape[3:]))
            buf[:, :, : t.shape[2]] = t
            reserved[name] = buf
            self.storage[name] = buf[:, :, : t.shape[2]]
        w = self.keys.shape[-2]
        win_k = self.keys.new_empty((*self.keys.shape[:2], R + F, self.keys.shape[-1]))
        win_v = self.values.new_empty((*self.values.shape[:2], R + F, self.values.shape[-1]))
        win_k[:, :, :w], win_v[:, :, :w] = self.keys, self.values
        self.keys, self.values = win_k[:, :, :w], win_v[:, :, :w]
        self.static = StaticLayout(capacity, shared, reserved, win_k, win_v)

    def leave_static(self) -> None:
        """Back to the dynamic layout: every tensor exactly its tokens again (the reserved buffers are freed)."""
        if self.static is None:
            return
        self._settle()
        self.storage = {name: compact(t) for name, t in self.storage.items()}
        self.keys, self.values = compact(self.keys), compact(self.values)
        self.static = None

    def _settle(self) -> None:
        """Move the live window tokens to the front of the window buffers (deferred from the last flush)."""
        st = self.static
        if st is None or st.start == 0:
            return
        w = self.keys.shape[-2]
        st.win_k[:, :, :w] = self.keys.clone()
        st.win_v[:, :, :w] = self.values.clone()
        self.keys, self.values = st.win_k[:, :, :w], st.win_v[:, :, :w]
        st.start = 0

    def _static_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """One decode token in the static layout: written to the window slot ``lengths[2]`` read on the device (so a
        CUDA graph replays it at any position); the host-side counters advance as in `update`. A step that flushes
        runs eagerly (the graph runner never captures or replays one)."""
        st = self.static
        self._settle()
        if not st.shared.graph_step:
            self._write_step_lengths()
        slot = st.shared.lengths[2:3]
        st.win_k.index_copy_(2, slot, key_states.to(st.win_k.dtype))
        st.win_v.index_copy_(2, slot, value_states.to(st.win_v.dtype))
        out_k, out_v = self.fast_path(self, st.win_k, st.win_v)
        self._advance_one()
        target = self.cfg.num_quantized(self.cumulative_length)
        if target > self.num_quantized:
            self._static_flush(target - self.num_quantized)
        return out_k, out_v

    def _write_step_lengths(self) -> None:
        """Write the next single-token step's counts to the shared device tensor: packed tokens attended, window
        tokens attended (the new one included), the new token's window slot. Expects a settled window."""
        w = self.keys.shape[-2]
        self.static.shared.lengths.copy_(torch.tensor([self.num_quantized, w + 1, w]))

    def _advance_one(self) -> None:
        """The host side of a non-flushing static step (the graph runner calls it after each replay)."""
        st = self.static
        self.cumulative_length += 1
        w = self.keys.shape[-2] + 1
        self.keys, self.values = st.win_k[:, :, :w], st.win_v[:, :, :w]

    def _static_flush(self, count: int) -> None:
        st = self.static
        if self.num_quantized + count > st.capacity:
            raise RuntimeError(
                f"layer {self.layer_idx}: the static layout holds {st.capacity} packed tokens, a flush needs "
                f"{self.num_quantized + count}; enter_static again with a larger capacity first"
            )
        block = self._quantize_block(st.win_k[:, :, :count], st.win_v[:, :, :count])
        for name, t in block.items():
            held = self.storage[name].shape[2]
            st.reserved[name][:, :, held : held + t.shape[2]] = t
            self.storage[name] = st.reserved[name][:, :, : held + t.shape[2]]
        self.num_quantized += count
        w = self.keys.shape[-2]
        self.keys, self.values = st.win_k[:, :, count:w], st.win_v[:, :, count:w]
        st.start = count

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
        self.static = None

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.leave_static()
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.storage = {name: fn(t) for name, t in self.storage.items()}

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
        if keep >= self.num_quantized:
            window_keep = keep - self.num_quantized
            self.keys = compact(self.keys[..., :window_keep, :])
            self.values = compact(self.values[..., :window_keep, :])
        else:
            back = self._truncate_quantized(keep)
            if back is None:  # per-token storage: the window is simply dropped
                self.keys, self.values = compact(self.keys[..., :0, :]), compact(self.values[..., :0, :])
            else:  # tokens of a partly kept group come back into the window, dequantized
                self.keys, self.values = back
        self.cumulative_length = keep

    # ----------------------------------------------------------------------------------------------------------
    def memory_footprint(self) -> dict[str, int]:
        """Bytes held: in the static layout, the whole reserved buffers (what the GPU really holds)."""
        held = dict(self.storage)
        windows = (self.keys, self.values) if self.is_initialized else ()
        if self.static is not None:
            held.update(self.static.reserved)
            windows = (self.static.win_k, self.static.win_v)
        codes = sum(t.numel() * t.element_size() for n, t in held.items() if n in self.code_storage)
        meta = sum(t.numel() * t.element_size() for n, t in held.items() if n not in self.code_storage)
        window = sum(t.numel() * t.element_size() for t in windows)
        return {"codes": codes, "metadata": meta, "window": window}


class QuantizedCacheBase(Cache):
    """A transformers `Cache` whose full-attention layers are quantized layers of one method.

    Layers come from `DynamicCache(config=config)` (the public way to learn each layer's type on every
    transformers version): plain full-attention `DynamicLayer`s are replaced by the method's layer, sliding-window
    and other layers keep their normal class. Without a config, every layer is created lazily, quantized, on its
    first `update`.
    """

    layer_class: type[QuantizedLayer]
    config_class: type[WindowConfig]

    def __init__(self, config=None, method_config: WindowConfig | None = None):
        self.method_config = method_config
        if config is not None and not isinstance(config, PreTrainedConfig):
            raise TypeError(
                f"config must be a transformers PreTrainedConfig (model.config) or None, got {type(config).__name__} "
                f"{config!r}; method settings are keyword arguments, e.g. {type(self).__name__}(model.config, bits=4)"
            )
        if config is not None:
            head_dim = head_dim_of(config)
            if head_dim is not None:
                method_config.check_head_dim(head_dim)
            template = DynamicCache(config=config).layers
            layers = [
                self.layer_class(method_config, layer_idx=i) if type(layer) is DynamicLayer else layer
                for i, layer in enumerate(template)
            ]
            super().__init__(layers=layers)
            if not self.quantized_layers:
                warnings.warn(
                    f"{type(self).__name__}: the config has no full-attention layer (layer types "
                    f"{sorted({type(layer).__name__ for layer in layers})}), so nothing will be quantized and the cache "
                    "saves no memory",
                    UserWarning,
                    stacklevel=3,
                )
        else:
            super().__init__(layer_class_to_replicate=DynamicLayer)
        # Token ids this cache holds, per batch row, when known (recorded by `tq_transformers.enable`).
        self.token_ids: torch.Tensor | None = None
        # The model config this cache was built for (None without one): the fast path checks its attention
        # implementation, so that a prepared cache cannot silently feed window-only placeholders to plain SDPA.
        self.model_config = config
        # Called with each quantized layer created later, lazily, without a config (set by
        # `fast_attention.prepare_cache`, so the fast path also covers layers that do not exist yet).
        self.layer_setup = None
        # Decode steps replayed from CUDA graphs by a model with `cuda_graphs.install` (set by `prepare_cache`).
        self.cuda_graphs = False

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                layer = self.layer_class(self.method_config, layer_idx=len(self.layers))
                if self.layer_setup is not None:
                    self.layer_setup(layer)
                self.layers.append(layer)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def reset(self):
        super().reset()
        self.token_ids = None

    @property
    def quantized_layers(self) -> list[QuantizedLayer]:
        return [layer for layer in self.layers if isinstance(layer, QuantizedLayer)]

    def memory_footprint(self) -> dict[str, int]:
        """Bytes held by this cache: codes, metadata (norms, scales, zero points, means), the full-precision window
        of the quantized layers, the layers kept unquantized (sliding-window ones), and the total."""
        out = {"codes": 0, "metadata": 0, "window": 0, "unquantized_layers": 0}
        for layer in self.layers:
            if isinstance(layer, QuantizedLayer):
                for key, value in layer.memory_footprint().items():
                    out[key] += value
            elif getattr(layer, "is_initialized", False) and layer.keys is not None:
                out["unquantized_layers"] += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        out["total"] = sum(out.values())
        return out

    def __repr__(self):
        return f"{type(self).__name__}({self.method_config}, layers={len(self.layers)})"
