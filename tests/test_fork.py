"""Prefix reuse (tq_transformers.fork): forks and deep copies share the quantized history, continue exactly as an
unforked cache, account their memory, and nothing writes into a shared tensor (the static layout included)."""

from __future__ import annotations

import copy

import pytest
import torch

from tq_transformers import estimate_cache_bytes
from tq_transformers.fork import distinct_bytes
from tq_transformers.static_layout import StaticLayout, StaticShared

from cases import PLUMBING, case, continue_greedy, one_thread, params, prefill, random_ids

PREFIX, QUESTION, NEW = 50, 6, 30  # the window is 16 tokens: the continuation flushes twice after the fork

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)




def _shared_tensors(cache):
    return [t for layer in cache.quantized_layers for segment in layer.shared for t in segment.values()]


@pytest.mark.parametrize("c", params(*PLUMBING))
def test_fork_and_deepcopy_continue_exactly_as_an_unforked_cache(tiny_model, c):
    model = tiny_model("llama")
    prefix = random_ids(length=PREFIX)
    questions = [torch.cat([prefix, random_ids(length=QUESTION, seed=s)], dim=1) for s in (2, 3)]
    references = [continue_greedy(model, q, prefill(model, prefix, c.cache(model.config)), NEW) for q in questions]

    original = prefill(model, prefix, c.cache(model.config))
    at_fork = original.quantized_layers[0].num_quantized
    forks = [original.fork(), copy.deepcopy(original)]
    assert _shared_tensors(forks[0]) and all(  # the history is shared, not copied
        a is b for f in forks for a, b in zip(_shared_tensors(f), _shared_tensors(original)))
    runs = [(forks[0], 0), (forks[1], 0), (original, 1)]  # the original continues after its forks
    for cache, q in runs:
        seq, scores = continue_greedy(model, questions[q], cache, NEW)
        assert torch.equal(seq, references[q][0]), f"{c.id}: a fork diverged from the unforked cache"
        assert torch.equal(scores, references[q][1])
    for cache, _ in runs:  # every fork flushed at least twice after forking, into its own storage
        assert all(layer.storage and layer.num_quantized >= at_fork + 2 * layer.cfg.flush_size
                   for layer in cache.quantized_layers)


@pytest.mark.parametrize("c", params(*PLUMBING))
def test_forks_share_the_history_and_account_for_it(tiny_model, c):
    model = tiny_model("llama")
    prefix = random_ids(length=PREFIX)
    original = prefill(model, prefix, c.cache(model.config))
    alone = distinct_bytes(original)
    assert alone == original.memory_footprint()["total"]  # nothing shared yet: every byte counted once
    forks = [original.fork() for _ in range(4)]
    history = original.memory_footprint()["codes"] + original.memory_footprint()["metadata"]
    for cache in (original, *forks):
        split = cache.memory_sharing()
        assert split["shared"] == history and split["own"] == cache.memory_footprint()["window"]
        assert split["total"] == cache.memory_footprint()["total"]
    window = original.memory_footprint()["window"]
    assert distinct_bytes(original, *forks) == alone + 4 * window  # the forks pay for their windows only

    ids = torch.cat([prefix, random_ids(length=QUESTION, seed=2)], dim=1)
    seq, _ = continue_greedy(model, ids, forks[0], NEW)
    held = seq.shape[1] - 1
    got = forks[0].memory_footprint()
    want = estimate_cache_bytes(model.config, held, method=c.method, dtype=torch.float32,
                                **c.settings_for(head_dim=64))
    assert got == want  # a fork's footprint counts everything it reads, like any cache
    split = forks[0].memory_sharing()
    assert split["shared"] == history and split["own"] == got["total"] - history
    assert distinct_bytes(original, *forks) == alone + 3 * window + split["own"]


def test_fork_of_a_hybrid_model_and_of_a_fork(tiny_model):
    model = tiny_model("gemma3")
    c = case("kivi2")
    prefix = random_ids(length=PREFIX)
    ids = torch.cat([prefix, random_ids(length=QUESTION, seed=2)], dim=1)
    unforked = prefill(model, prefix[:, 40:], prefill(model, prefix[:, :40], c.cache(model.config)))
    # the same chunks: a chunked prefill attends to packed tokens
    reference = continue_greedy(model, ids, unforked, NEW)
    first = prefill(model, prefix[:, :40], c.cache(model.config)).fork()
    second = prefill(model, prefix[:, 40:], first).fork()  # a fork of a fork that flushed: two shared segments
    assert len(second.quantized_layers[0].shared) == 2
    seq, scores = continue_greedy(model, ids, second, NEW)
    assert torch.equal(seq, reference[0]) and torch.equal(scores, reference[1])


def _fill(cache, tokens, gen, layers=2):
    for _ in range(tokens):
        for layer_idx in range(layers):
            cache.update(torch.randn(1, 2, 1, 64, generator=gen), torch.randn(1, 2, 1, 64, generator=gen), layer_idx)


@pytest.mark.parametrize("name", ["turboquant4", "kivi2", "bonsai-improved"])
def test_static_layout_never_writes_into_shared_tensors(name):
    gen = torch.Generator().manual_seed(0)
    base = case(name).cache(head_dim=64)
    for layer_idx in range(2):
        base.update(torch.randn(1, 2, 70, 64, generator=gen), torch.randn(1, 2, 70, 64, generator=gen), layer_idx)
    sibling = base.fork()
    static = base.fork()
    shared = _shared_tensors(sibling)
    before = [t.clone() for t in shared]
    with pytest.raises(ValueError, match="owns its storage"):  # the layout refuses a layer that still shares
        StaticLayout.build(static.layers[0], 512, None)

    layout = StaticShared(torch.zeros(3, dtype=torch.int64), torch.ones(1, 1024, dtype=torch.bool))
    for layer in static.layers:
        layer.enter_static(512, layout)
        layer.fast_path = lambda layer, k, v: (k, v)  # the static decode step needs a fast-path hook
    buffers = {t.untyped_storage().data_ptr() for layer in static.layers
               for t in (*layer.static.reserved.values(), layer.static.win_k, layer.static.win_v)}
    assert buffers.isdisjoint(t.untyped_storage().data_ptr() for t in shared)
    _fill(static, 40, gen)  # in-place decode steps and flushes in the static layout
    static.reorder_cache(torch.tensor([0]))  # a beam reorder in place
    assert all(layer.static is not None for layer in static.layers)
    assert all(torch.equal(a, b) for a, b in zip(shared, before))

    # the two forks that stayed dynamic continue alike (the same new tokens): nothing of theirs was written
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for cache, g in ((sibling, gen_a), (base, gen_b)):
        _fill(cache, 40, g)
    for a, b in zip(sibling.layers, base.layers):
        for x, y in zip(a.dequantize(torch.float32), b.dequantize(torch.float32)):
            assert torch.equal(x, y)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_crop_and_reorder_of_a_fork_leave_its_siblings_alone(tiny_model):
    c = case("turboquant4")
    model = tiny_model("llama")
    prefix = random_ids(batch=2, length=PREFIX)
    original = prefill(model, prefix, c.cache(model.config))
    want = [x.clone() for layer in original.quantized_layers for x in layer.dequantize(torch.float32)]
    a, b = original.fork(), copy.deepcopy(original)
    a.crop(-30)  # into the packed tokens: 20 kept
    b.reorder_cache(torch.tensor([1, 0]))
    assert a.get_seq_length() == 20 and not a.quantized_layers[0].shared and not b.quantized_layers[0].shared
    got = [x for layer in original.quantized_layers for x in layer.dequantize(torch.float32)]
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    flipped = [x for layer in b.quantized_layers for x in layer.dequantize(torch.float32)]
    assert all(torch.equal(x, y.flip(0)) for x, y in zip(flipped, want))


def test_a_fork_on_the_fast_path_takes_its_own_copy_and_continues_exactly(tiny_model, monkeypatch):
    from tq_transformers import cpu_attention, fast_attention

    # the fast path's exact fallback (on the CPU, cpu_attention is a different float32 computation)
    monkeypatch.setattr(cpu_attention, "supported", lambda keys, values: False)

    c = case("turboquant4")
    model = tiny_model("llama")
    prefix = random_ids(length=PREFIX)
    ids = torch.cat([prefix, random_ids(length=QUESTION, seed=2)], dim=1)
    reference = continue_greedy(model, ids, prefill(model, prefix, c.cache(model.config)), NEW)
    fast_attention.install(model)  # "tq_fused": on the CPU the fast path's fallback, the reference path's math
    original = fast_attention.prepare_cache(prefill(model, prefix, c.cache(model.config)))
    fork = original.fork()
    history = _shared_tensors(fork)
    seq, scores = continue_greedy(model, ids, fork, NEW)
    assert torch.equal(seq, reference[0]) and torch.equal(scores, reference[1])
    assert all(not layer.shared for layer in fork.quantized_layers)  # the kernels read one tensor per piece
    assert fork.memory_sharing()["shared"] == 0
    assert all(a is b for a, b in zip(_shared_tensors(original), history))  # the original still reads its segments


def test_benchmark_fork_script_figures(tmp_path):
    """scripts/benchmark_fork.py's fork mode at a small size: its figures are the ones the tests check above."""
    import argparse
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
    benchmark_fork = pytest.importorskip("benchmark_fork")
    args = argparse.Namespace(method="kivi2", tokens=300, layers=1, forks=2, new_tokens=40)
    out = benchmark_fork.run_fork(args, torch.device("cpu"), torch.float32)
    ways = out["ways"]
    window = out["prefix_window_bytes"]
    assert ways["full_copy"]["added_bytes_after_forking"] == 2 * out["prefix_bytes"]
    for way in ("fork", "deepcopy"):
        assert ways[way]["added_bytes_after_forking"] == 2 * window
        assert ways[way]["one_copy_after_decoding"]["shared"] == out["prefix_bytes"] - window
    assert ways["fork"]["group_bytes_after_decoding"] < ways["full_copy"]["group_bytes_after_decoding"]
