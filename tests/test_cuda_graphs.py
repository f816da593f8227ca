"""CUDA-graph decoding (`tq_transformers.cuda_graphs`) and the static layout it runs on (`static_layout`).

CPU: the graph runner with an emulated graph (each replay re-runs the captured forward with the runner's device-side
counts and mask, then restores the host state as a real replay leaves it): greedy generation gives exactly the
reference path's scores and tokens, through flushes, regrowths of the capacity and left padding; and the layout's
own operations (leave, crop, reorder, footprint). GPU: real graphs against the eager fast path.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import os

import pytest
import torch

import tq_transformers
from tq_transformers import cuda_graphs, fast_attention, fusion, kernels
from tq_transformers.fast_attention import attn_implementation_of
from tq_transformers.generation import CACHE_KWARG
from tq_transformers.static_layout import StaticShared

from cases import COMMON, CPU_FAST_ATOL, FAST, SHORT, assert_valid_tokens, build_tiny, case, needs_gpu, params
from cases import generate_with_scores as _generate
from cases import padded_inputs as _inputs


@contextlib.contextmanager
def _capturing():
    """What code running inside a CUDA-graph capture sees: transformers then builds its masks without syncing (and
    without the padding, which the runner hands over through the layout)."""
    real = torch.cuda.is_current_stream_capturing
    torch.cuda.is_current_stream_capturing = lambda: True
    try:
        yield
    finally:
        torch.cuda.is_current_stream_capturing = real


class _EmulatedGraph:
    """Stands in for a CUDA graph on the CPU: replay runs the captured call again as a graph step, then puts the host
    state back (a real replay runs no Python)."""

    def __init__(self, fn, layers):
        self.fn, self.layers = fn, layers
        self.output = None

    def replay(self):
        shared = self.layers[0].static.shared
        saved = shared.host_state(self.layers)
        shared.graph_step = True
        try:
            with _capturing():
                new = self.fn()
        finally:
            shared.graph_step = False
            shared.restore_host_state(self.layers, saved)
        self.output.logits.copy_(new.logits)


def _emulate(fn, layers):
    """A real capture runs no kernel; this one runs the step for an output of the right shapes (with the counts the
    replay will be given), then puts the layout's buffers back as they were (a flushing step moves the window)."""
    graph = _EmulatedGraph(fn, layers)
    layers[0].write_step_counts()
    buffers = [b for layer in layers for b in (*layer.static.reserved.values(), layer.static.win_k,
                                               layer.static.win_v, layer.static.found)]
    before = [b.clone() for b in buffers]
    with _capturing():
        graph.output = fn()
    for b, old in zip(buffers, before):
        b.copy_(old)
    return graph, graph.output


@pytest.fixture
def emulated_graphs(monkeypatch):
    """CUDA graphs emulated on the CPU. ``_capture_graph(fn)`` is handed only the step; the layers it runs on are
    those the runner found for the step (``_graph_layers``) just before capturing, kept here in a closure."""
    found = {}
    graph_layers = cuda_graphs._graph_layers

    def recording(cache, *args):
        layers = graph_layers(cache, *args)
        if layers is not None:
            found["layers"] = layers
        return layers

    monkeypatch.setattr(cuda_graphs, "_on_graph_device", lambda layer: True)
    monkeypatch.setattr(cuda_graphs, "_graph_layers", recording)
    monkeypatch.setattr(cuda_graphs, "_capture_graph", lambda fn: _emulate(fn, found["layers"]))
    monkeypatch.setattr(cuda_graphs, "GROWTH", 16)  # regrow the capacity every 16 packed tokens


def _graphed_generate(model, inputs, c, new_tokens=40, fuse=False, **overrides):
    tq_transformers.enable(model, c.method, fast=True, cuda_graphs=True, fuse=fuse,
                           **c.kwargs(model.config, **overrides))
    try:
        cache = c.cache(model.config, **overrides)
        fast_attention.prepare_cache(cache, cuda_graphs=True)
        seq, scores = _generate(model, inputs, cache, new_tokens)
        stats = dict(cuda_graphs.runner_of(model).stats)
    finally:
        tq_transformers.disable(model)
    assert cuda_graphs.runner_of(model) is None and "forward" not in vars(model)
    return seq, scores, cache, stats


@pytest.mark.parametrize("c", params(*FAST))
def test_emulated_graph_generate_equals_reference(c, emulated_graphs):
    model = build_tiny("llama")
    inputs = _inputs("cpu")
    ref_seq, ref_scores = _generate(model, inputs, c.cache(model.config), 40)
    seq, scores, cache, stats = _graphed_generate(model, inputs, c)
    assert stats["replay"] > 10 and stats["capture"] >= 2 and stats["layout"] >= 2, stats
    assert all(layer.static is not None for layer in cache.layers)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)


@pytest.mark.parametrize("c", params(*FAST))
def test_emulated_flush_steps_replay_from_their_graph(c, emulated_graphs, monkeypatch):
    """With room for several flushes between regrowths, the steps after which tokens leave the window replay from a
    graph of their own (the block written at the device-side offset, the window moved at the graph's end): the same
    tokens and scores as the reference path, exactly."""
    monkeypatch.setattr(cuda_graphs, "GROWTH", 64)
    model = build_tiny("llama")
    inputs = _inputs("cpu")
    ref_seq, ref_scores = _generate(model, inputs, c.cache(model.config), 100)
    seq, scores, cache, stats = _graphed_generate(model, inputs, c, new_tokens=100)
    assert stats.get("replay_flush", 0) >= 2 and stats["capture"] >= 2, stats
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)


@pytest.mark.parametrize("growth", [16, 64], ids=["regrow-every-flush", "flush-graphs"])
@pytest.mark.parametrize("c", params(*SHORT, "turboquant2.5", "turboquant-k4v2"))
def test_emulated_graph_generate_with_sink_tokens_equals_reference(c, growth, emulated_graphs, monkeypatch):
    """Exact sink tokens in the static layout (the window buffers' first slots; the mask in the kernels' order of the
    tokens): the steps replay from their graphs, flushing ones too, and give exactly the reference path's tokens and
    scores; also with a fractional value rate and per-side bits (the first-budget preset's formats). The left-padded
    row's sinks are padding, so a mask column in the wrong place changes its scores."""
    monkeypatch.setattr(cuda_graphs, "GROWTH", growth)
    model = build_tiny("llama")
    inputs = _inputs("cpu")
    ref_seq, ref_scores = _generate(model, inputs, c.cache(model.config, sink_tokens=4), 60)
    seq, scores, cache, stats = _graphed_generate(model, inputs, c, new_tokens=60, sink_tokens=4)
    assert stats["replay"] > 10 and stats["capture"] >= 2, stats
    assert stats.get("replay_flush", 0) >= 1 if growth > 16 else stats["layout"] >= 2, stats
    assert all(layer.static is not None and layer.num_sinks == 4 for layer in cache.layers)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)


def _force_kernel_branch(monkeypatch, kernel) -> list[bool]:
    """Make ``tq_fused_attention`` take its GPU-kernel branch on the CPU, with `kernel` (``kernels.decode_attention``'s
    signature) in place of the GPU kernels. Returns the list that each call appends to: whether it had device
    counts (a static-layout step)."""
    calls = []

    def kernel_call(**kwargs):
        calls.append(kwargs["lengths"] is not None)
        return kernel(**kwargs)

    monkeypatch.setattr(fast_attention, "_on_kernel_device", lambda query: True)
    monkeypatch.setattr(kernels, "decode_attention", kernel_call)
    return calls


@pytest.mark.parametrize("c", params(*SHORT))
def test_emulated_graph_kernel_arguments_with_sink_tokens(c, emulated_graphs, monkeypatch):
    """What the GPU kernel is handed in the static layout with sinks (the whole window buffers, the device counts,
    the mask in kernel order), checked on the CPU: the fused branch of ``tq_fused_attention`` forced, with the
    kernels' PyTorch reference (same signature, counts read on the host) in place of the GPU kernel. Its float32
    attention differs from the reference path's SDPA by rounding only: the same tokens, scores within
    CPU_FAST_ATOL."""
    monkeypatch.setattr(cuda_graphs, "GROWTH", 64)
    calls = _force_kernel_branch(monkeypatch, kernels.reference.decode_attention)
    model = build_tiny("llama")
    inputs = _inputs("cpu")
    ref_seq, ref_scores = _generate(model, inputs, c.cache(model.config, sink_tokens=4), 60)
    seq, scores, cache, stats = _graphed_generate(model, inputs, c, new_tokens=60, sink_tokens=4)
    assert stats["replay"] > 10 and stats.get("replay_flush", 0) >= 1, stats
    assert sum(calls) > 10 * len(cache.layers)  # the static layout's steps went through the kernel's branch
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=CPU_FAST_ATOL)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                    reason="runs the Triton kernels under Triton's CPU interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("c", params("turboquant4", "turboquant2.5"))
def test_interpreted_triton_kernels_under_emulated_graphs_with_sink_tokens(c, emulated_graphs, monkeypatch):
    """The same with the Triton decode kernels themselves (split + reduce, run by Triton's interpreter on the CPU):
    the reduce kernel reads the sinks at the front of the static window buffers through the device counts. The
    reference path's tokens; scores within 1e-3 (the kernels' float32 summation order)."""
    monkeypatch.setattr(cuda_graphs, "GROWTH", 64)
    calls = _force_kernel_branch(monkeypatch, functools.partial(kernels.decode_attention, impl="triton_only"))
    model = build_tiny("llama")
    inputs = _inputs("cpu")
    ref_seq, ref_scores = _generate(model, inputs, c.cache(model.config, sink_tokens=4), 40)
    seq, scores, cache, stats = _graphed_generate(model, inputs, c, new_tokens=40, sink_tokens=4)
    assert stats["replay"] > 5 and sum(calls) > 5 * len(cache.layers), stats
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-3)


def test_graph_runner_beam_search_with_sink_tokens_equals_reference(emulated_graphs):
    """Beam reorders in place in the static layout move the sink tokens with their rows (they are views of the
    window buffers)."""
    model = build_tiny("llama")
    inputs = _inputs("cpu")
    c = case("turboquant4")
    ref = model.generate(**inputs, num_beams=2, max_new_tokens=20, do_sample=False,
                         **{CACHE_KWARG: c.cache(model.config, sink_tokens=4)})
    tq_transformers.enable(model, c.method, fast=True, cuda_graphs=True, **c.kwargs(model.config, sink_tokens=4))
    try:
        got = model.generate(**inputs, num_beams=2, max_new_tokens=20, do_sample=False)
        stats = dict(cuda_graphs.runner_of(model).stats)
    finally:
        tq_transformers.disable(model)
    assert stats["layout"] == 1 and stats["replay"] > 10, stats
    assert torch.equal(got, ref)


def test_graph_runner_leaves_other_calls_alone(emulated_graphs):
    """Prefill, a sliding-window model and a call with extra arguments run the original forward (no layout)."""
    model = build_tiny("gemma3")
    inputs = _inputs("cpu")
    seq, scores, cache, stats = _graphed_generate(model, inputs, case("turboquant4"), new_tokens=8)
    assert stats.get("replay", 0) == 0 and stats.get("layout", 0) == 0
    assert all(getattr(layer, "static", None) is None for layer in cache.layers)


def _static_pair(c, n=70, **overrides):
    """A dynamic and a static-layout cache of layer shape [2, 2, *, 64] after the same n tokens (float32, CPU)."""
    caches = [c.cache(head_dim=64, **overrides) for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, n, 64, generator=gen), torch.randn(2, 2, n, 64, generator=gen)
    for cache in caches:
        fast_attention.prepare_cache(cache)
        cache.update(k, v, 0)
    layer = caches[1].layers[0]
    shared = StaticShared(torch.zeros(3, dtype=torch.int64), torch.ones(2, 512, dtype=torch.bool))
    layer.enter_static(layer.num_quantized + 2 * layer.cfg.flush_size, shared)
    return caches, gen


@pytest.mark.parametrize("sinks", [0, 4], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("c", params(*SHORT))
def test_static_layout_holds_what_the_dynamic_one_holds(c, sinks):
    """Token by token through two flushes, a crop and a reorder: the same tokens (dequantized exactly alike, the
    exact sink tokens first), the same counters, and a footprint of the reserved buffers (the sinks in the window
    buffers)."""
    (dyn, sta), gen = _static_pair(c, sink_tokens=sinks)
    ld, ls = dyn.layers[0], sta.layers[0]
    for _ in range(2 * ld.cfg.flush_size):
        k, v = torch.randn(2, 2, 1, 64, generator=gen), torch.randn(2, 2, 1, 64, generator=gen)
        dyn.update(k, v, 0)
        sta.update(k, v, 0)
        assert ls.static is not None
        ls.settle()
        assert (ls.num_quantized, ls.cumulative_length) == (ld.num_quantized, ld.cumulative_length)
        assert torch.equal(ls.keys, ld.keys) and torch.equal(ls.values, ld.values)
        assert ls.num_sinks == ld.num_sinks == sinks
        for a, b in zip(ls.dequantize(torch.float32), ld.dequantize(torch.float32)):
            assert torch.equal(a, b)
    if sinks:
        assert ls.sink_keys.data_ptr() == ls.static.win_k.data_ptr()  # the window buffers' first slots
    held = ls.memory_footprint()
    reserved = sum(t.numel() * t.element_size() for t in ls.static.reserved.values())
    static_pieces = {f"{side}_{p}" for side, codec in ls.codecs.items() for p in codec.static_pieces}
    assert not static_pieces & set(ls.static.reserved)  # the means do not grow: not reserved
    reserved += sum(t.numel() * t.element_size() for n, t in ls.storage.items() if n in static_pieces)
    assert held["codes"] + held["metadata"] == reserved
    assert held["window"] == 2 * ls.static.win_k.numel() * 4
    with pytest.raises(RuntimeError, match="capacity"):  # past the capacity without a new layout
        for _ in range(10 * ld.cfg.flush_size):
            sta.update(torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64), 0)
    # crop and reorder leave the static layout: every tensor owns exactly its bytes again
    (dyn, sta), gen = _static_pair(c, sink_tokens=sinks)
    for cache in (dyn, sta):
        cache.crop(-5)
        cache.reorder_cache(torch.tensor([1, 0]))
    ls, ld = sta.layers[0], dyn.layers[0]
    assert ls.static is None
    assert ls.memory_footprint() == ld.memory_footprint()
    if sinks:
        assert torch.equal(ls.sink_keys, ld.sink_keys) and torch.equal(ls.sink_values, ld.sink_values)
    assert torch.equal(ls.keys, ld.keys)
    for a, b in zip(ls.dequantize(torch.float32), ld.dequantize(torch.float32)):
        assert torch.equal(a, b)


def test_enter_static_checks_its_arguments():
    (dyn, sta), _ = _static_pair(case("turboquant4"))
    layer = dyn.layers[0]
    shared = sta.layers[0].static.shared
    with pytest.raises(ValueError, match="capacity must be a multiple of flush_size"):
        layer.enter_static(layer.num_quantized + 1, shared)
    with pytest.raises(ValueError, match="capacity must be"):
        layer.enter_static(layer.num_quantized - layer.cfg.flush_size, shared)
    empty = case("turboquant4").cache()
    assert empty.layers == []
    with pytest.raises(ValueError, match="needs packed tokens"):
        fresh = case("turboquant4").cache(head_dim=64)
        fresh.update(torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64), 0)  # 8 tokens: none packed yet
        fresh.layers[0].enter_static(16, shared)


def test_enable_cuda_graphs_needs_fast():
    model = build_tiny("llama")
    with pytest.raises(ValueError, match="cuda_graphs=True needs fast=True"):
        tq_transformers.enable(model, "turboquant", cuda_graphs=True)
    with pytest.raises(TypeError, match="cuda_graphs must be a bool, got str 'yes'"):
        tq_transformers.enable(model, "turboquant", fast=True, cuda_graphs="yes")


# ----------------------------------------------------------------------------------------------------------------------
# GPU: real CUDA graphs
# ----------------------------------------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("sinks", [0, 4], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("growth, steps", [(16, 40), (64, 100)], ids=["regrow-every-flush", "flush-graphs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("c", params(*SHORT, "turboquant2.5"))
def test_cuda_graph_decode_matches_eager_fast_path(c, dtype, growth, steps, sinks, monkeypatch):
    """Real graphs fed the same tokens as the eager fast path (teacher forcing, so a near-tie cannot make the two runs
    see different inputs): logits within float noise at every step (the packed tokens are split among blocks by
    capacity instead of by length), the same argmax. With the capacity regrown every 16 packed tokens every flushing
    step runs eagerly; with room for 64, flushing steps replay from their own graph. With 4 exact sink tokens (the
    window buffers' first slots under graphs, the eager path's window run otherwise) the same."""
    monkeypatch.setattr(cuda_graphs, "GROWTH", growth)
    model = build_tiny("llama", dtype).to("cuda")
    inputs = _inputs("cuda")
    forced = torch.randint(3, 500, (2, steps), generator=torch.Generator().manual_seed(3)).cuda()
    fast_attention.install(model)
    cuda_graphs.install(model)
    try:
        runs = []
        for flag in (False, True):
            cache = fast_attention.prepare_cache(c.cache(model.config, sink_tokens=sinks), cuda_graphs=flag)
            runs.append(_forced_logits(model, cache, inputs, forced))
        stats = dict(cuda_graphs.runner_of(model).stats)
    finally:
        cuda_graphs.uninstall(model)
        fast_attention.uninstall(model)
    assert stats["replay"] > 10 and stats["capture"] >= 2, stats
    if growth > 16:
        assert stats.get("replay_flush", 0) >= 2, stats
    eager, graphed = runs
    _assert_logits_agree(graphed, eager, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("c", params("turboquant4", "kivi2"))
def test_cuda_graph_fused_decode_matches_unfused(c, dtype, monkeypatch):
    """fuse=True (inductor) in real graphs against the unfused runner, fed the same tokens (teacher forcing): logits
    within float noise at every step, the same argmax, the same steps; the compile happens in the warm-up (a capture
    runs under fail_on_recompile: it would raise otherwise); greedy generate gives the unfused runner's tokens."""
    monkeypatch.setattr(cuda_graphs, "GROWTH", 64)
    model = build_tiny("llama", dtype).to("cuda")
    inputs = _inputs("cuda")
    forced = torch.randint(3, 500, (2, 100), generator=torch.Generator().manual_seed(3)).cuda()
    fast_attention.install(model)
    runs, stats = [], []
    try:
        for fuse in (False, True):
            cuda_graphs.install(model, fuse=fuse)
            runner = cuda_graphs.runner_of(model)
            runner.stats.clear()
            cache = fast_attention.prepare_cache(c.cache(model.config), cuda_graphs=True)
            runs.append(_forced_logits(model, cache, inputs, forced))
            stats.append(dict(runner.stats))
            assert len(fusion.fused_modules(model)) == (9 if fuse else 0)
    finally:
        cuda_graphs.uninstall(model)
        fast_attention.uninstall(model)
    assert stats[0] == stats[1] and stats[1]["replay"] > 10 and stats[1].get("replay_flush", 0) >= 2, stats
    assert not [key for key in fusion.unfusable() if key[1] == "inductor"]
    unfused, fused = runs
    _assert_logits_agree(fused, unfused, dtype)
    if dtype == torch.float32:
        seqs = [_graphed_generate(model, inputs, c, new_tokens=40, fuse=fuse)[0] for fuse in (False, True)]
        assert torch.equal(seqs[0], seqs[1])


def _assert_logits_agree(got, want, dtype):
    """Teacher-forced logits [B, steps, V] of two GPU runs: the relative error of every step under 1e-4 in float32
    (5e-2 in 16-bit models), and the same argmax (at least 95% of the steps in 16-bit models)."""
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    err = (got.float() - want.float()).abs().amax(-1) / want.float().abs().amax(-1)  # [B, steps]
    assert float(err.max()) < tol, f"relative logit error per step {err}"
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert agree >= (1.0 if dtype == torch.float32 else 0.95), agree


def _forced_logits(model, cache, inputs, forced):
    """Prefill `inputs`, then feed the tokens `forced` [B, T] one step at a time as generate would (position ids
    from the padding mask, the mask growing by one); returns the logits of every step [B, T, V]."""
    mask = inputs["attention_mask"]
    with torch.no_grad():
        model(**inputs, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1, return_dict=True)
        logits = []
        for t in range(forced.shape[1]):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            pos = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -1:]
            out = model(input_ids=forced[:, t : t + 1], position_ids=pos, attention_mask=mask, **{CACHE_KWARG: cache},
                        use_cache=True, logits_to_keep=1, return_dict=True)
            logits.append(out.logits)
    return torch.cat(logits, 1)


def _greedy_loop(model, cache, ids, steps):
    """generate's decode calls by hand (position ids, return_dict): the logits of each step."""
    out = model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1, return_dict=True)
    tok, logits = out.logits[:, -1:].argmax(-1), []
    for _ in range(steps):
        pos = torch.full_like(tok, cache.get_seq_length())
        out = model(input_ids=tok, position_ids=pos, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1,
                    return_dict=True)
        logits.append(out.logits)
        tok = out.logits[:, -1:].argmax(-1)
    return torch.cat(logits, 1)


def test_graph_runner_keeps_a_graph_per_cache_and_skips_unflagged_caches(emulated_graphs):
    """Two flagged caches decoded in alternation keep their own layouts and graphs (no rebuild at each switch); a
    cache prepared without cuda_graphs=True is never graphed. Each gives exactly its reference logits."""
    model = build_tiny("llama")
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(2))
    c = case("kivi2")
    want = _greedy_loop(model, c.cache(model.config), ids, 12)
    fast_attention.install(model)
    cuda_graphs.install(model)
    try:
        caches = [fast_attention.prepare_cache(c.cache(model.config), cuda_graphs=flag)
                  for flag in (True, True, False)]
        outs = [model(input_ids=ids, **{CACHE_KWARG: c}, use_cache=True, logits_to_keep=1, return_dict=True)
                for c in caches]
        toks = [o.logits[:, -1:].argmax(-1) for o in outs]
        logits = [[], [], []]
        for _ in range(12):
            for i, cache in enumerate(caches):
                pos = torch.full_like(toks[i], cache.get_seq_length())
                out = model(input_ids=toks[i], position_ids=pos, **{CACHE_KWARG: cache}, use_cache=True,
                            logits_to_keep=1, return_dict=True)
                logits[i].append(out.logits)
                toks[i] = out.logits[:, -1:].argmax(-1)
        stats = dict(cuda_graphs.runner_of(model).stats)
    finally:
        cuda_graphs.uninstall(model)
        fast_attention.uninstall(model)
    assert stats["layout"] == 2 and stats["replay"] >= 10, stats
    assert caches[2].layers[0].static is None and caches[0].layers[0].static is not None
    for got in logits[:2]:  # graphed (the static layout's steps rebuild the reference tensors)
        assert torch.equal(torch.cat(got, 1), want)
    if logits[2][0].device.type == "cpu":  # not graphed: on the CPU, attention on the packed codes (cpu_attention)
        torch.testing.assert_close(torch.cat(logits[2], 1), want, rtol=0, atol=1e-4)
    else:
        assert torch.equal(torch.cat(logits[2], 1), want)


def test_graph_runner_beam_search_equals_reference(emulated_graphs):
    """Beam search reorders the cache every step. The beams of one prompt share their prefill's centering means, so
    the static layout reorders its buffers in place (``StaticLayout.reorder_in_place``): one layout, one capture, the
    graph replayed through the reorders; the beams equal the reference path's exactly."""
    model = build_tiny("llama")
    inputs = _inputs("cpu")
    c = case("turboquant4")
    ref = model.generate(**inputs, num_beams=2, max_new_tokens=20, do_sample=False,
                         **{CACHE_KWARG: c.cache(model.config)})
    tq_transformers.enable(model, c.method, fast=True, cuda_graphs=True, **c.kwargs(model.config))
    try:
        got = model.generate(**inputs, num_beams=2, max_new_tokens=20, do_sample=False)
        stats = dict(cuda_graphs.runner_of(model).stats)
    finally:
        tq_transformers.disable(model)
    assert stats["layout"] == 1 and stats["capture"] == 1 and stats["replay"] > 10, stats
    assert torch.equal(got, ref)
    assert_valid_tokens(got, inputs["input_ids"])


def test_install_and_enable_restore_instance_level_forward_and_generate():
    """accelerate's hooks (device_map) put a forward on the instance: uninstall / disable give it back, not the
    class's."""
    model = build_tiny("llama")
    calls = []
    class_forward, class_generate = model.forward, model.generate

    def hooked_forward(*args, **kwargs):
        calls.append("forward")
        return class_forward(*args, **kwargs)

    def hooked_generate(*args, **kwargs):
        calls.append("generate")
        return class_generate(*args, **kwargs)

    model.forward, model.generate = hooked_forward, hooked_generate
    cuda_graphs.install(model)
    cuda_graphs.install(model)  # idempotent
    model(input_ids=torch.tensor([[5, 6]]))
    assert calls == ["forward"]
    cuda_graphs.uninstall(model)
    cuda_graphs.uninstall(model)  # nothing left to undo
    assert vars(model)["forward"] is hooked_forward
    tq_transformers.enable(model, "kivi", fast=True, cuda_graphs=True)
    tq_transformers.enable(model, "kivi", fast=True, cuda_graphs=True)  # again: still one level of wrapping
    model.generate(input_ids=torch.tensor([[5, 6]]), max_new_tokens=2, do_sample=False)
    assert calls.count("generate") == 1
    tq_transformers.disable(model)
    assert vars(model)["generate"] is hooked_generate and vars(model)["forward"] is hooked_forward
    assert attn_implementation_of(model.config) == "sdpa"


def test_graph_layers_need_one_device(emulated_graphs):
    """Layers spread over devices (a pipeline over GPUs) run eagerly: the counts tensor lives on one device."""
    cache = fast_attention.prepare_cache(case("turboquant4").cache(head_dim=64), cuda_graphs=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        cache.update(torch.randn(1, 2, 40, 64, generator=gen), torch.randn(1, 2, 40, 64, generator=gen), i)
    assert cuda_graphs._graph_layers(cache) == cache.layers
    cache.layers[1].keys = cache.layers[1].keys.to("meta")
    assert cuda_graphs._graph_layers(cache) is None


@pytest.mark.parametrize(
    "extra",
    [dict(output_hidden_states=True), dict(logits_to_keep=torch.tensor([0])), dict(attention_mask="4d"), dict(args=1)],
    ids=["other-argument", "tensor-logits_to_keep", "4d-mask", "positional"],
)
def test_graph_runner_runs_unusual_decode_calls_eagerly(extra, emulated_graphs):
    """Decode calls that are not generate's plain step run the original forward, with the same result."""
    model = build_tiny("llama")
    c = case("turboquant4")
    ids = torch.randint(3, 500, (1, 40), generator=torch.Generator().manual_seed(4))
    outs = []
    fast_attention.install(model)
    for graphs in (False, True):
        if graphs:
            cuda_graphs.install(model)
        cache = fast_attention.prepare_cache(c.cache(model.config), cuda_graphs=True)
        model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True, return_dict=True)
        call = dict(input_ids=ids[:, :1], position_ids=torch.tensor([[40]]), **{CACHE_KWARG: cache}, use_cache=True,
                    return_dict=True, **{k: v for k, v in extra.items() if k not in ("attention_mask", "args")})
        if extra.get("attention_mask") == "4d":
            call["attention_mask"] = torch.zeros(1, 1, 1, 41)
        if "args" in extra:
            outs.append(model(call.pop("input_ids"), **call).logits)
        else:
            outs.append(model(**call).logits)
    stats = dict(cuda_graphs.runner_of(model).stats)
    cuda_graphs.uninstall(model)
    fast_attention.uninstall(model)
    assert stats == {}, stats
    assert torch.equal(outs[0], outs[1])


# ----------------------------------------------------------------------------------------------------------------------
# Fusion (fuse=...): the decoder layers' pure modules through torch.compile, in graph steps only
# ----------------------------------------------------------------------------------------------------------------------
class _Counting:
    """A torch.compile backend (registered under `name`) that runs dynamo's graph as is and counts its compiles and
    the calls of the compiled code."""

    def __init__(self, name):
        self.name, self.compiles, self.calls = name, 0, 0
        if name not in torch.compiler.list_backends(exclude_tags=()):
            torch._dynamo.register_backend(name=name)(lambda gm, example_inputs: _COUNTING[name](gm, example_inputs))
        _COUNTING[name] = self

    def __call__(self, gm, example_inputs):
        self.compiles += 1

        def run(*args):
            self.calls += 1
            return gm.forward(*args)

        return run


_COUNTING: dict = {}


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**COMMON, num_key_value_heads=2, head_dim=32))


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0))


def _gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=32))


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(**COMMON, num_key_value_heads=2, head_dim=32, num_local_experts=4,
                                            num_experts_per_tok=2))


_FUSED_CHILDREN = {  # architecture -> the children of each decoder layer the rule picks
    "llama": (lambda: build_tiny("llama"), {"input_layernorm", "post_attention_layernorm", "mlp"}),
    "qwen2": (lambda: build_tiny("qwen2"), {"input_layernorm", "post_attention_layernorm", "mlp"}),
    "gemma3": (lambda: build_tiny("gemma3"), {"input_layernorm", "post_attention_layernorm",
                                              "pre_feedforward_layernorm", "post_feedforward_layernorm", "mlp"}),
    "mistral": (_mistral, {"input_layernorm", "post_attention_layernorm", "mlp"}),
    "phi3": (_phi3, {"input_layernorm", "post_attention_layernorm", "mlp"}),  # not the two dropouts
    "gemma": (_gemma, {"input_layernorm", "post_attention_layernorm", "mlp"}),
    "mixtral": (_mixtral, {"input_layernorm", "post_attention_layernorm", "mlp"}),  # the MoE block: see below
}


@pytest.mark.parametrize("arch", list(_FUSED_CHILDREN))
def test_fuse_picks_the_norms_and_the_mlp_of_every_decoder_layer(arch):
    """The rule (no class names): of each decoder layer, the children with parameters, no attention module (one with
    a layer_idx) inside and a one-argument forward; the attention is never among them."""
    build, children = _FUSED_CHILDREN[arch]
    model = build()
    layers = fusion.decoder_layers(model)
    assert layers is model.model.layers
    names = [name for name, _ in fusion.fusible(model)]
    assert names == [f"model.layers.{i}.{child}" for i in range(len(layers)) for child, _ in
                     layers[i].named_children() if child in children]
    assert len(names) == len(layers) * len(children)
    for _, module in fusion.fusible(model):
        assert not any(hasattr(m, "layer_idx") for m in module.modules())
    assert all(any(hasattr(m, "layer_idx") for m in layer.self_attn.modules()) for layer in layers)


@pytest.mark.parametrize("c", params("turboquant4", "kivi2"))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_graph_generate_equals_unfused_and_reference(arch, c, emulated_graphs):
    """Emulated graphs with the norms and MLPs compiled (a counting backend that runs dynamo's graph): the same
    tokens and scores as the unfused runner and the reference path, exactly; the same steps; one compile per fused
    class for all layers and the whole generation (layout rebuilds and flushes included: no recompile per step); and
    the compiled code runs in graph steps only (eager warm-ups, captures and the emulated replays; never prefill)."""
    model = build_tiny(arch)
    inputs = _inputs("cpu")
    ref_seq, ref_scores = _generate(model, inputs, c.cache(model.config), 40)
    seq0, scores0, _, stats0 = _graphed_generate(model, inputs, c)
    backend = _Counting(f"tq_counting_{arch}_{c.id}")
    seq, scores, cache, stats = _graphed_generate(model, inputs, c, fuse=backend.name)
    assert stats == stats0 and stats["replay"] > 10 and stats["capture"] >= 2 and stats["layout"] >= 2, stats
    assert torch.equal(seq0, ref_seq) and torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)
    torch.testing.assert_close(scores, scores0, rtol=0, atol=0)
    assert backend.compiles == 2  # the RMSNorm class and the MLP class, for every layer
    python_steps = stats["eager"] + stats["capture"] + stats["replay"] + stats.get("replay_flush", 0)
    fused = 3 * model.config.num_hidden_layers
    assert backend.calls == fused * python_steps, (backend.calls, stats)
    assert fusion.fused_modules(model) == []  # disable restored them


@pytest.mark.parametrize("fuse", [False, "eager"], ids=["unfused", "fused"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_graph_steps_group_the_input_projections(arch, fuse, emulated_graphs, monkeypatch):
    """In graph steps (fused or not), q / k / v of every layer run as one ``kernels.linear_group`` launch in every
    step after the first (which learns the groups, each projection alone), o_proj alone; generate still gives the
    reference tokens and scores exactly (on the CPU the launch is ``F.linear`` per weight)."""
    sizes = []

    def counting(x, weights, biases=None):
        sizes.append(len(weights))
        return kernels.reference.linear_group(x, weights, biases)

    monkeypatch.setattr(kernels, "linear_group", counting)
    model = build_tiny(arch)
    inputs = _inputs("cpu")
    c = case("turboquant4")
    ref_seq, ref_scores = _generate(model, inputs, c.cache(model.config), 24)
    seq, scores, _, stats = _graphed_generate(model, inputs, c, new_tokens=24, fuse=fuse)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)
    layers = model.config.num_hidden_layers
    python_steps = stats["eager"] + stats["capture"] + stats["replay"] + stats.get("replay_flush", 0)
    assert sizes[:4 * layers] == [1] * 4 * layers  # the first graph step: learning
    assert sizes[4 * layers:] == [3, 1] * layers * (python_steps - 1), (sizes, stats)


def test_fused_module_refused_a_compile_in_the_capture_runs_unfused(emulated_graphs, monkeypatch):
    """Code compiled in the warm-up step that no longer fits at the capture (simulated: dynamo's caches cleared
    between the two) would compile inside the capture: refused there (``set_stance("fail_on_recompile")``), the
    module class runs its own forward in that capture and later, with a RuntimeWarning naming it, and generate still
    gives the reference tokens and scores."""
    monkeypatch.setattr(fusion, "_UNFUSABLE", {})
    monkeypatch.setattr(fusion, "_COMPILED", {})
    emulated = cuda_graphs._capture_graph
    cleared = []

    def capture_after_reset(fn):
        if not cleared:
            torch._dynamo.reset()
            cleared.append(True)
        return emulated(fn)

    monkeypatch.setattr(cuda_graphs, "_capture_graph", capture_after_reset)
    model = build_tiny("llama")
    inputs = _inputs("cpu")
    c = case("turboquant4")
    ref_seq, ref_scores = _generate(model, inputs, c.cache(model.config), 24)
    with pytest.warns(RuntimeWarning, match="runs unfused in CUDA-graph steps .*would compile again there"):
        seq, scores, _, stats = _graphed_generate(model, inputs, c, new_tokens=24, fuse="eager")
    assert cleared and stats["replay"] > 10, stats
    assert {name for name, _ in fusion.unfusable()} == {"LlamaRMSNorm.forward", "LlamaMLP.forward"}
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)


def test_fused_aot_eager_generate_equals_reference(emulated_graphs):
    """fuse="aot_eager" (AOT autograd's traced graph run eagerly): generate gives the reference tokens."""
    model = build_tiny("llama")
    inputs = _inputs("cpu")
    c = case("bonsai-improved-l2")
    ref_seq, ref_scores = _generate(model, inputs, c.cache(model.config), 24)
    seq, scores, _, stats = _graphed_generate(model, inputs, c, new_tokens=24, fuse="aot_eager")
    assert stats["replay"] > 10, stats
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)


def _module_dicts(model):
    return {name: dict(vars(m)) for name, m in model.named_modules()}


def _assert_same_dicts(before, after):
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), (name, set(before[name]) ^ set(after[name]))
        assert all(before[name][k] is after[name][k] for k in before[name]), name


def test_fuse_is_instance_level_and_uninstall_restores_it():
    """install(fuse=...) puts a forward on the chosen instances only (the classes untouched), outside graph steps they
    run their own forward; switching fuse off, uninstall and disable restore every module exactly; a deep copy of a
    fused model is fused on its own modules, with its own runner."""
    model = build_tiny("llama")
    norm_cls = type(model.model.layers[0].input_layernorm)
    class_dicts = {cls: dict(vars(cls)) for cls in (norm_cls, type(model.model.layers[0].mlp))}
    before = _module_dicts(model)
    ids = torch.tensor([[5, 6, 7]])
    want = model(input_ids=ids).logits
    backend = _Counting("tq_counting_restore")
    cuda_graphs.install(model, fuse=backend.name)
    assert fusion.fused_modules(model) == [name for name, _ in fusion.fusible(model)]
    assert "forward" in vars(model.model.layers[1].mlp) and "forward" not in vars(model.model.layers[1].self_attn)
    assert torch.equal(model(input_ids=ids).logits, want) and backend.calls == 0  # not a graph step: not compiled
    copied = copy.deepcopy(model)
    assert cuda_graphs.runner_of(copied).fuse == backend.name
    assert fusion.fused_modules(copied) == fusion.fused_modules(model)
    for original, twin in zip(model.modules(), copied.modules()):
        if "forward" in vars(twin) and twin is not copied:
            assert vars(twin)["forward"].__self__ is twin and vars(original)["forward"].__self__ is original
    cuda_graphs.install(model)  # fuse off again, the runner stays
    assert fusion.fused_modules(model) == [] and cuda_graphs.runner_of(model).fuse is None
    cuda_graphs.install(model, fuse=True)
    assert cuda_graphs.runner_of(model).fuse == "inductor"
    cuda_graphs.uninstall(model)
    _assert_same_dicts(before, _module_dicts(model))
    tq_transformers.enable(model, "kivi", fast=True, cuda_graphs=True, fuse="eager")
    assert len(fusion.fused_modules(model)) == 9
    tq_transformers.disable(model)
    _assert_same_dicts(before, _module_dicts(model))
    assert {cls: dict(vars(cls)) for cls in class_dicts} == class_dicts
    assert torch.equal(model(input_ids=ids).logits, want)
    cuda_graphs.uninstall(copied)
    assert fusion.fused_modules(copied) == []


def test_fuse_checks_its_argument():
    model = build_tiny("llama")
    with pytest.raises(TypeError, match="fuse must be a bool or the name of a torch.compile backend, got int 1"):
        cuda_graphs.install(model, fuse=1)
    with pytest.raises(TypeError, match="fuse must be a bool or the name of a torch.compile backend, got NoneType"):
        tq_transformers.enable(model, "turboquant", fast=True, fuse=None)
    with pytest.raises(ValueError, match="fuse must be a bool or the name of a torch.compile backend .*'inductr'"):
        cuda_graphs.install(model, fuse="inductr")
    with pytest.raises(ValueError, match="fuse=True needs cuda_graphs=True"):
        tq_transformers.enable(model, "turboquant", fast=True, cuda_graphs=False, fuse=True)
    with pytest.raises(ValueError, match="fuse='eager' needs cuda_graphs=True"):
        tq_transformers.enable(model, "turboquant", fuse="eager")  # fast=False: no graphs
    with pytest.raises(ValueError, match="found no decoder layers"):
        cuda_graphs.install(torch.nn.Sequential(torch.nn.Linear(2, 2)), fuse=True)
    assert cuda_graphs.runner_of(model) is None and fusion.fused_modules(model) == []
    assert "generate" not in vars(model) and attn_implementation_of(model.config) == "sdpa"


def test_fused_capture_never_compiles(monkeypatch):
    """Inside a capture (graph_step(capturing=True)) nothing compiles: after a warm-up the capture reuses the compiled
    code (another instance too: the same output as the module's own forward); without one the compile is refused,
    and the class runs its own forward there and from then on, with a RuntimeWarning."""
    monkeypatch.setattr(fusion, "_UNFUSABLE", {})
    monkeypatch.setattr(fusion, "_COMPILED", {})
    model = build_tiny("llama")
    backend = _Counting("tq_counting_capture")
    cuda_graphs.install(model, fuse=backend.name)
    norm = model.model.layers[2].post_attention_layernorm
    x = torch.randn(3, 1, 128)
    with torch.no_grad():
        want = type(norm).forward(norm, x)
        with fusion.graph_step(backend.name):  # the warm-up
            assert torch.equal(norm(x), want)
        other = model.model.layers[0].input_layernorm  # another instance: the same compiled code
        with fusion.graph_step(backend.name, capturing=True):
            assert torch.equal(other(x), type(other).forward(other, x))
        assert backend.compiles == 1 and backend.calls == 2
        mlp = model.model.layers[1].mlp  # never warmed up: would compile inside the capture
        with pytest.warns(RuntimeWarning, match="LlamaMLP.forward runs unfused .*would compile again there"):
            with fusion.graph_step(backend.name, capturing=True):
                assert torch.equal(mlp(x), type(mlp).forward(mlp, x))
        with fusion.graph_step(backend.name):  # and later, outside a capture too
            assert torch.equal(mlp(x), type(mlp).forward(mlp, x))
    assert backend.compiles == 1 and set(fusion.unfusable()) == {("LlamaMLP.forward", backend.name)}
    cuda_graphs.uninstall(model)


def test_moe_block_is_fused_only_when_it_is_one_graph(recwarn):
    """An MoE block with eager experts (nonzero, a loop over the experts hit) does not compile to one graph
    (fullgraph=True): its first compile, in a warm-up, fails; it then runs its own forward (a warning says so, no
    compile is attempted again) while the norms stay fused. With transformers' default grouped_mm experts (static
    shapes, no host sync) the block is one graph and runs compiled."""
    model = _mixtral().eval()
    x = torch.randn(2, 1, 128)
    layers = model.model.layers
    with torch.no_grad():
        assert model.config._experts_implementation == "grouped_mm"
        fusion.fuse(model)
        want = type(layers[0].mlp).forward(layers[0].mlp, x)
        with fusion.graph_step("eager"):
            torch.testing.assert_close(layers[0].mlp(x), want, rtol=1e-6, atol=1e-6)
        assert fusion.unfusable() == {}
        model.set_experts_implementation("eager")
        want = [type(layer.mlp).forward(layer.mlp, x) for layer in layers]
        backend = _Counting("tq_counting_moe")
        with fusion.graph_step(backend.name):
            got = layers[0].mlp(x)
            layers[0].input_layernorm(x)
        with fusion.graph_step(backend.name, capturing=True):
            again = layers[1].mlp(x)
            layers[1].input_layernorm(x)
    assert torch.equal(got, want[0]) and torch.equal(again, want[1])
    assert any("runs unfused in CUDA-graph steps" in str(w.message) for w in recwarn.list)
    assert (type(layers[0].mlp).forward.__qualname__, backend.name) in fusion.unfusable()
    assert backend.compiles == 1 and backend.calls == 2  # the norm, for both layers; never the MoE block
    fusion.unfuse(model)


def test_benchmark_fused_and_unfused_graph_caches_alternate(emulated_graphs, monkeypatch):
    """scripts/benchmark_speed.py's "_graph_fused" caches beside the "_graph" ones on one model, timed in alternation
    (use_path switches fuse per turn): each cache keeps the graphs of its own kind (captured once, not every turn),
    and the fused one's steps run the compiled modules."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
    benchmark_speed = pytest.importorskip("benchmark_speed")
    names = ["dynamic", *(f"{m}_graph{k}" for m in ("turboquant4", "kivi2", "bonsai1") for k in ("", "_fused"))]
    modes = {name: mode for name, (_, mode) in benchmark_speed.cache_factories(False, names).items()}
    assert modes == {"dynamic": "sdpa", **{n: "graph_fused" if n.endswith("_fused") else "graph" for n in names[1:]}}
    backend = _Counting("tq_counting_benchmark")
    monkeypatch.setattr(fusion, "DEFAULT_BACKEND", backend.name)  # fuse=True: on the CPU, not inductor
    make = case("turboquant4").cache  # a window that packs tokens within the tiny context
    factories = {"turboquant4_graph": (make, "graph"), "turboquant4_graph_fused": (make, "graph_fused")}
    model = build_tiny("llama")
    rows = benchmark_speed.decode_interleaved(model, factories, batch=1, context=40, steps=4, rounds=2)
    stats = dict(cuda_graphs.runner_of(model).stats)
    assert [r["cache"] for r in rows] == ["turboquant4_graph", "turboquant4_graph_fused"]
    assert stats["layout"] == 2 and stats["capture"] <= 4 and stats["replay"] >= 16, stats
    assert backend.compiles == 2 and backend.calls > 0
    cuda_graphs.uninstall(model)
    fast_attention.uninstall(model)
