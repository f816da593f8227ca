"""The static layout of a quantized layer: fixed shapes and addresses, so a decode step replays from a CUDA graph.

The graph runner (``tq_transformers.cuda_graphs``) moves every layer of a cache into this layout and then uses only
the layer's public protocol: ``enter_static`` / ``leave_static``, ``settle``, ``write_step_counts``, ``advance_one``
and ``static`` (this object, or None). Anything other than a single-token step of the fast path (a prefill, crop,
reorder, reset) makes the layer leave the layout first.

In the layout:

- each growing storage entry is held in a buffer of ``capacity`` packed tokens (``reserved``); ``layer.storage``
  entries are views of their first ``num_quantized`` tokens;
- the window lives in ``win_k`` / ``win_v`` ``[B, H, S + R + F, D]``: the layer's S exact sink tokens (``sink_tokens``;
  they never change once held) in the first S slots, ``layer.sink_keys`` / ``layer.sink_values`` views of them, then
  the live window, of which ``layer.keys`` / ``layer.values`` are views. After a flush the live tokens begin at
  ``S + start`` until they are moved to the front (``settle``: by the graph runner at the end of a flushing step's
  graph, else before the next step), so the flushing step's attention still reads the window it attended to;
- the kernels read the window buffers as one full-precision run after the packed tokens: the sinks, then the live
  window (attention does not depend on the order of the keys). So the counts and the mask are in *kernel order*::

      cache order    [sinks S | packed n | window w]     (the model's mask: generate's [B, S + n + w])
      kernel order   [packed n | sinks S, window w]      (``StaticShared.key_mask``; ``sinks_after_packed``)

- the counts a step needs are on the device, in ``StaticShared.lengths`` (shared by all layers of the cache); a
  flush writes its block at the offset ``lengths[0]`` (the packed tokens before it) read on the device, so a step
  that flushes replays from a CUDA graph too.

Each operation that changes the layer has a device part (kernels: what a graph replays) and a host part (counters
and views: what the runner redoes after a replay, ``advance_one`` / ``advance_flush``); one function each.

Ownership: the layout writes in place (flushes, beam reorders, the window) only into the buffers it allocates here.
A forked layer's shared segments (``QuantizedKVLayer.shared``, read by its other forks) are copied into the buffers
when the layout is built (the layer consolidates first; ``build`` refuses a layer that still shares any) and never
written.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["StaticLayout", "StaticShared", "sinks_after_packed", "sinks_before_packed"]


def _compact(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def _swap_leading(mask: torch.Tensor, first: int, second: int) -> torch.Tensor:
    """``[..., first | second | rest]`` -> ``[..., second | first | rest]`` on the last dim."""
    if not first or not second:
        return mask
    return torch.cat([mask[..., first:first + second], mask[..., :first], mask[..., first + second:]], dim=-1)


def sinks_after_packed(mask: torch.Tensor, sinks: int, packed: int) -> torch.Tensor:
    """A key mask's last dim from cache order ``[sinks | packed | window]`` to kernel order ``[packed | sinks, window]``
    (module docstring); unchanged without sinks. ``sinks_before_packed`` is the inverse.

    Args:
        mask: ``[..., sinks + packed + w]`` (bool or additive float: the columns move, the values do not change).
        sinks: S, the exact sink tokens; packed: n, the packed tokens attended.
    Returns:
        ``[..., packed + sinks + w]``.
    """
    return _swap_leading(mask, sinks, packed)


def sinks_before_packed(mask: torch.Tensor, sinks: int, packed: int) -> torch.Tensor:
    """A key mask's last dim from kernel order back to cache order (the inverse of ``sinks_after_packed``)."""
    return _swap_leading(mask, packed, sinks)


@dataclasses.dataclass
class StaticShared:
    """What all layers of a cache in the static layout share.

    lengths: int64 ``[3]`` on the device: packed tokens the step attends to, window tokens it attends to (its own
        included), and the window slot the new token goes to.
    key_mask: ``[B, capacity + S + R + F]`` bool on the device, True = attend, in kernel order (module docstring).
    graph_step: True while the graph runner captures a step; it then writes the counts and the mask to the device
        itself before every replay. In an eager step each layer writes ``lengths`` and the model's own mask is used.
    """

    lengths: torch.Tensor
    key_mask: torch.Tensor
    graph_step: bool = False

    def write_mask(self, mask: torch.Tensor | None, sinks: int, packed: int) -> None:
        """Write the next step's padding mask into ``key_mask``, in kernel order.

        Args:
            mask: generate's ``[B, S + n + w]`` mask in cache order (1 / True = attend), or None (all attended).
            sinks: S, the exact sink tokens of every layer; packed: n, the packed tokens the step attends to.
        """
        if mask is None:
            self.key_mask.fill_(True)
            return
        self.key_mask[:, : mask.shape[-1]].copy_(sinks_after_packed(mask, sinks, packed))

    def host_state(self, layers: list) -> list[tuple]:
        """What a step changes on the host side of `layers` (counters, views, the window start), for a capture (which
        runs the step's Python but no step) to undo."""
        return [(layer.cumulative_length, layer.num_quantized, layer.keys, layer.values, dict(layer.storage),
                 layer.static.start) for layer in layers]

    @staticmethod
    def restore_host_state(layers: list, saved: list[tuple]) -> None:
        """Put back what `host_state` returned."""
        for layer, (length, quantized, keys, values, storage, start) in zip(layers, saved, strict=True):
            layer.cumulative_length, layer.num_quantized, layer.keys, layer.values = length, quantized, keys, values
            layer.storage, layer.static.start = storage, start


@dataclasses.dataclass
class StaticLayout:
    """Preallocated buffers of one layer (module docstring)."""

    capacity: int
    shared: StaticShared
    reserved: dict[str, torch.Tensor]
    win_k: torch.Tensor
    win_v: torch.Tensor
    offsets: dict[str, torch.Tensor]  # per growing entry: arange(entries one flush adds), on the device
    found: torch.Tensor  # bool [1] on the device: non-finite values in a block a graph step flushed (reported after)
    start: int = 0  # the live window begins at slot sinks + start (after a flush, until settled)
    sinks: int = 0  # S: the exact sink tokens in the window buffers' first slots

    @classmethod
    def build(cls, layer, capacity: int, shared: StaticShared) -> StaticLayout:
        """Move `layer`'s storage and window into new buffers with room for `capacity` packed tokens."""
        F, R = layer.cfg.flush_size, layer.cfg.residual_length
        if layer.num_quantized == 0:
            raise ValueError(f"layer {layer.layer_idx}: the static layout needs packed tokens (none yet)")
        if capacity % F or capacity < layer.num_quantized:
            raise ValueError(
                f"capacity must be a multiple of flush_size ({F}) and >= {layer.num_quantized} packed tokens, got "
                f"{capacity}"
            )
        if layer.shared:
            raise ValueError(f"layer {layer.layer_idx}: the static layout needs a layer that owns its storage; call "
                             "layer.consolidate() first (its shared segments are read by other forks)")
        S = layer.num_sinks
        if S != layer.cfg.sink_tokens:  # packed tokens come after all sinks (window rule): not reached
            raise ValueError(f"layer {layer.layer_idx}: the static layout needs all {layer.cfg.sink_tokens} sink "
                             f"tokens held, got {S}")
        layer.settle()
        flushes = layer.num_quantized // F
        growing = {name for name in layer.storage if name[2:] not in layer.codecs[name[0]].static_pieces}
        reserved, offsets = {}, {}
        for name in growing:
            t = layer.storage[name]
            per_flush = t.shape[2] // flushes  # entries on dim 2 are proportional to tokens (per token or group)
            buf = t.new_empty((*t.shape[:2], per_flush * (capacity // F), *t.shape[3:]))
            buf[:, :, : t.shape[2]] = t
            reserved[name] = buf
            offsets[name] = torch.arange(per_flush, device=t.device)
            layer.storage[name] = buf[:, :, : t.shape[2]]
        w = layer.keys.shape[-2]
        win_k = layer.keys.new_empty((*layer.keys.shape[:2], S + R + F, layer.keys.shape[-1]))
        win_v = layer.values.new_empty((*layer.values.shape[:2], S + R + F, layer.values.shape[-1]))
        if S:
            win_k[:, :, :S], win_v[:, :, :S] = layer.sink_keys, layer.sink_values
            layer.sink_keys, layer.sink_values = win_k[:, :, :S], win_v[:, :, :S]
        win_k[:, :, S:S + w], win_v[:, :, S:S + w] = layer.keys, layer.values
        layer.keys, layer.values = win_k[:, :, S:S + w], win_v[:, :, S:S + w]
        found = torch.zeros(1, dtype=torch.bool, device=win_k.device)
        return cls(capacity, shared, reserved, win_k, win_v, offsets, found, sinks=S)

    @staticmethod
    def reorder_in_place(layers: list, beam_idx: torch.Tensor) -> bool:
        """Beam search in the static layout: reorder the batch rows of every buffer of `layers` in place, so that a
        captured graph stays valid. Only when every piece that is not a buffer (the centering means) is the same in
        the rows it maps (the beams of one prompt share their prefill's means); returns False, changing nothing,
        otherwise (one device sync either way)."""
        idx = beam_idx.to(layers[0].static.win_k.device)
        same = torch.ones((), dtype=torch.bool, device=idx.device)
        for layer in layers:
            for name, t in layer.storage.items():
                if name not in layer.static.reserved:
                    same &= (t.index_select(0, idx) == t).all()
        if not bool(same):
            return False
        for layer in layers:
            st = layer.static
            for buf in (*st.reserved.values(), st.win_k, st.win_v):
                buf.copy_(buf.index_select(0, idx))
        return True

    def release(self, layer) -> None:
        """Give `layer` back tensors of exactly its tokens (the buffers are freed with this object)."""
        self.settle(layer)
        layer.storage = {name: _compact(t) for name, t in layer.storage.items()}
        layer.keys, layer.values = _compact(layer.keys), _compact(layer.values)
        if self.sinks:
            layer.sink_keys, layer.sink_values = _compact(layer.sink_keys), _compact(layer.sink_values)

    def reserved_storage(self, layer) -> dict[str, torch.Tensor]:
        """`layer.storage` with each growing entry replaced by its whole buffer (``capacity`` packed tokens)."""
        return {**layer.storage, **self.reserved}

    def settle(self, layer) -> None:
        """Move the live window tokens to the front of the window buffers (deferred from the last flush)."""
        if self.start == 0:
            return
        s, w = self.sinks, layer.keys.shape[-2]
        self.win_k[:, :, s:s + w] = layer.keys.clone()
        self.win_v[:, :, s:s + w] = layer.values.clone()
        self._settle_host(layer)

    def _live(self, layer, first: int, end: int) -> None:
        """Point the layer's window views at live slots ``[first, end)`` after the sinks."""
        s = self.sinks
        layer.keys, layer.values = self.win_k[:, :, s + first:s + end], self.win_v[:, :, s + first:s + end]

    def _settle_host(self, layer) -> None:
        self._live(layer, 0, layer.keys.shape[-2])
        self.start = 0

    def write_step_counts(self, layer) -> None:
        """Counts of the next single-token step: packed tokens attended, window-buffer tokens attended (the sinks and
        the live window, the new one included), the new token's slot. Expects a settled window."""
        w = self.sinks + layer.keys.shape[-2]
        self.shared.lengths.copy_(torch.tensor([layer.num_quantized, w + 1, w]))

    def decode_update(self, layer, key_states: torch.Tensor, value_states: torch.Tensor):
        """One decode token: written to the window slot ``lengths[2]`` read on the device (so a CUDA graph replays it
        at any position); the host-side counters advance as in ``layer.update``. A step after which tokens leave the
        window encodes them and writes them at the packed offset ``lengths[0]``, read on the device too."""
        self.settle(layer)
        if not self.shared.graph_step:
            self.write_step_counts(layer)
        slot = self.shared.lengths[2:3]
        self.win_k.index_copy_(2, slot, key_states.to(self.win_k.dtype))
        self.win_v.index_copy_(2, slot, value_states.to(self.win_v.dtype))
        out_k, out_v = layer.fast_path(layer, self.win_k, self.win_v)
        self.advance_one(layer)
        target = layer.cfg.num_quantized(layer.cumulative_length)
        if target > layer.num_quantized:
            self._flush(layer, target - layer.num_quantized)
        return out_k, out_v

    def advance_one(self, layer) -> None:
        """The host side of a non-flushing step (the graph runner calls it after each replay)."""
        layer.cumulative_length += 1
        self._live(layer, 0, layer.keys.shape[-2] + 1)

    def flushes_next(self, layer) -> bool:
        """Whether the next single-token step moves tokens out of the window (then `flush_size` of them)."""
        return layer.cfg.num_quantized(layer.cumulative_length + 1) > layer.num_quantized

    def advance_flush(self, layer) -> None:
        """The host side of a flushing step whose graph settled the window at its end (after a replay)."""
        self.advance_one(layer)
        self._flush_host(layer, layer.cfg.flush_size)
        self._settle_host(layer)
        layer.non_finite.report(self.found, f"the keys or values of layer {layer.layer_idx}")
        self.found.zero_()  # after the report's copy, in stream order

    def _flush(self, layer, count: int) -> None:
        if layer.num_quantized + count > self.capacity:
            raise RuntimeError(
                f"layer {layer.layer_idx}: the static layout holds {self.capacity} packed tokens, a flush needs "
                f"{layer.num_quantized + count}; enter_static again with a larger capacity first"
            )
        if count != layer.cfg.flush_size:  # decode steps flush one block; the offsets below are per block
            raise RuntimeError(
                f"layer {layer.layer_idx}: a static flush moves {layer.cfg.flush_size} tokens, not {count}"
            )
        s = self.sinks
        block = layer.encode_block(self.win_k[:, :, s:s + count], self.win_v[:, :, s:s + count],
                                   found=self.found if self.shared.graph_step else None)
        first = self.shared.lengths[0] // count  # blocks held before this one, read on the device
        for name, t in block.items():
            self.reserved[name].index_copy_(2, first * t.shape[2] + self.offsets[name], t)
        self._flush_host(layer, count)

    def _flush_host(self, layer, count: int) -> None:
        for name, idx in self.offsets.items():
            held = layer.storage[name].shape[2]
            layer.storage[name] = self.reserved[name][:, :, : held + idx.numel()]
        layer.num_quantized += count
        self._live(layer, count, layer.keys.shape[-2])
        self.start = count
