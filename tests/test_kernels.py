"""Kernels against their PyTorch references.

CPU (always): the references in ``tq_transformers.kernels.reference`` against the layers themselves: compress gives
the layer's codes exactly, decode attention equals plain dequantize + softmax attention.

GPU (skipped without CUDA and Triton): the Triton kernels against the references on random and outlier-heavy inputs,
head dims 64, 128 and 96 (TurboQuant's matrix rotation), GQA ratios, batch sizes, lengths, with left padding.
The same GPU tests run on the CPU under Triton's interpreter with ``TRITON_INTERPRET=1`` (slow; for development).
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from tq_transformers import BonsaiCache, KIVICache, TurboQuantCache
from tq_transformers.base import StaticShared
from tq_transformers.kernels import compress_block, decode_attention

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
needs_kernels = pytest.mark.skipif(not HAS_TRITON or KERNEL_DEVICE is None, reason="needs CUDA and Triton")

CACHES = {
    "turboquant4": lambda d: TurboQuantCache(bits=4),
    "turboquant2": lambda d: TurboQuantCache(bits=2, residual_length=128),
    "turboquant1": lambda d: TurboQuantCache(bits=1),
    "turboquant4_nocenter": lambda d: TurboQuantCache(bits=4, center=False, norm_correction=False),
    "kivi2": lambda d: KIVICache(bits=2),
    "kivi4": lambda d: KIVICache(bits=4, group_size=32, residual_length=32),
    "bonsai": lambda d: BonsaiCache(group_size=min(d, 128)),
    "bonsai_improved": lambda d: BonsaiCache.improved(group_size=min(d, 128)),
    "bonsai_g32": lambda d: BonsaiCache(group_size=32, center=True),
}


def make_inputs(b, h, t, d, outliers: bool, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, t, d, generator=gen)
    if outliers:  # Qwen2.5-like: a shared offset and a few huge channels
        x = x + 4 * torch.randn(1, h, 1, d, generator=gen)
        x[..., : max(1, d // 32)] *= 30
    return x.to(dtype=dtype, device=device)


def filled_layer(name, b, hkv, d, n, outliers=False, dtype=torch.float32, device="cpu", seed=0):
    """Layer 0 of a cache after a prefill of n tokens and one decode token; returns (cache, layer)."""
    cache = CACHES[name](d)
    k = make_inputs(b, hkv, n, d, outliers, dtype, device, seed)
    v = make_inputs(b, hkv, n, d, outliers, dtype, device, seed + 1)
    cache.update(k, v, 0)
    k1 = make_inputs(b, hkv, 1, d, outliers, dtype, device, seed + 2)
    v1 = make_inputs(b, hkv, 1, d, outliers, dtype, device, seed + 3)
    cache.update(k1, v1, 0)
    return cache, cache.layers[0]


def left_padding_mask(b, total, device):
    mask = torch.ones(b, total, dtype=torch.bool, device=device)
    for row in range(1, b):
        mask[row, : 37 * row] = False
    return mask


def plain_attention(layer, q, key_mask, scaling):
    """Dequantize everything with the layer's own code and run torch's SDPA (repeat_kv for GQA)."""
    old_k, old_v = layer._dequantize(torch.float32)
    keys = torch.cat([old_k, layer.keys.float()], 2)
    values = torch.cat([old_v, layer.values.float()], 2)
    g = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float().unsqueeze(2), keys, values, attn_mask=mask, scale=scaling
    )
    return out.squeeze(2)


# ----------------------------------------------------------------------------------------------------------------------
# CPU: references against the layers
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CACHES))
@pytest.mark.parametrize("outliers", [False, True])
def test_reference_compress_equals_layer(name, outliers):
    cache, layer = filled_layer(name, 2, 2, 64, 300, outliers)
    k = make_inputs(2, 2, 128, 64, outliers, torch.float32, "cpu", seed=9)
    v = make_inputs(2, 2, 128, 64, outliers, torch.float32, "cpu", seed=10)
    expected = layer._quantize_block(k, v)
    got = compress_block(layer, k, v, impl="reference")
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("name", list(CACHES))
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_reference_decode_equals_plain_attention(name, gqa, padded):
    b, hkv, d = 3, 2, 64
    cache, layer = filled_layer(name, b, hkv, d, 333, outliers=True)
    n_q = layer.num_quantized
    assert n_q > 0
    total = n_q + layer.keys.shape[2]
    q = make_inputs(b, hkv * gqa, 1, d, False, torch.float32, "cpu", seed=5)[:, :, 0]
    mask = left_padding_mask(b, total, "cpu") if padded else None
    scaling = 1 / math.sqrt(d)
    got = decode_attention(layer, q, n_q, layer.keys, layer.values, mask, scaling, impl="reference")
    want = plain_attention(layer, q, mask, scaling)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# GPU: Triton kernels against the references
# ----------------------------------------------------------------------------------------------------------------------
def _near_edge(layer, kv, x):
    """Mask `[B, H, T, D]` of rotated TurboQuant coordinates within 1e-5 of a bucket edge (ties in fp32 order)."""
    codec = layer.k_codec if kv == "k" else layer.v_codec
    x = x.float()
    if layer.cfg.center:
        x = x - layer.storage[f"{kv}_mean"].float()
    y = (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)) @ codec.rotation.T
    return (y.unsqueeze(-1) - codec.edges).abs().min(-1).values < 1e-5


def _assert_codes_match(layer, key, got, want, k, v):
    if torch.equal(got, want):
        return
    from tq_transformers.packing import unpack_bits

    assert key.endswith("_codes") and layer.cfg.__class__.__name__ == "TurboQuantConfig", key
    bits = layer.cfg.bits
    diff = unpack_bits(got, bits) != unpack_bits(want, bits)
    near = _near_edge(layer, key[0], k if key[0] == "k" else v)
    # differences only where the rotated coordinate sits on a bucket edge, up to fp32 summation order
    assert not bool((diff & ~near).any()), f"{key}: {int(diff.sum())} codes differ away from bucket edges"


@needs_kernels
@pytest.mark.parametrize("name", list(CACHES))
@pytest.mark.parametrize("d", [64, 128, 96])
@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_compress_matches_layer(name, d, outliers, dtype):
    if d == 96 and not name.startswith("turboquant"):
        pytest.skip("non-power-of-two head_dim is exercised for TurboQuant's matrix rotation")
    cache, layer = filled_layer(name, 2, 3, d, 260, outliers, dtype, KERNEL_DEVICE)
    k = make_inputs(2, 3, 128, d, outliers, dtype, KERNEL_DEVICE, seed=11)
    v = make_inputs(2, 3, 128, d, outliers, dtype, KERNEL_DEVICE, seed=12)
    want = layer._quantize_block(k, v)
    got = compress_block(layer, k, v, impl="triton")
    assert set(got) == set(want)
    for key in want:
        if "codes" in key or "signs" in key:
            _assert_codes_match(layer, key, got[key], want[key], k, v)
        else:  # fp16 metadata: equal up to one fp16 rounding of a float32 sum taken in another order
            torch.testing.assert_close(got[key].float(), want[key].float(), rtol=1e-3, atol=0)


DECODE_CASES = [
    # name, batch, kv heads, gqa, head_dim, prefill length, dtype
    ("turboquant4", 1, 2, 4, 128, 1000, torch.float32),
    ("turboquant4", 3, 2, 4, 128, 700, torch.bfloat16),
    ("turboquant4", 2, 2, 2, 96, 600, torch.float32),
    ("turboquant4", 2, 1, 8, 64, 2100, torch.bfloat16),
    ("turboquant2", 2, 2, 4, 128, 900, torch.float16),
    ("turboquant4", 2, 2, 4, 128, 900, torch.float16),
    ("turboquant1", 2, 2, 4, 64, 900, torch.bfloat16),
    ("turboquant4_nocenter", 2, 2, 1, 128, 500, torch.float32),
    ("kivi2", 1, 2, 4, 128, 1000, torch.float32),
    ("kivi2", 3, 2, 4, 128, 700, torch.bfloat16),
    ("kivi4", 2, 1, 8, 64, 2100, torch.bfloat16),
    ("kivi2", 2, 2, 4, 128, 900, torch.float16),
    ("bonsai", 1, 2, 4, 128, 1000, torch.float32),
    ("bonsai", 3, 2, 4, 64, 700, torch.bfloat16),
    ("bonsai", 2, 2, 4, 128, 900, torch.float16),
    ("bonsai_improved", 2, 2, 4, 128, 900, torch.bfloat16),
    ("bonsai_improved", 2, 2, 2, 96, 600, torch.float32),
    ("bonsai_g32", 2, 2, 4, 128, 900, torch.float32),
    ("bonsai_g32", 2, 2, 4, 128, 900, torch.float16),
]


@needs_kernels
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"{c[0]}-b{c[1]}h{c[2]}g{c[3]}d{c[4]}n{c[5]}-{c[6]}")
@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_triton_decode_matches_reference(case, outliers, padded):
    name, b, hkv, gqa, d, n, dtype = case
    if INTERPRET and (n > 1000 or outliers):
        pytest.skip("kept short under the interpreter")
    cache, layer = filled_layer(name, b, hkv, d, n, outliers, dtype, KERNEL_DEVICE)
    n_q = layer.num_quantized
    total = n_q + layer.keys.shape[2]
    q = make_inputs(b, hkv * gqa, 1, d, False, dtype, KERNEL_DEVICE, seed=5)[:, :, 0]
    mask = left_padding_mask(b, total, KERNEL_DEVICE) if padded else None
    scaling = 1 / math.sqrt(d)
    want = decode_attention(layer, q, n_q, layer.keys, layer.values, mask, scaling, impl="reference")
    got = decode_attention(layer, q, n_q, layer.keys, layer.values, mask, scaling, impl="triton")
    assert got.dtype == q.dtype and got.shape == q.shape
    # float32: exact math up to summation order; bf16/fp16: dequantized tiles rounded to the model dtype, as the
    # reference path does before SDPA
    scale = want.float().abs().amax().clamp_min(1.0)
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    err = (got.float() - want.float()).abs().amax() / scale
    assert err < tol, f"max error {err:.3g} (relative to max |out| {scale:.3g})"


@needs_kernels
def test_triton_decode_reads_only_the_attended_prefix():
    """The fast path attends to the tokens packed before this step's flush: later packed tokens are ignored."""
    cache, layer = filled_layer("turboquant4", 2, 2, 128, 700, False, torch.float32, KERNEL_DEVICE)
    q = make_inputs(2, 8, 1, 128, False, torch.float32, KERNEL_DEVICE, seed=5)[:, :, 0]
    n_q = layer.num_quantized - 128
    wk = torch.cat([layer._dequantize(torch.float32)[0][:, :, n_q:], layer.keys], 2)
    wv = torch.cat([layer._dequantize(torch.float32)[1][:, :, n_q:], layer.values], 2)
    want = decode_attention(layer, q, n_q, wk, wv, None, 0.1, impl="reference")
    got = decode_attention(layer, q, n_q, wk, wv, None, 0.1, impl="triton")
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)


@needs_kernels
@pytest.mark.parametrize("name", ["turboquant4", "kivi2", "bonsai_improved"])
def test_triton_kernels_take_strided_states(name):
    """Llama's attention hands the cache `[B, H, T, D]` views of `[B, T, H, D]` tensors, which an empty window keeps
    as they are: the compress kernels, and the decode kernel reading such a window, give exactly what contiguous
    copies give."""
    b, hkv, d = 2, 2, 64
    cache, layer = filled_layer(name, b, hkv, d, 300, device=KERNEL_DEVICE)
    k = make_inputs(b, 128, hkv, d, True, torch.float32, KERNEL_DEVICE, seed=11).transpose(1, 2)
    v = make_inputs(b, 128, hkv, d, True, torch.float32, KERNEL_DEVICE, seed=12).transpose(1, 2)
    assert not k.is_contiguous()
    got = compress_block(layer, k, v, impl="triton")
    want = compress_block(layer, k.contiguous(), v.contiguous(), impl="triton")
    for key in want:
        assert torch.equal(got[key], want[key]), key
    wk = make_inputs(b, 5, hkv, d, False, torch.float32, KERNEL_DEVICE, seed=13).transpose(1, 2)
    wv = make_inputs(b, 5, hkv, d, False, torch.float32, KERNEL_DEVICE, seed=14).transpose(1, 2)
    q = make_inputs(b, hkv * 4, 1, d, False, torch.float32, KERNEL_DEVICE, seed=15)[:, :, 0]
    n_q = layer.num_quantized
    got = decode_attention(layer, q, n_q, wk, wv, None, d**-0.5, impl="triton")
    want = decode_attention(layer, q, n_q, wk.contiguous(), wv.contiguous(), None, d**-0.5, impl="triton")
    assert torch.equal(got, want)


@needs_kernels
@pytest.mark.parametrize("name", ["turboquant4", "kivi2", "bonsai_improved"])
@pytest.mark.parametrize("padded", [False, True])
def test_triton_decode_with_device_lengths(name, padded):
    """The static layout's call (CUDA-graph steps): counts read on the device, the grid sized by a larger capacity,
    storage and window buffers whose unused tails hold garbage (NaN, 0xFF codes): the exact call's output, within
    the float32 noise of a different split of the packed tokens; the reference gives exactly its exact output."""
    b, hkv, d = 2, 2, 64
    cache, layer = filled_layer(name, b, hkv, d, 300, device=KERNEL_DEVICE)
    n_q, w = layer.num_quantized, layer.keys.shape[2]
    q = make_inputs(b, hkv * 4, 1, d, False, torch.float32, KERNEL_DEVICE, seed=5)[:, :, 0]
    mask = left_padding_mask(b, n_q + w, KERNEL_DEVICE) if padded else None
    want = decode_attention(layer, q, n_q, layer.keys, layer.values, mask, d**-0.5, impl="triton")
    want_ref = decode_attention(layer, q, n_q, layer.keys, layer.values, mask, d**-0.5, impl="reference")
    capacity = n_q + 8 * layer.cfg.flush_size
    key_mask = torch.zeros(b, capacity + 300, dtype=torch.bool, device=KERNEL_DEVICE)  # garbage past n_q + w
    key_mask[:, : n_q + w] = True if mask is None else mask
    lengths = torch.tensor([n_q, w, w], device=KERNEL_DEVICE)
    layer.enter_static(capacity, StaticShared(lengths, key_mask))
    st = layer.static
    for name_, buf in st.reserved.items():
        held = layer.storage[name_].shape[2]
        buf[:, :, held:] = 255 if buf.dtype == torch.uint8 else float("nan")
    st.win_k[:, :, w:], st.win_v[:, :, w:] = float("nan"), float("nan")
    args = (layer, q, capacity, st.win_k, st.win_v, key_mask if padded else None, d**-0.5)
    got = decode_attention(*args, impl="triton", lengths=lengths)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
    assert torch.equal(decode_attention(*args, impl="reference", lengths=lengths), want_ref)
