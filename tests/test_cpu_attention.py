"""CPU decode attention on the packed formats (``tq_transformers.cpu_attention``) against today's reference.

- one decode step, every format the method table produces, GQA, a padded row, a window: the same output as
  ``kernels.reference.decode_attention`` (dequantize everything, then float32 attention) within float32 rounding
  (``FLOOR``: the largest difference, on values of unit scale, stays below 2e-5; measured up to 5e-6);
- greedy generation on tiny models through ``enable(..., fast=True)`` on the CPU: the same tokens as the reference
  path, logits within ``LOGIT_ATOL``; the fast path really took the CPU attention (counted), and formats it does not
  cover fall back to the reference tensors exactly;
- nothing is held between steps: the cache's storage and window are the same tensors with or without it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tq_transformers
from tq_transformers import cpu_attention, fast_attention, kernels

from cases import SHORT, build_tiny, case, padded_inputs, params
from cases import generate_with_scores as _generate

FLOOR = 2e-5  # max |cpu - reference| of one step, values of unit scale (float32 rounding; measured up to 5e-6)
LOGIT_ATOL = 1e-3  # logits of a tiny float32 model after 24 steps (measured below 1e-4)
B, HKV, G, D = 2, 2, 3, 64


def _layer_after(c, tokens: int, head_dim: int = D, value_dim: int | None = None, fit: int | None = None,
                 **overrides):
    """A quantized layer of case `c` holding `tokens` random tokens (keys offset, like real keys): keys of
    `head_dim`, values of `value_dim` (default: the same); group sizes fitted to `fit` (default: head_dim)."""
    cache = c.cache(None, head_dim=head_dim if fit is None else fit, **overrides)
    gen = torch.Generator().manual_seed(tokens)
    k = torch.randn(B, HKV, tokens, head_dim, generator=gen) + 0.5
    v = torch.randn(B, HKV, tokens, head_dim if value_dim is None else value_dim, generator=gen)
    cache.update(k, v, 0)
    return cache.layers[0]


def _step(layer, pad: int = 7):
    """(cpu, reference) outputs of one decode step over `layer`'s packed tokens and window, the second row padded."""
    pk, pv = layer.packed()
    assert cpu_attention.supported(pk, pv)
    n, w = pk.num_tokens, layer.keys.shape[2]
    q = torch.randn(B, HKV * G, layer.head_dim, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, n + w, dtype=torch.bool)
    mask[1, :pad] = False
    args = dict(q=q, keys=pk, values=pv, window_k=layer.keys, window_v=layer.values, key_mask=mask,
                scaling=layer.head_dim ** -0.5)
    return cpu_attention.decode_attention(**args), kernels.decode_attention(**args, impl="reference")


def _err(got, want) -> float:
    return (got.float() - want.float()).abs().max().item()


@pytest.mark.parametrize("c", params("turboquant4", "turboquant2", "kivi2", "kivi4", "bonsai", "bonsai-improved",
                                     "bonsai-improved-l2"))
@pytest.mark.parametrize("tokens", [200, 1100])
def test_step_matches_reference(c, tokens, monkeypatch):
    # chunks of 512 tokens (a KIVI key group is 32 or 128): 1100 packed tokens are read in three chunks, 200 in one
    monkeypatch.setattr(cpu_attention, "CHUNK_VALUES", B * HKV * D * 512)
    layer = _layer_after(c, tokens)
    assert cpu_attention._chunk_tokens(layer.packed()[0]) == 512
    assert layer.num_quantized > 0 and layer.keys.shape[2] > 0  # packed tokens and a window
    got, want = _step(layer)
    assert got.shape == want.shape == (B, HKV * G, D) and got.dtype == want.dtype
    assert _err(got, want) < FLOOR, _err(got, want)


def test_bonsai_groups_and_bf16_query():
    """Several scale groups per vector (group 16 of 64 coordinates); a bf16 model: the output in bf16."""
    layer = _layer_after(case("bonsai-improved"), 300, group_size=16)
    pk, _ = layer.packed()
    assert pk.group_size == 16
    got, want = _step(layer)
    assert _err(got, want) < FLOOR
    pk, pv = layer.packed()
    q = torch.randn(B, HKV * G, D).bfloat16()
    args = dict(q=q, keys=pk, values=pv, window_k=layer.keys, window_v=layer.values, key_mask=None, scaling=0.125)
    got = cpu_attention.decode_attention(**args)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, kernels.decode_attention(**args, impl="reference"))


@pytest.mark.parametrize("c", params("turboquant3", "turboquant2.5", "turboquant3.5", "mixed-kivi2-tq3.5"))
@pytest.mark.parametrize("tokens", [200, 1100])
def test_other_widths_and_splits_match_reference(c, tokens, monkeypatch):
    """3-bit codes (across byte boundaries: unpacked, then looked up) and two-rate splits (part by part), in chunks."""
    monkeypatch.setattr(cpu_attention, "CHUNK_VALUES", B * HKV * D * 256)
    layer = _layer_after(c, tokens)
    assert layer.num_quantized > 0 and layer.keys.shape[2] > 0
    got, want = _step(layer)
    assert got.shape == want.shape == (B, HKV * G, D) and got.dtype == want.dtype
    assert _err(got, want) < FLOOR, _err(got, want)


@pytest.mark.parametrize("c", params("turboquant4", "turboquant2.5", "kivi2", "bonsai-improved", "mixed-tq4-bonsai",
                                     "mixed-kivi2-tq3.5"))
@pytest.mark.parametrize("dims", [(192, 128), (128, 64)], ids=["dk192dv128", "dk128dv64"])
def test_keys_and_values_of_different_head_dims(c, dims, monkeypatch):
    """MLA-style heads (DeepSeek-V3's 192-dim keys, 128-dim values; and 128 / 64): each side at its own dim, in
    chunks (600 packed tokens read 256 at a time), the output of the values' dim."""
    dk, dv = dims
    monkeypatch.setattr(cpu_attention, "CHUNK_VALUES", B * HKV * dk * 256)
    layer = _layer_after(c, 600, head_dim=dk, value_dim=dv, fit=64)  # group sizes of 64 or less divide both
    pk, pv = layer.packed()
    assert (pk.head_dim, pv.head_dim) == dims and layer.keys.shape[2] > 0
    got, want = _step(layer)
    assert got.shape == want.shape == (B, HKV * G, dv) and got.dtype == want.dtype
    assert _err(got, want) < FLOOR, _err(got, want)


def test_unsupported_views():
    """The QJL variant (no format) and affine codes across byte boundaries are left to the reference path."""
    assert not cpu_attention.supported(*_layer_after(case("turboquant3-qjl"), 200).packed())
    assert not cpu_attention.supported(None, None)
    kk, kv = _layer_after(case("kivi2"), 200).packed()
    assert cpu_attention.supported(kk, kv)
    assert not cpu_attention.supported(kk, dataclasses.replace(kv, bits=3))


def _generate_both(c, arch: str = "llama", monkeypatch=None, **overrides):
    """Greedy generation on the reference path, then through enable(fast=True) on the CPU; counts CPU steps."""
    model = build_tiny(arch)
    inputs = padded_inputs("cpu")
    ref_seq, ref_scores = _generate(model, inputs, c.cache(model.config, **overrides))
    calls = []
    original = cpu_attention.decode_attention
    monkeypatch.setattr(cpu_attention, "decode_attention", lambda **kw: calls.append(1) or original(**kw))
    tq_transformers.enable(model, c.method, fast=True, **c.kwargs(model.config, **overrides))
    try:
        cache = fast_attention.prepare_cache(c.cache(model.config, **overrides))
        fast_seq, fast_scores = _generate(model, inputs, cache)
    finally:
        tq_transformers.disable(model)
    return ref_seq, ref_scores, fast_seq, fast_scores, len(calls)


@pytest.mark.parametrize("c", params(*SHORT, "turboquant3", "turboquant2.5"))
def test_greedy_tokens_equal_reference_path(c, monkeypatch):
    ref_seq, ref_scores, fast_seq, fast_scores, calls = _generate_both(c, monkeypatch=monkeypatch)
    assert calls > 0  # the CPU attention ran (3 layers x the steps with packed tokens)
    assert torch.equal(fast_seq, ref_seq)
    torch.testing.assert_close(fast_scores, ref_scores, rtol=0, atol=LOGIT_ATOL)


@pytest.mark.parametrize("c", params("turboquant4", "kivi2", "bonsai"))
def test_sink_tokens_attended_with_the_window(c, monkeypatch):
    """Exact sink tokens (the first 4, padding included) join the full-precision run the CPU attention reads, with
    the mask's columns moved with them: the same tokens as the reference path, logits within float rounding."""
    ref_seq, ref_scores, fast_seq, fast_scores, calls = _generate_both(c, monkeypatch=monkeypatch, sink_tokens=4)
    assert calls > 0 and torch.equal(fast_seq, ref_seq)
    torch.testing.assert_close(fast_scores, ref_scores, rtol=0, atol=LOGIT_ATOL)


def test_sinks_into_window_moves_the_mask_columns():
    """The window gets [sinks, window] and the mask [packed, sinks, window]: checked on named columns."""
    layer = _layer_after(case("turboquant4"), 300, sink_tokens=4)
    s, n, w = layer.num_sinks, layer.num_quantized, layer.keys.shape[-2]
    view = fast_attention.FastView(layer, n, layer.keys, layer.values, w)
    mask = torch.arange(s + n + w).expand(B, -1) % 3 != 0  # a pattern that tells the columns apart
    wk, wv, moved = fast_attention._sinks_into_window(view, mask, torch.float32)
    assert torch.equal(wk[:, :, :s], layer.sink_keys) and torch.equal(wv[:, :, s:], layer.values)
    assert torch.equal(moved[:, :n], mask[:, s:s + n]) and torch.equal(moved[:, n:n + s], mask[:, :s])
    assert torch.equal(moved[:, n + s:], mask[:, s + n:])


def test_sliding_window_model(monkeypatch):
    """Gemma3: its sliding-window layers stay unquantized (plain SDPA), its full layer takes the CPU attention."""
    ref_seq, ref_scores, fast_seq, fast_scores, calls = _generate_both(case("bonsai"), "gemma3", monkeypatch)
    assert calls > 0 and torch.equal(fast_seq, ref_seq)
    torch.testing.assert_close(fast_scores, ref_scores, rtol=0, atol=LOGIT_ATOL)


def test_unsupported_format_falls_back_exactly(monkeypatch):
    """TurboQuant-3 QJL (no format view): the fast path rebuilds the reference path's tensors, bit for bit."""
    ref_seq, ref_scores, fast_seq, fast_scores, calls = _generate_both(case("turboquant3-qjl"),
                                                                       monkeypatch=monkeypatch)
    assert calls == 0
    assert torch.equal(fast_seq, ref_seq) and torch.equal(fast_scores, ref_scores)


def test_nothing_held_between_steps():
    """A decode step leaves the layer's storage as it was: the same tensors, no dequantized copy added."""
    layer = _layer_after(case("turboquant4"), 300)
    before = {name: t for name, t in layer.storage.items()}
    _step(layer)
    assert layer.storage.keys() == before.keys()
    assert all(layer.storage[name] is t for name, t in before.items())
