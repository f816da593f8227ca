"""The fast path (`enable(..., fast=True)`, attention implementation "tq_fused") against the reference path.

CPU: the fallback of the fast path must give exactly the reference path's logits and tokens (same tensors into the
same SDPA call). GPU: the fused Triton decode must give the same greedy tokens, and logits within float32 noise.
Left-padded batches, and flushes during decoding (small flush sizes), are part of every case.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import build_tiny

import tq_transformers
from tq_transformers import fast_attention
from tq_transformers.generation import CACHE_KWARG
from tq_transformers.registry import get_method

SETTINGS = {
    "turboquant": dict(bits=4, residual_length=0, flush_size=16),
    "turboquant2": dict(bits=2, residual_length=16, flush_size=16),
    "kivi": dict(bits=2, group_size=16, residual_length=16),
    "bonsai": dict(group_size=64, residual_length=16, flush_size=16),
    "bonsai_improved": dict(group_size=64, residual_length=16, flush_size=16, center=True, rotate=True, scale="l2"),
}


def _method(name):
    return "bonsai" if name.startswith("bonsai") else "turboquant" if name.startswith("turboquant") else name


def _inputs(device):
    torch.manual_seed(1)
    ids = torch.randint(3, 500, (2, 40))
    mask = torch.ones_like(ids)
    ids[1, :15] = 0  # left padding
    mask[1, :15] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _generate(model, inputs, cache, new_tokens=24):
    out = model.generate(
        **inputs, max_new_tokens=new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True,
        **{CACHE_KWARG: cache},
    )
    return out.sequences, torch.stack(out.scores)


def _run_both(name, device, dtype=torch.float32, arch="llama"):
    """Greedy generation through the reference path and through the fast path; returns both, and the fast cache."""
    model = build_tiny(arch, dtype).to(device)
    inputs = _inputs(device)
    method, kwargs = _method(name), SETTINGS[name]
    ref_seq, ref_scores = _generate(model, inputs, get_method(method)(model.config, **kwargs))
    tq_transformers.enable(model, method, fast=True, **kwargs)
    try:
        assert model.config._attn_implementation == fast_attention.ATTN_NAME
        cache = get_method(method)(model.config, **kwargs)
        fast_attention.prepare_cache(cache)
        fast_seq, fast_scores = _generate(model, inputs, cache)
        assert cache.quantized_layers[0].num_quantized >= 32  # decoding went through packed tokens and flushes
    finally:
        tq_transformers.disable(model)
    assert model.config._attn_implementation == "sdpa"
    return ref_seq, ref_scores, fast_seq, fast_scores, cache


@pytest.mark.parametrize("name", list(SETTINGS))
def test_fast_path_fallback_equals_reference_on_cpu(name, monkeypatch):
    monkeypatch.setattr(tq_transformers.kernels, "triton_available", lambda: False)
    ref_seq, ref_scores, fast_seq, fast_scores, _ = _run_both(name, "cpu")
    assert torch.equal(fast_seq, ref_seq)
    assert torch.equal(fast_scores, ref_scores)


def test_enable_fast_generate_without_cache_matches_reference():
    model = build_tiny("llama")
    inputs = _inputs("cpu")
    ref = model.generate(**inputs, max_new_tokens=20, do_sample=False,
                         **{CACHE_KWARG: get_method("kivi")(model.config, group_size=16, residual_length=16)})
    tq_transformers.enable(model, "kivi", fast=True, group_size=16, residual_length=16)
    try:
        fast = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    finally:
        tq_transformers.disable(model)
    assert torch.equal(fast, ref)


@pytest.mark.parametrize("method", ["turboquant", "kivi", "bonsai"])
def test_prepare_cache_covers_layers_created_later(method):
    """A cache built without a config creates its layers on their first update: they get the fast path too."""
    kwargs = {"kivi": dict(group_size=16, residual_length=16),
              "bonsai": dict(group_size=32, residual_length=16, flush_size=16)}
    cache = fast_attention.prepare_cache(get_method(method)(None, **kwargs.get(method, dict(flush_size=16))))
    assert cache.layers == []
    k = torch.randn(1, 2, 64, 32)
    cache.update(k, k, 0)
    cache.update(k, k, 1)
    assert all(layer.fast_path is not None for layer in cache.layers)
    key, _ = cache.update(k[:, :, :1], k[:, :, :1], 1)  # a decode step returns the window, tagged with the view
    assert key.tq_fast_view.layer is cache.layers[1] and key.shape[-2] == cache.layers[1].keys.shape[-2]


def test_attention_function_without_view_is_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 2, True, False
    q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    got, _ = fast_attention.tq_fused_attention(module, q, k, v, None, scaling=0.25)
    want, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)
    assert torch.equal(got, want)


needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None, reason="needs CUDA and Triton"
)


@needs_gpu
@pytest.mark.parametrize("name", list(SETTINGS))
def test_fast_path_matches_reference_on_gpu(name):
    ref_seq, ref_scores, fast_seq, fast_scores, _ = _run_both(name, "cuda")
    assert torch.equal(fast_seq, ref_seq)
    torch.testing.assert_close(fast_scores, ref_scores, rtol=1e-3, atol=1e-3)


def _beams_both(name, device):
    """Beam search (3 beams: every step reorders the cache rows) on the reference path and on the fast path."""
    model = build_tiny("llama").to(device)
    ids = _inputs(device)["input_ids"][:1]
    method, kwargs = _method(name), SETTINGS[name]

    def run(cache):
        return model.generate(input_ids=ids, max_new_tokens=20, do_sample=False, num_beams=3,
                              **{CACHE_KWARG: cache})

    ref = run(get_method(method)(model.config, **kwargs))
    tq_transformers.enable(model, method, fast=True, **kwargs)
    try:
        fast = run(fast_attention.prepare_cache(get_method(method)(model.config, **kwargs)))
    finally:
        tq_transformers.disable(model)
    return ref, fast


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
def test_fast_path_on_sliding_window_model_equals_reference(device, monkeypatch):
    """Gemma3: sliding-window layers stay unquantized (plain SDPA with their window), full layers take the fast path."""
    if device == "cpu":
        monkeypatch.setattr(tq_transformers.kernels, "triton_available", lambda: False)
    ref_seq, ref_scores, fast_seq, fast_scores, cache = _run_both("turboquant", device, arch="gemma3")
    assert len(cache.quantized_layers) == 1  # (and _run_both checked it went through packed tokens and flushes)
    assert torch.equal(fast_seq, ref_seq)
    if device == "cpu":
        assert torch.equal(fast_scores, ref_scores)
    else:
        torch.testing.assert_close(fast_scores, ref_scores, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["turboquant", "kivi", "bonsai_improved"])
def test_fast_path_beam_search_equals_reference_on_cpu(name, monkeypatch):
    monkeypatch.setattr(tq_transformers.kernels, "triton_available", lambda: False)
    ref, fast = _beams_both(name, "cpu")
    assert torch.equal(fast, ref)


@needs_gpu
@pytest.mark.parametrize("name", ["turboquant", "kivi", "bonsai_improved"])
def test_fast_path_beam_search_matches_reference_on_gpu(name):
    ref, fast = _beams_both(name, "cuda")
    assert torch.equal(fast, ref)


@needs_gpu
@pytest.mark.parametrize("name", ["turboquant", "kivi", "bonsai"])
def test_fast_path_bf16_on_gpu(name):
    ref_seq, ref_scores, fast_seq, fast_scores, _ = _run_both(name, "cuda", torch.bfloat16)
    agree = (fast_seq == ref_seq).float().mean().item()
    assert agree > 0.9, f"bf16 greedy agreement {agree:.3f}"


def test_prepared_cache_on_a_model_without_the_fast_attention_raises():
    """A prepared cache hands the attention placeholders of the window only: plain SDPA would attend to the window
    alone, silently. With the model config known, the cache refuses instead."""
    model = build_tiny("llama")
    inputs = _inputs("cpu")
    cache = fast_attention.prepare_cache(get_method("turboquant")(model.config, **SETTINGS["turboquant"]))
    with pytest.raises(ValueError, match="attention implementation is 'sdpa', not 'tq_fused'"):
        model.generate(**inputs, max_new_tokens=3, do_sample=False, **{CACHE_KWARG: cache})
