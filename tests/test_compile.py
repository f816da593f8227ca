"""torch.compile with the quantized caches (issue 12, item 1): custom operators and fixed-capacity caches.

- model-free: the decode operator against the function it wraps (and ``torch.library.opcheck`` of its fake
  implementation), the format flattening;
- tiny models on the CPU, for one case of each method: a fixed-capacity cache (``max_cache_len``) decodes exactly
  as the dynamic fast path (eager); ``torch.compile(model.forward, fullgraph=True)`` with the "eager" and "aot_eager"
  backends has no graph break, compiles once over decode steps that flush, and gives the same greedy tokens;
  ``generate(past_key_values=cache)`` takes transformers' own auto-compile path; inductor on the CPU (slow, skipped
  without a C compiler);
- GPU (marked): inductor with CUDA graphs against the dynamic fast path, and the compress operators.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import CompileConfig

import tq_transformers
from tq_transformers import cpu_attention, fast_attention
from tq_transformers.compile import FixedCapacityLayer
from tq_transformers.generation import CACHE_KWARG
from tq_transformers.kernels import ops, reference

from cases import (
    PLUMBING,
    build_tiny,
    case,
    generate_with_scores,
    needs_gpu,
    one_thread,
    padded_inputs,
    params,
    random_ids,
)

NEW_TOKENS = 40  # decode steps: with the small windows (F = 16) at least two flushes during decoding
CAPACITY = 128  # max_cache_len of the tiny runs: the 40-token prompts plus NEW_TOKENS, with room to spare

_single_thread = pytest.fixture(autouse=True)(one_thread)


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given (a recompile is a new graph) and runs them with
    `inner` ("eager": the captured FX graph; "aot_eager": through AOTAutograd's functionalized ATen graph)."""

    def __init__(self, inner: str = "eager"):
        self.inner = torch._dynamo.lookup_backend(inner)
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)

    def __deepcopy__(self, memo):  # CompileConfig.to_dict deep-copies its backend: count on this one
        return self


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _fast_model(arch="llama"):
    model = build_tiny(arch)
    fast_attention.install(model)
    return model


def _eager_fast(model, c, inputs, new_tokens=NEW_TOKENS):
    """Greedy tokens and scores of the dynamic fast path (the reference every compiled run must equal)."""
    cache = fast_attention.prepare_cache(c.cache(model.config))
    return generate_with_scores(model, inputs, cache, new_tokens)


# ----------------------------------------------------------------------------------------------------------------------
# Model-free: the decode operator and the flattening
# ----------------------------------------------------------------------------------------------------------------------
def _filled_layer(c, tokens=70):
    cache = c.cache(None, head_dim=64)
    g = torch.Generator().manual_seed(3)
    k, v = (torch.randn(2, 2, tokens, 64, generator=g) for _ in range(2))
    cache.update(k, v, 0)
    return cache.layers[0]


@pytest.mark.parametrize("c", params(*PLUMBING))
def test_flatten_round_trip(c):
    layer = _filled_layer(c)
    for view in layer.packed():
        back = ops.unflatten(*ops.flatten(view))
        assert type(back) is type(view)
        assert torch.equal(back.dequantize(), view.dequantize())


def test_flatten_rejects_other_formats():
    with pytest.raises(TypeError, match="view must be one of"):
        ops.flatten(torch.zeros(1))


@pytest.mark.parametrize("c", params(*PLUMBING))
def test_decode_operator_equals_cpu_attention(c):
    layer = _filled_layer(c)
    keys, values = layer.packed()
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 64, generator=g)
    window = torch.randn(2, 2, 5, 64, generator=g)
    mask = torch.ones(2, keys.num_tokens + 5, dtype=torch.bool)
    mask[1, :3] = False
    args = dict(q=q, keys=keys, values=values, window_k=window, window_v=window * 0.5, key_mask=mask, scaling=0.125)
    want = cpu_attention.decode_attention(**args)
    assert torch.equal(ops.decode_attention(**args), want)
    # device-side counts over longer buffers: the first n packed tokens and W window tokens
    n = keys.num_tokens // 2 // 16 * 16
    lengths = torch.tensor([n, 3, 2])
    got = ops.decode_attention(**{**args, "lengths": lengths})
    short = reference.decode_attention(q=q, keys=keys.prefix(n), values=values.prefix(n), window_k=window[:, :, :3],
                                       window_v=window[:, :, :3] * 0.5, key_mask=mask[:, : n + 3], scaling=0.125)
    torch.testing.assert_close(got, short)


def test_decode_operator_fake_and_schema():
    layer = _filled_layer(case("turboquant4"))
    keys, values = layer.packed()
    q = torch.randn(2, 4, 64)
    window = torch.randn(2, 2, 5, 64)
    args = (q, *ops.flatten(keys), *ops.flatten(values), window, window, None, None, 0.125)
    torch.library.opcheck(torch.ops.tq_transformers.decode_attention.default, args)


# ----------------------------------------------------------------------------------------------------------------------
# Fixed-capacity caches: construction and eager decoding
# ----------------------------------------------------------------------------------------------------------------------
def test_kernel_availability_check_traces_without_graph_break():
    """The encoders ask ``kernels.triton_available()`` inside the compiled cache update; on a GPU it used to call
    importlib's ``find_spec``, which dynamo refuses (a graph break under generate's auto-compile). It must fold to a
    constant: this compiles with ``fullgraph=True`` on any device."""
    from tq_transformers import kernels

    def step(x):
        return x + 1 if kernels.triton_available() else x - 1

    x = torch.zeros(2)
    got = torch.compile(step, fullgraph=True, backend="eager")(x)
    assert torch.equal(got, step(x))


def test_fixed_capacity_validation():
    model = build_tiny("llama")
    c = case("turboquant4")
    with pytest.raises(ValueError, match="max_cache_len"):
        c.cache(model.config, max_cache_len=0)
    with pytest.raises(ValueError, match="needs the model config"):
        c.cache_class(None, max_cache_len=64)
    with pytest.raises(ValueError, match="sink_tokens"):
        c.cache(model.config, max_cache_len=64, sink_tokens=4, residual_length=16)
    cache = c.cache(model.config, max_cache_len=64)
    assert cache.is_compileable and all(isinstance(layer, FixedCapacityLayer) for layer in cache.layers)
    assert not c.cache(model.config).is_compileable


def test_fixed_capacity_refuses_sdpa_and_overflow():
    model = build_tiny("llama")
    c = case("kivi2")
    with pytest.raises(ValueError, match="tq_fused"):
        model(random_ids(1, 40), use_cache=True, **{CACHE_KWARG: c.cache(model.config, max_cache_len=64)})
    fast_attention.install(model)
    with pytest.raises(ValueError, match="max_cache_len=32"):
        model(random_ids(1, 40), use_cache=True, **{CACHE_KWARG: c.cache(model.config, max_cache_len=32)})


def test_fixed_capacity_refuses_formats_without_kernel_view():
    model = _fast_model()
    cache = case("turboquant3-qjl").cache(model.config, max_cache_len=CAPACITY)
    with pytest.raises(ValueError, match="needs packed formats"):
        model(random_ids(1, 40), use_cache=True, **{CACHE_KWARG: cache})


def test_hybrid_model_cache_is_not_compileable():
    model = build_tiny("gemma3")
    assert not case("kivi2").cache(model.config, max_cache_len=CAPACITY).is_compileable


@pytest.mark.parametrize("c", params(*PLUMBING))
def test_fixed_capacity_eager_equals_fast_path(c):
    """No compiler: the fixed-capacity step (device counts, speculative flush) gives the dynamic fast path's tokens
    and scores exactly, on a left-padded batch."""
    model = _fast_model()
    inputs = padded_inputs()
    want_seq, want_scores = _eager_fast(model, c, inputs)
    cache = c.cache(model.config, max_cache_len=CAPACITY)
    seq, scores = generate_with_scores(model, inputs, cache, NEW_TOKENS)
    assert torch.equal(seq, want_seq)
    assert torch.equal(scores, want_scores)
    layer = cache.layers[0]
    layer.sync_host()
    assert layer.num_quantized >= 32 and layer.cumulative_length == seq.shape[1] - 1


# ----------------------------------------------------------------------------------------------------------------------
# torch.compile(model.forward, fullgraph=True): a user-written decode loop (gpt-fast style)
# ----------------------------------------------------------------------------------------------------------------------
def _compiled_greedy(model, cache, ids, backend, steps=NEW_TOKENS):
    """Prefill eagerly, then `steps` greedy decode steps through one compiled forward; returns the tokens."""
    with torch.no_grad():
        out = model(ids, use_cache=True, **{CACHE_KWARG: cache})
        step = torch.compile(model.forward, fullgraph=True, backend=backend)
        token = out.logits[:, -1:].argmax(-1)
        tokens = [token]
        for i in range(steps - 1):
            pos = torch.full((ids.shape[0], 1), ids.shape[1] + i)
            out = step(input_ids=token, position_ids=pos, use_cache=True, **{CACHE_KWARG: cache})
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
    return torch.cat([ids, *tokens], dim=1)


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
@pytest.mark.parametrize("c", params(*PLUMBING))
def test_compiled_forward_fullgraph_no_recompiles(c, inner):
    model = _fast_model()
    ids = random_ids(1, 40)
    want, _ = _eager_fast(model, c, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    backend = CountingBackend(inner)
    got = _compiled_greedy(model, c.cache(model.config, max_cache_len=CAPACITY), ids, backend)
    assert backend.graphs == 1  # fullgraph: no break; one graph over steps with and without a flush
    assert torch.equal(got, want)


@pytest.mark.parametrize("c", params("bonsai-improved", "turboquant4"))
def test_compiled_forward_first_flush_inside_compiled_steps(c):
    """A prompt shorter than the window: the first flush, and the centering means, happen inside compiled steps."""
    model = _fast_model()
    ids = random_ids(1, 10)
    want, _ = _eager_fast(model, c, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    cache = c.cache(model.config, max_cache_len=CAPACITY)
    backend = CountingBackend("aot_eager")
    got = _compiled_greedy(model, cache, ids, backend)
    assert backend.graphs == 1 and torch.equal(got, want)
    cache.layers[0].sync_host()
    assert not cache.layers[0].fixed.prepare_pending  # known prepared now: later compiled steps skip the means


def test_compiled_forward_qwen2():
    model = _fast_model("qwen2")
    c = case("turboquant4")
    ids = random_ids(1, 40)
    want, _ = _eager_fast(model, c, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    backend = CountingBackend("aot_eager")
    assert torch.equal(_compiled_greedy(model, c.cache(model.config, max_cache_len=CAPACITY), ids, backend), want)
    assert backend.graphs == 1


# ----------------------------------------------------------------------------------------------------------------------
# generate's own auto-compile path
# ----------------------------------------------------------------------------------------------------------------------
def _auto_compile(model, backend):
    config = CompileConfig(backend=backend, fullgraph=True, mode=None)
    config._compile_all_devices = True  # transformers' switch for compiling on the CPU (5.17 and 5.24)
    model.generation_config.compile_config = config


@pytest.mark.parametrize("c", params(*PLUMBING))
def test_generate_auto_compiles_fixed_cache(c):
    model = _fast_model()
    inputs = padded_inputs()
    want_seq, want_scores = _eager_fast(model, c, inputs)
    backend = CountingBackend("aot_eager")
    _auto_compile(model, backend)
    seq, scores = generate_with_scores(model, inputs, c.cache(model.config, max_cache_len=CAPACITY), NEW_TOKENS)
    assert backend.graphs == 1  # generate compiled the decode step, once
    assert torch.equal(seq, want_seq)
    torch.testing.assert_close(scores, want_scores)


def test_generate_auto_compile_continues_a_conversation():
    """A second generate call on the same fixed-capacity cache (the next turn) continues it, compiled."""
    model = _fast_model()
    c = case("kivi2")
    first = random_ids(1, 30)
    backend = CountingBackend("eager")
    _auto_compile(model, backend)
    cache = c.cache(model.config, max_cache_len=CAPACITY)
    seq, _ = generate_with_scores(model, {"input_ids": first, "attention_mask": torch.ones_like(first)}, cache, 20)
    turn = torch.cat([seq, random_ids(1, 10, seed=2)], dim=1)
    seq2, _ = generate_with_scores(model, {"input_ids": turn, "attention_mask": torch.ones_like(turn)}, cache, 20)
    model.generation_config.compile_config = None
    ref = fast_attention.prepare_cache(c.cache(model.config))
    want, _ = generate_with_scores(model, {"input_ids": first, "attention_mask": torch.ones_like(first)}, ref, 20)
    want2, _ = generate_with_scores(model, {"input_ids": torch.cat([want, turn[:, seq.shape[1]:]], dim=1),
                                            "attention_mask": torch.ones_like(turn)}, ref, 20)
    assert torch.equal(seq, want) and torch.equal(seq2, want2)
    assert backend.graphs >= 1


def test_enable_with_max_cache_len_auto_compiles():
    model = build_tiny("llama")
    c = case("bonsai")
    inputs = padded_inputs()
    tq_transformers.enable(model, c.method, fast=True, cuda_graphs=False, **c.kwargs(model.config))
    want = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    with pytest.raises(ValueError, match="cuda_graphs=True and max_cache_len"):
        tq_transformers.enable(model, c.method, fast=True, cuda_graphs=True, max_cache_len=CAPACITY)
    tq_transformers.enable(model, c.method, fast=True, max_cache_len=CAPACITY, **c.kwargs(model.config))
    backend = CountingBackend("eager")
    _auto_compile(model, backend)
    got = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    tq_transformers.disable(model)
    assert backend.graphs == 1 and torch.equal(got, want)


# ----------------------------------------------------------------------------------------------------------------------
# Eager operations on a fixed-capacity cache after compiled steps
# ----------------------------------------------------------------------------------------------------------------------
def test_fixed_cache_copies_and_saves_after_compiled_steps(tmp_path):
    """After compiled steps the host side is brought back from the device: counts, a fork with buffers of its own,
    saving; a loaded cache (fixed-capacity again) and a fork continue exactly as the original does."""
    model = _fast_model()
    c = case("turboquant4")
    ids = random_ids(1, 40)
    cache = c.cache(model.config, max_cache_len=CAPACITY)
    seq = _compiled_greedy(model, cache, ids, CountingBackend("eager"), steps=21)
    layer = cache.layers[0]
    assert int(cache.get_seq_length()) == 60
    layer.sync_host()
    assert layer.cumulative_length == 60 and layer.num_quantized == 48  # q(60) = floor(60 / 16) * 16 (R = 0)
    footprint = cache.memory_footprint()
    assert footprint["codes"] > 0 and footprint["window"] > 0
    fork = cache.fork()
    assert fork.layers[0].fixed.win_k.data_ptr() != layer.fixed.win_k.data_ptr()
    cache.token_ids = seq[:, :-1]  # the ids the cache holds (the last token is not in it yet)
    cache.save(tmp_path / "c.safetensors")
    loaded = type(cache).load(tmp_path / "c.safetensors", model.config)
    assert loaded.is_compileable and int(loaded.get_seq_length()) == 60
    turn = torch.cat([seq, random_ids(1, 5, seed=2)], dim=1)
    inputs = {"input_ids": turn, "attention_mask": torch.ones_like(turn)}
    outs = [generate_with_scores(model, inputs, x, 20)[0] for x in (cache, fork, loaded)]
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])


def test_fixed_cache_beam_search_equals_fast_path():
    """Beam search reorders the fixed-capacity cache eagerly every step (synced, reordered, back in the same
    buffers): the beams equal the dynamic fast path's."""
    model = _fast_model()
    c = case("bonsai-improved")
    ids = random_ids(1, 40)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, num_beams=2,
                  do_sample=False)
    want = model.generate(**kwargs, **{CACHE_KWARG: fast_attention.prepare_cache(c.cache(model.config))})
    got = model.generate(**kwargs, **{CACHE_KWARG: c.cache(model.config, max_cache_len=CAPACITY)})
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------------------------------
# Inductor (CPU: slow, needs a C++ compiler) and the GPU
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("c", params("kivi2", "turboquant4", "bonsai-improved"))
def test_inductor_cpu_greedy_equals_fast_path(c):
    model = _fast_model()
    ids = random_ids(1, 40)
    want, _ = _eager_fast(model, c, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 24)
    got = _compiled_greedy(model, c.cache(model.config, max_cache_len=CAPACITY), ids, "inductor", steps=24)
    assert torch.equal(got, want)


@needs_gpu
@pytest.mark.parametrize("prompt", ["padded-40", "short-10"])
@pytest.mark.parametrize("c", params("turboquant4", "kivi2", "bonsai-improved-l2"))
def test_gpu_generate_auto_compile_equals_fast_path(c, prompt):
    """On CUDA generate compiles by itself (inductor, mode "reduce-overhead": CUDA graphs; fullgraph=True so that a
    graph break fails): the greedy tokens equal the dynamic fast path's (Triton kernels, eager). In float32, where
    inductor's fused elementwise kernels round like eager ones to ~1e-6 (in bfloat16 they may differ by an ulp).
    "short-10": a prompt shorter than the window, so the first flush and the centering means (written in place)
    happen inside captured steps; a rotated key mean kept from before them would answer wrongly."""
    model = build_tiny("llama").cuda()
    fast_attention.install(model)
    if prompt == "padded-40":
        inputs = padded_inputs("cuda")
    else:
        ids = random_ids(1, 10).cuda()
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    want, _ = generate_with_scores(model, inputs, fast_attention.prepare_cache(c.cache(model.config)), NEW_TOKENS)
    model.generation_config.compile_config = CompileConfig(fullgraph=True)
    torch._dynamo.utils.counters.clear()
    got, _ = generate_with_scores(model, inputs, c.cache(model.config, max_cache_len=CAPACITY), NEW_TOKENS)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # generate's own compiled forward ran
    assert torch.equal(got, want)


@needs_gpu
def test_gpu_compress_operators_fake_and_schema():
    x = torch.randn(1, 2, 16, 64, device="cuda")
    torch.library.opcheck(torch.ops.tq_transformers.kivi_compress_keys.default, (x, 2, 16))
    torch.library.opcheck(torch.ops.tq_transformers.kivi_compress_values.default, (x, 2, 16))
    torch.library.opcheck(torch.ops.tq_transformers.bonsai_compress.default, (x, None, None, 64, "mean_abs"))
    rotation = torch.linalg.qr(torch.randn(64, 64))[0].cuda()
    levels = torch.linspace(-0.3, 0.3, 16, device="cuda")
    torch.library.opcheck(torch.ops.tq_transformers.turboquant_compress.default, (x, None, rotation, levels, 4, True))
