"""Prefix reuse: forks of a filled cache that share its quantized history (copy-on-write).

transformers documents the pattern: prefill a shared prompt once, then ``copy.deepcopy(cache)`` for each question.
With a quantized cache, both ``copy.deepcopy(cache)`` and the cheaper ``cache.fork()`` share the packed history
between the copies instead of duplicating it::

    prefix = TurboQuantCache(model.config, bits=4)
    model(**document, past_key_values=prefix)              # prefill once
    answers = []
    for question in questions:
        cache = prefix.fork()                               # the window and counters are copied, the history shared
        answers.append(model.generate(..., cache=cache))

How (``QuantizedKVLayer.fork``): forking freezes a layer's packed storage into a shared segment that neither the
original nor any fork ever writes; each then appends its own flushes to its own storage, so a fork pays only for its
window and the tokens it adds. Every fork continues exactly as a deep copy of the whole state would (tested for every
method). Three things give a fork a copy of the history of its own (documented costs, not errors): the fused kernels
of the eager fast path and the CUDA-graph static layout read one tensor per piece (at its first fast decode step the
fork takes its segments as its own storage, still the same tensors while nothing was added, and its next flush then
appends by copying, as any cache's flush does; the static layout copies when it is built); a crop into the packed
tokens and a batch reorder (beam search) rebuild the storage anyway. A cache in the static layout is forked by
copying (its buffers are written in place).

Memory: ``memory_footprint()`` of a fork counts everything it can read (equal to ``estimate_cache_bytes``), its own
and the shared segments; ``memory_sharing()`` splits that total, and ``distinct_bytes(*caches)`` counts what a group
of forks holds together, each tensor once.
"""

from __future__ import annotations

import copy

import torch

__all__ = ["distinct_bytes", "fork_cache"]


def fork_cache(cache):
    """A fork of `cache` (``QuantizedKVCache.fork``): the same class and settings, its own layers and token ids.

    Quantized layers fork (``QuantizedKVLayer.fork``: shared packed history, own window); other layers (the
    sliding-window ones of hybrid models, a few window-sized tensors) are deep-copied.

    Args:
        cache: a ``QuantizedKVCache``.
    Returns:
        the new cache.
    """
    from .layer import QuantizedKVLayer

    new = object.__new__(type(cache))
    new.__dict__.update(vars(cache))
    new.layers = [layer.fork() if isinstance(layer, QuantizedKVLayer) else copy.deepcopy(layer)
                  for layer in cache.layers]
    new.token_ids = None if cache.token_ids is None else cache.token_ids.clone()
    return new


def distinct_bytes(*caches) -> int:
    """Bytes the tensors of `caches` hold together, each storage counted once (a group of forks shares its history).

    Args:
        *caches: tq_transformers caches (or transformers caches).
    Returns:
        the bytes of the distinct tensor storages their layers reference.
    """
    seen: dict[tuple, int] = {}
    for cache in caches:
        for layer in cache.layers:
            for t in _layer_tensors(layer):
                storage = t.untyped_storage()
                seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def _layer_tensors(layer):
    for value in vars(layer).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            yield from (t for t in value.values() if isinstance(t, torch.Tensor))
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    yield from (t for t in item.values() if isinstance(t, torch.Tensor))
    static = getattr(layer, "static", None)
    if static is not None:
        yield from (*static.reserved.values(), static.win_k, static.win_v)
