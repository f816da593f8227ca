"""The CUDA-graph static layout on the CPU: entering and leaving it, and beam-search reorders in place."""

from __future__ import annotations

import copy

import pytest
import torch

from tq_transformers import BonsaiCache, KIVICache, TurboQuantCache
from tq_transformers.static_layout import StaticShared

CACHES = {
    "turboquant": lambda: TurboQuantCache(flush_size=16),
    "kivi": lambda: KIVICache(group_size=16, residual_length=16),
    "bonsai-improved": lambda: BonsaiCache.improved(group_size=64, flush_size=16, residual_length=16),
    # exact sink tokens: the window buffers' first slots in the layout
    "turboquant-sinks": lambda: TurboQuantCache(flush_size=16, sink_tokens=4),
    "kivi-sinks": lambda: KIVICache(group_size=16, residual_length=16, sink_tokens=4),
}


def _filled(name, rows_alike: bool, seed=0):
    """A two-layer cache of 2 rows after a 70-token prefill and 3 decode tokens (rows differ in the decode tokens;
    in the prefill too unless `rows_alike`)."""
    gen = torch.Generator().manual_seed(seed)
    cache = CACHES[name]()
    for layer_idx in range(2):
        k = torch.randn(1 if rows_alike else 2, 2, 70, 64, generator=gen).expand(2, -1, -1, -1).clone()
        v = torch.randn(1 if rows_alike else 2, 2, 70, 64, generator=gen).expand(2, -1, -1, -1).clone()
        cache.update(k, v, layer_idx)
    for _ in range(3):
        for layer_idx in range(2):
            cache.update(torch.randn(2, 2, 1, 64, generator=gen), torch.randn(2, 2, 1, 64, generator=gen), layer_idx)
    return cache


def _enter(cache):
    shared = StaticShared(torch.zeros(3, dtype=torch.int64), torch.ones(2, 1024, dtype=torch.bool))
    for layer in cache.layers:
        layer.enter_static(512, shared)
        layer.fast_path = lambda layer, k, v: (k, v)  # the static decode step needs a fast-path hook


def _state(cache):
    return [(*layer.dequantize(torch.float32), layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


@pytest.mark.parametrize("name", list(CACHES))
def test_reorder_in_place_keeps_the_layout_and_equals_a_dynamic_reorder(name):
    cache = _filled(name, rows_alike=True)
    dynamic = copy.deepcopy(cache)
    _enter(cache)
    buffers = [layer.static for layer in cache.layers]
    beam_idx = torch.tensor([1, 1])
    cache.reorder_cache(beam_idx)
    dynamic.reorder_cache(beam_idx)
    assert [layer.static for layer in cache.layers] == buffers  # same layout objects: a captured graph stays valid
    assert all(layer.static is not None for layer in cache.layers)
    for got, want in zip(_state(cache), _state(dynamic)):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["turboquant", "bonsai-improved", "turboquant-sinks"])
def test_reorder_that_changes_the_means_leaves_the_layout(name):
    cache = _filled(name, rows_alike=False)  # each row has its own centering means
    dynamic = copy.deepcopy(cache)
    _enter(cache)
    beam_idx = torch.tensor([1, 0])
    cache.reorder_cache(beam_idx)
    dynamic.reorder_cache(beam_idx)
    assert all(layer.static is None for layer in cache.layers)
    for got, want in zip(_state(cache), _state(dynamic)):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(CACHES))
def test_enter_and_leave_static_keep_every_token(name):
    cache = _filled(name, rows_alike=False)
    before = _state(cache)
    _enter(cache)
    held = cache.memory_footprint()["total"]
    for layer in cache.layers:
        layer.leave_static()
    assert cache.memory_footprint()["total"] < held  # the reserved capacity is given back
    for got, want in zip(_state(cache), before):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["turboquant-sinks", "kivi-sinks"])
def test_fork_and_save_of_a_static_cache_with_sinks_own_their_tokens(name, tmp_path):
    """A fork taken in the static layout owns copies of the sink tokens (the original's are views of window buffers
    that beam search reorders in place), and a saved cache holds exactly its tokens."""
    cache = _filled(name, rows_alike=name == "turboquant-sinks")  # KIVI has no means: rows may differ, sinks too
    _enter(cache)
    fork = cache.fork()
    before = _state(fork)
    cache.reorder_cache(torch.tensor([1, 1]))  # in place: the original's buffers, sinks among them
    assert all(layer.static is not None for layer in cache.layers)
    for layer in fork.layers:
        assert layer.static is None and layer.sink_keys.untyped_storage().nbytes() == layer.sink_keys.nbytes
    for got, want in zip(_state(fork), before):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    path = tmp_path / "cache.safetensors"
    cache.save(path)
    loaded = type(cache).load(path, None)
    for got, want in zip(_state(loaded), _state(cache)):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
