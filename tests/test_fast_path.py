"""The fast path (`enable(..., fast=True)`, attention implementation "tq_fused") against the reference path.

CPU: the fallback of the fast path must give exactly the reference path's logits and tokens (same tensors into the
same SDPA call). GPU: the fused Triton decode must give the same greedy tokens, and logits within float32 noise.
Left-padded batches, and flushes during decoding (small flush sizes), are part of every case.
"""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import tq_transformers
from tq_transformers import cpu_attention, fast_attention
from tq_transformers.fast_attention import attn_implementation_of
from tq_transformers.generation import CACHE_KWARG

from cases import FAST, GPU, SHORT, assert_valid_tokens, build_tiny, case, needs_gpu, padded_inputs, params
from cases import generate_with_scores as _generate


@pytest.fixture
def no_triton(monkeypatch):
    """The fallback (the reference path's tensors into SDPA), even on a GPU machine and for the formats the CPU
    attention covers (tested against the reference in test_cpu_attention.py)."""
    monkeypatch.setattr(tq_transformers.kernels, "triton_available", lambda: False)
    monkeypatch.setattr(cpu_attention, "supported", lambda keys, values: False)


def _run_both(c, device, dtype=torch.float32, arch="llama"):
    """Greedy generation through the reference path and through the fast path; returns both, and the fast cache."""
    model = build_tiny(arch, dtype).to(device)
    inputs = padded_inputs(device)
    ref_seq, ref_scores = _generate(model, inputs, c.cache(model.config))
    tq_transformers.enable(model, c.method, fast=True, cuda_graphs=False, **c.kwargs(model.config))
    try:
        assert attn_implementation_of(model.config) == fast_attention.ATTN_NAME
        cache = fast_attention.prepare_cache(c.cache(model.config))
        fast_seq, fast_scores = _generate(model, inputs, cache)
        assert cache.quantized_layers[0].num_quantized >= 32  # decoding went through packed tokens and flushes
    finally:
        tq_transformers.disable(model)
    assert attn_implementation_of(model.config) == "sdpa"
    assert_valid_tokens(fast_seq, inputs["input_ids"])
    return ref_seq, ref_scores, fast_seq, fast_scores, cache


@pytest.mark.parametrize("c", params(*FAST, "turboquant3-qjl"))
def test_fast_path_fallback_equals_reference_on_cpu(c, no_triton):
    ref_seq, ref_scores, fast_seq, fast_scores, _ = _run_both(c, "cpu")
    assert torch.equal(fast_seq, ref_seq)
    assert torch.equal(fast_scores, ref_scores)


def test_enable_fast_generate_without_cache_matches_reference():
    model = build_tiny("llama")
    inputs = padded_inputs("cpu")
    c = case("kivi2")
    ref = model.generate(**inputs, max_new_tokens=20, do_sample=False, **{CACHE_KWARG: c.cache(model.config)})
    tq_transformers.enable(model, c.method, fast=True, **c.kwargs(model.config))
    try:
        fast = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    finally:
        tq_transformers.disable(model)
    assert torch.equal(fast, ref)


@pytest.mark.parametrize("c", params("turboquant4", "kivi2", "bonsai"))
def test_prepare_cache_covers_layers_created_later(c):
    """A cache built without a config creates its layers on their first update: they get the fast path too."""
    cache = fast_attention.prepare_cache(c.cache(None, head_dim=32))
    assert cache.layers == []
    k = torch.randn(1, 2, 64, 32)
    cache.update(k, k, 0)
    cache.update(k, k, 1)
    assert all(layer.fast_path is not None and layer.use_kernels for layer in cache.layers)
    key, _ = cache.update(k[:, :, :1], k[:, :, :1], 1)  # a decode step returns the window, tagged with the view
    view = key.tq_fast_view
    assert view.layer is cache.layers[1] and key.shape[-2] == cache.layers[1].keys.shape[-2]
    assert view.num_quantized == cache.layers[1].num_quantized  # no flush in this step: all held packed tokens


def test_attention_function_without_view_is_sdpa():
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 2, True, False
    q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    got, _ = fast_attention.tq_fused_attention(module, q, k, v, None, scaling=0.25)
    want, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)
    assert torch.equal(got, want)


@needs_gpu
@pytest.mark.parametrize("c", params(*FAST))
def test_fast_path_matches_reference_on_gpu(c):
    ref_seq, ref_scores, fast_seq, fast_scores, _ = _run_both(c, "cuda")
    assert torch.equal(fast_seq, ref_seq)
    torch.testing.assert_close(fast_scores, ref_scores, rtol=1e-3, atol=1e-3)


def _beams_both(c, device):
    """Beam search (3 beams: every step reorders the cache rows) on the reference path and on the fast path."""
    model = build_tiny("llama").to(device)
    ids = padded_inputs(device)["input_ids"][:1]

    def run(cache):
        return model.generate(input_ids=ids, max_new_tokens=20, do_sample=False, num_beams=3,
                              **{CACHE_KWARG: cache})

    ref = run(c.cache(model.config))
    tq_transformers.enable(model, c.method, fast=True, cuda_graphs=False, **c.kwargs(model.config))
    try:
        fast = run(fast_attention.prepare_cache(c.cache(model.config)))
    finally:
        tq_transformers.disable(model)
    assert_valid_tokens(fast, ids)
    return ref, fast


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_fast_path_on_sliding_window_model_equals_reference(device, monkeypatch):
    """Gemma3: sliding-window layers stay unquantized (plain SDPA with their window), full layers take the fast path."""
    if device == "cpu":  # the fallback (test_cpu_attention.py covers the CPU attention on this model)
        monkeypatch.setattr(tq_transformers.kernels, "triton_available", lambda: False)
        monkeypatch.setattr(cpu_attention, "supported", lambda keys, values: False)
    ref_seq, ref_scores, fast_seq, fast_scores, cache = _run_both(case("turboquant4"), device, arch="gemma3")
    assert len(cache.quantized_layers) == 1  # (and _run_both checked it went through packed tokens and flushes)
    assert torch.equal(fast_seq, ref_seq)
    if device == "cpu":
        assert torch.equal(fast_scores, ref_scores)
    else:
        torch.testing.assert_close(fast_scores, ref_scores, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("c", params(*SHORT))
def test_fast_path_beam_search_equals_reference_on_cpu(c, no_triton):
    ref, fast = _beams_both(c, "cpu")
    assert torch.equal(fast, ref)


@needs_gpu
@pytest.mark.parametrize("c", params(*SHORT))
def test_fast_path_beam_search_matches_reference_on_gpu(c):
    ref, fast = _beams_both(c, "cuda")
    assert torch.equal(fast, ref)


@needs_gpu
@pytest.mark.parametrize("c", params("turboquant4", "kivi2", "bonsai"))
def test_fast_path_bf16_on_gpu(c):
    ref_seq, ref_scores, fast_seq, fast_scores, _ = _run_both(c, "cuda", torch.bfloat16)
    agree = (fast_seq == ref_seq).float().mean().item()
    assert agree > 0.9, f"bf16 greedy agreement {agree:.3f}"


def test_prepared_cache_on_a_model_without_the_fast_attention_raises():
    """A prepared cache hands the attention placeholders of the window only: plain SDPA would attend to the window
    alone, silently. With the model config known, the cache refuses instead."""
    model = build_tiny("llama")
    inputs = padded_inputs("cpu")
    cache = fast_attention.prepare_cache(case("turboquant4").cache(model.config))
    with pytest.raises(ValueError, match="attention implementation is 'sdpa', not 'tq_fused'"):
        model.generate(**inputs, max_new_tokens=3, do_sample=False, **{CACHE_KWARG: cache})
