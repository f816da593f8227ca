"""Kernels against their PyTorch references, model-free (packed views built with the methods' encoders).

CPU (always): ``kernels.reference.decode_attention`` against the formats' ``dequantize()`` + torch's SDPA (GQA by
repeat_interleave), with and without device-style ``lengths``; argument checks.

GPU (skipped without CUDA and Triton; also run on the CPU under Triton's interpreter with ``TRITON_INTERPRET=1``, slow):

- compress kernels: codes exactly equal to the encoders' (TurboQuant codes may differ only where a rotated
  coordinate lies within 1e-5 of a bucket edge: float32 summation order), metadata within one fp16 rounding;
- decode attention (``impl="triton"``: the default GPU path, ``"triton_only"``: the Triton split kernel, ``"cuda"``:
  the CUDA split kernel at any length, where it covers the pair): against the reference on random and outlier-heavy
  inputs, head dims 64 / 128 / 256, GQA 1 / 4 / 8,
  batch 1 / 8, lengths that are not multiples of the block, left padding, float32 / float16 / bfloat16, mixed
  key / value formats, and device ``lengths`` with capacity buffers whose unused tails hold garbage.

Error floor of the decode outputs, max |got - want| / max(1, max |want|): 2e-4 in float32 (summation order only);
3e-2 in 16-bit models (the dequantized tiles and the probabilities enter the tensor cores rounded to the model dtype,
as the reference path rounds dequantized keys and values before SDPA).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch

from tq_transformers import BonsaiCache, KIVICache, MixedCache, TurboQuantCache, kernels
from tq_transformers.codebooks import codebook
from tq_transformers.formats import ChannelAffinePacked, CodebookPacked, SplitCodebookPacked, TokenAffinePacked
from tq_transformers.kernels import reference
from tq_transformers.methods.bonsai import bonsai_encode, sign_levels
from tq_transformers.methods.kivi import kivi_encode_keys, kivi_encode_values
from tq_transformers.methods.turboquant import rate_split, turboquant_encode, turboquant_encode_split
from tq_transformers.packing import unpack_bits
from tq_transformers.rotation import random_rotation

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
needs_kernels = pytest.mark.skipif(not HAS_TRITON or DEVICE is None, reason="needs CUDA and Triton")
F32_FLOOR, HALF_FLOOR = 2e-4, 3e-2
META = torch.float16  # the stored metadata dtype of every format (tq_transformers.constants.METADATA_DTYPE)


# ----------------------------------------------------------------------------------------------------------------------
# Packed sides: the one table of formats
# ----------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Side:
    """How one side (keys or values) is packed: a format and its settings."""

    id: str
    kind: str  # "turboquant", "bonsai", "kivi"
    bits: float = 4  # a fractional TurboQuant rate packs a two-rate split (formats.SplitCodebookPacked)
    center: bool = True
    rotate: bool = True
    group_size: int = 128
    scale_mode: str = "mean_abs"

    def pack(self, x: torch.Tensor, keys: bool, seed: int):
        """x ``[B, H, T, D]`` (model dtype) -> the packed view of this side."""
        d = x.shape[-1]
        mean = x.float().mean(2, keepdim=True).to(META) if self.center else None
        if self.kind == "turboquant" and self.bits != int(self.bits):
            rot, split = random_rotation(d, seed, x.device), rate_split(self.bits, d)
            levels = tuple(codebook(b, d, x.device) for b, _ in split)
            codes, norms = turboquant_encode_split(x, mean, rot, levels, split)
            parts = tuple(CodebookPacked(c, norms, lv, b) for c, lv, (b, _) in zip(codes, levels, split))
            return SplitCodebookPacked(parts, rot, mean)
        if self.kind == "turboquant":
            rot, levels = random_rotation(d, seed, x.device), codebook(self.bits, d, x.device)
            codes, norms = turboquant_encode(x, mean, rot, levels, self.bits)
            return CodebookPacked(codes, norms, levels, self.bits, rot, mean)
        if self.kind == "bonsai":
            rot = random_rotation(d, seed, x.device) if self.rotate else None
            signs, scale = bonsai_encode(x, mean, rot, min(self.group_size, d), self.scale_mode)
            return CodebookPacked(signs, scale, sign_levels(x.device), 1, rot, mean)
        g = self.group_size
        if keys:
            return ChannelAffinePacked(*kivi_encode_keys(x, self.bits, g), self.bits, g)
        return TokenAffinePacked(*kivi_encode_values(x, self.bits, min(g, d)), self.bits, min(g, d))


TQ4 = Side("tq4", "turboquant", 4)
TQ2 = Side("tq2", "turboquant", 2)
TQ1 = Side("tq1", "turboquant", 1)
TQ3 = Side("tq3", "turboquant", 3)  # decoded a coordinate at a time (codes across bytes)
TQ25 = Side("tq2.5", "turboquant", 2.5)  # two-rate splits: 3 + 2 bits, 4 + 3 bits
TQ35 = Side("tq3.5", "turboquant", 3.5)
TQ4_PLAIN = Side("tq4plain", "turboquant", 4, center=False)
BONSAI = Side("bonsai", "bonsai", 1, center=False, rotate=False)
BONSAI_IMPROVED = Side("bonsaiimp", "bonsai", 1, scale_mode="l2")
BONSAI_G32 = Side("bonsaig32", "bonsai", 1, group_size=32)
BONSAI_G64 = Side("bonsaig64", "bonsai", 1, group_size=64)  # divides 192 and 128 (3 and 2 groups)
KIVI2 = Side("kivi2", "kivi", 2, center=False, group_size=32)
KIVI4 = Side("kivi4", "kivi", 4, center=False, group_size=32)


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    keys: Side
    values: Side
    batch: int = 2
    kv_heads: int = 2
    gqa: int = 4
    head_dim: int = 128  # of the keys (and the query)
    packed: int = 300  # packed tokens (a multiple of the KIVI key group when keys are KIVI)
    window: int = 5
    dtype: torch.dtype = torch.bfloat16
    value_dim: int | None = None  # the values' head dim when it differs (MLA-style: keys 192, values 128)

    @property
    def dv(self) -> int:
        return self.head_dim if self.value_dim is None else self.value_dim

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        dims = f"d{self.head_dim}" if self.value_dim is None else f"dk{self.head_dim}dv{self.value_dim}"
        return f"{self.keys.id}-{self.values.id}-b{self.batch}h{self.kv_heads}g{self.gqa}{dims}n{self.packed}-{dt}"


DECODE_CASES = [
    DecodeCase(TQ4, TQ4, dtype=torch.float32),
    DecodeCase(TQ4, TQ4),
    DecodeCase(TQ4, TQ4, dtype=torch.float16),
    DecodeCase(TQ4, TQ4, batch=8, kv_heads=1, gqa=8, head_dim=64, packed=1000),
    DecodeCase(TQ4, TQ4, batch=1, gqa=1, head_dim=256, packed=333),
    DecodeCase(TQ4_PLAIN, TQ4_PLAIN, gqa=1),
    DecodeCase(TQ2, TQ2, dtype=torch.float16),
    DecodeCase(TQ1, TQ1, head_dim=64),
    DecodeCase(TQ4, TQ2),
    DecodeCase(TQ4, BONSAI_IMPROVED),
    DecodeCase(BONSAI, BONSAI, dtype=torch.float32),
    DecodeCase(BONSAI, BONSAI),
    DecodeCase(BONSAI, BONSAI, batch=8, gqa=8, head_dim=64, packed=777, dtype=torch.float16),
    DecodeCase(BONSAI_IMPROVED, BONSAI_IMPROVED, head_dim=256, gqa=1),
    DecodeCase(BONSAI_G32, BONSAI_G32),
    DecodeCase(BONSAI_G32, BONSAI_G32, dtype=torch.float32),
    DecodeCase(KIVI2, KIVI2, dtype=torch.float32, packed=320),
    DecodeCase(KIVI2, KIVI2, packed=320),
    DecodeCase(KIVI4, KIVI4, batch=8, kv_heads=1, gqa=8, head_dim=64, packed=992, dtype=torch.float16),
    DecodeCase(KIVI2, KIVI2, batch=1, gqa=1, head_dim=256, packed=160),
    DecodeCase(KIVI2, TQ4, packed=320),
    DecodeCase(TQ4, KIVI2),
    DecodeCase(TQ4, TQ3),
    DecodeCase(TQ3, TQ3, dtype=torch.float32, head_dim=64),
    DecodeCase(TQ3, TQ3, batch=8, kv_heads=1, gqa=8, packed=1000, dtype=torch.float16),
    DecodeCase(TQ3, TQ3, batch=1, gqa=1, head_dim=256, packed=333),
    DecodeCase(TQ35, TQ35),
    DecodeCase(TQ35, TQ25, dtype=torch.float32),
    DecodeCase(TQ25, TQ25, batch=8, gqa=8, head_dim=64, packed=777, dtype=torch.float16),
    DecodeCase(KIVI2, TQ35, packed=320),
    DecodeCase(TQ35, BONSAI_IMPROVED),
    # keys and values of different head dims (DeepSeek-V3-style 192 / 128; 128 / 64): 192 is padded to 256-wide tiles
    DecodeCase(TQ4, TQ4, head_dim=192, value_dim=128),
    DecodeCase(TQ4, TQ4, head_dim=192, value_dim=128, batch=1, packed=333, dtype=torch.float32),
    DecodeCase(TQ4, TQ4, head_dim=128, value_dim=64, packed=1000, dtype=torch.float16),
    DecodeCase(KIVI2, KIVI2, head_dim=192, value_dim=128, packed=320),
    DecodeCase(KIVI2, KIVI2, head_dim=192, value_dim=128, batch=1, packed=224, dtype=torch.float32),
    DecodeCase(KIVI2, KIVI2, head_dim=128, value_dim=64, packed=992, dtype=torch.float16),
    DecodeCase(BONSAI_G64, BONSAI_G64, head_dim=192, value_dim=128),
    DecodeCase(BONSAI_G64, BONSAI_G64, head_dim=192, value_dim=128, batch=1, packed=333, dtype=torch.float32),
    DecodeCase(BONSAI_IMPROVED, BONSAI_IMPROVED, head_dim=128, value_dim=64, packed=777, dtype=torch.float16),
    DecodeCase(TQ4, BONSAI_G64, head_dim=192, value_dim=128),
    DecodeCase(KIVI2, TQ35, head_dim=192, value_dim=128, batch=1, packed=160, dtype=torch.float32),
    DecodeCase(TQ35, KIVI4, head_dim=128, value_dim=192, packed=333, dtype=torch.float16),
]
INTERPRET_CASES = {c.id for c in DECODE_CASES if c.dtype != torch.bfloat16 and c.batch * c.packed <= 2000}


def make_inputs(shape, outliers: bool, dtype, device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    if outliers:  # Qwen2.5-like: a shared offset and a few huge channels
        x = x + 4 * torch.randn(1, shape[1], 1, shape[3], generator=gen)
        x[..., : max(1, shape[3] // 32)] *= 30
    return x.to(dtype=dtype, device=device)


def left_padding_mask(b, total, device):
    mask = torch.ones(b, total, dtype=torch.bool, device=device)
    for row in range(1, b):
        mask[row, : 37 * row] = False
    return mask


def build(case: DecodeCase, outliers: bool, device, seed: int = 0):
    """(q, keys, values, window_k, window_v) of one decode step of `case`."""
    b, h, d, n, w = case.batch, case.kv_heads, case.head_dim, case.packed, case.window
    k = make_inputs((b, h, n, d), outliers, case.dtype, device, seed)
    v = make_inputs((b, h, n, case.dv), outliers, case.dtype, device, seed + 1)
    keys, values = case.keys.pack(k, True, seed + 10), case.values.pack(v, False, seed + 11)
    wk = make_inputs((b, h, w, d), outliers, case.dtype, device, seed + 2)
    wv = make_inputs((b, h, w, case.dv), outliers, case.dtype, device, seed + 3)
    q = make_inputs((b, h * case.gqa, 1, d), False, case.dtype, device, seed + 4)[:, :, 0]
    return q, keys, values, wk, wv


def sdpa_attention(q, keys, values, wk, wv, mask, scaling):
    """formats' dequantize + the window, torch's SDPA with repeated KV heads, float32."""
    k = torch.cat([keys.dequantize(), wk.float()], 2)
    v = torch.cat([values.dequantize(), wv.float()], 2)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    m = None if mask is None else mask[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q.float().unsqueeze(2), k, v, attn_mask=m,
                                                            scale=scaling).squeeze(2)


def rel_err(got, want) -> float:
    return float((got.float() - want.float()).abs().amax() / want.float().abs().amax().clamp_min(1.0))


# ----------------------------------------------------------------------------------------------------------------------
# CPU: the reference
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [c for c in DECODE_CASES if c.dtype == torch.float32] + [
    DecodeCase(KIVI4, BONSAI_G32, gqa=8, dtype=torch.float32, packed=96)], ids=lambda c: c.id)
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_reference_decode_equals_sdpa(case, padded):
    q, keys, values, wk, wv = build(case, True, "cpu")
    mask = left_padding_mask(case.batch, case.packed + case.window, "cpu") if padded else None
    scaling = case.head_dim**-0.5
    got = reference.decode_attention(q=q, keys=keys, values=values, window_k=wk, window_v=wv, key_mask=mask,
                                     scaling=scaling)
    assert rel_err(got, sdpa_attention(q, keys, values, wk, wv, mask, scaling)) < 1e-5  # float32 summation order


def test_reference_decode_with_lengths_is_the_prefix_call():
    case = DecodeCase(TQ4, KIVI2, dtype=torch.float32)
    q, keys, values, wk, wv = build(case, False, "cpu")
    n, w = 200, 3
    lengths = torch.tensor([n, w, w - 1])
    mask = torch.ones(case.batch, case.packed + 50, dtype=torch.bool)
    args = {"q": q, "window_k": wk, "window_v": wv, "scaling": 0.1}
    got = reference.decode_attention(keys=keys, values=values, key_mask=mask, lengths=lengths, **args)
    want = reference.decode_attention(keys=keys.prefix(n), values=values.prefix(n), key_mask=mask[:, : n + w],
                                      **{**args, "window_k": wk[:, :, :w], "window_v": wv[:, :, :w]})
    assert torch.equal(got, want)


def test_decode_attention_checks_its_arguments():
    q, keys, values, wk, wv = build(DecodeCase(TQ4, TQ4, dtype=torch.float32), False, "cpu")
    args = {"q": q, "keys": keys, "values": values, "window_k": wk, "window_v": wv, "key_mask": None, "scaling": 0.1}
    with pytest.raises(ValueError, match="q must be"):
        kernels.decode_attention(**{**args, "q": q[0]}, impl="reference")
    with pytest.raises(TypeError, match="keys must be"):
        kernels.decode_attention(**{**args, "keys": keys.codes}, impl="reference")
    with pytest.raises(ValueError, match="window_k"):
        kernels.decode_attention(**{**args, "window_k": wk[:, :1]}, impl="reference")
    with pytest.raises(ValueError, match="impl"):
        kernels.decode_attention(**args, impl="cuda-magic")


def test_decode_checks_key_and_value_dims_apart():
    """Keys of Dk = 192 and values of Dv = 128: each window against its side, the query against the keys; the CUDA
    C++ split kernel (one head dim) refuses them by name, the Triton path takes them."""
    case = DecodeCase(TQ4, KIVI2, head_dim=192, value_dim=128, dtype=torch.float32, packed=64)
    q, keys, values, wk, wv = build(case, False, "cpu")
    assert kernels.decode_supported(keys, values, torch.bfloat16) and kernels.decode_supported(keys, values, q.dtype)
    args = {"q": q, "keys": keys, "values": values, "window_k": wk, "window_v": wv, "key_mask": None, "scaling": 0.1}
    assert kernels.decode_attention(**args, impl="reference").shape == (2, 8, 128)
    with pytest.raises(ValueError, match=r"window_v must be \[B, Hkv, W, Dv\] = \[2, 2, W, 128\], "
                                         r"got \(2, 2, 5, 192\)"):
        kernels.decode_attention(**{**args, "window_v": wk}, impl="reference")
    with pytest.raises(ValueError, match=r"window_k must be \[B, Hkv, W, Dk\] = \[2, 2, W, 192\], "
                                         r"got \(2, 2, 5, 128\)"):
        kernels.decode_attention(**{**args, "window_k": wv}, impl="reference")
    with pytest.raises(ValueError, match=r"q \[B, Hq, Dk\] = \(2, 8, 128\) does not fit keys of 2 heads and "
                                         r"head_dim 192"):
        kernels.decode_attention(**{**args, "q": q[..., :128]}, impl="reference")
    with pytest.raises(ValueError, match="window_k and window_v must hold the same W tokens, got 5 and 4"):
        kernels.decode_attention(**{**args, "window_v": wv[:, :, :4]}, impl="reference")
    with pytest.raises(ValueError, match=r"the CUDA split kernel needs keys and values of one head dim, got Dk=192 "
                                         r"and Dv=128; use impl='triton'"):
        kernels.decode_attention(**args, impl="cuda")
    one_head = dataclasses.replace(values, codes=values.codes[:, :1])
    assert not kernels.decode_supported(keys, one_head, q.dtype)
    with pytest.raises(ValueError, match="values have 1 KV heads, keys 2"):
        kernels.decode_attention(**{**args, "values": one_head}, impl="reference")


def test_decode_supported_covers_the_defaults_and_refuses_the_rest():
    q, keys, values, *_ = build(DecodeCase(TQ4, TQ4), False, "cpu")
    assert kernels.decode_supported(keys, values, torch.bfloat16)
    assert not kernels.decode_supported(keys, values, torch.float64)
    three_bit = dataclasses.replace(keys, codes=torch.zeros(2, 2, 4, 48, dtype=torch.uint8), bits=3)
    assert kernels.decode_supported(three_bit, values, torch.bfloat16)  # decoded a coordinate at a time
    strided = dataclasses.replace(keys, codes=torch.zeros(2, 2, 4, 128, dtype=torch.uint8)[..., ::2])
    assert not kernels.decode_supported(strided, values, torch.bfloat16)
    _, split_k, split_v, *_ = build(DecodeCase(TQ35, TQ25), False, "cpu")
    assert kernels.decode_supported(split_k, split_v, torch.bfloat16)
    three_parts = dataclasses.replace(split_v, parts=(*split_v.parts, split_v.parts[1]))
    assert not kernels.decode_supported(split_k, three_parts, torch.bfloat16)  # two parts at most
    _, kk, kv, *_ = build(DecodeCase(KIVI2, KIVI2, packed=64), False, "cpu")
    assert kernels.decode_supported(kk, kv, torch.float16)
    assert not kernels.decode_supported(kv, kk, torch.float16)  # value format as keys and the other way round


def test_compress_supported_names_its_kinds():
    assert kernels.compress_supported("turboquant", head_dim=128, bits=4)
    assert kernels.kivi_compress_supported(128, 2, 32)
    assert not kernels.kivi_compress_supported(96, 2, 32)
    with pytest.raises(ValueError, match="kind"):
        kernels.compress_supported("quanto", head_dim=128)


def test_cpu_import_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, tq_transformers.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------------------------------
# GPU: compress kernels against the encoders
# ----------------------------------------------------------------------------------------------------------------------
COMPRESS_CASES = [TQ4, TQ2, TQ1, TQ4_PLAIN, BONSAI, BONSAI_IMPROVED, BONSAI_G32, KIVI2, KIVI4]


def _near_edge(x, mean, rotation, levels):
    """Rotated unit coordinates within 1e-5 of a TurboQuant bucket edge (codes there depend on summation order)."""
    x = x.float() - (0 if mean is None else mean.float())
    y = (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)) @ rotation.T
    edges = (levels[1:] + levels[:-1]) / 2
    return (y.unsqueeze(-1) - edges).abs().min(-1).values < 1e-5


@needs_kernels
@pytest.mark.parametrize("side", COMPRESS_CASES, ids=lambda s: s.id)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("outliers", [False, True], ids=["randn", "outliers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_compress_kernel_matches_encoder(side, d, outliers, dtype):
    if INTERPRET and (d != 64 or dtype != torch.float32):
        pytest.skip("kept short under the interpreter")
    x = make_inputs((2, 3, 128, d), outliers, dtype, DEVICE, seed=11)
    mean = x.float().mean(2, keepdim=True).to(META) if side.center else None
    if side.kind == "turboquant":
        rot, levels = random_rotation(d, 5, DEVICE), codebook(side.bits, d, DEVICE)
        want = turboquant_encode(x, mean, rot, levels, side.bits)
        got = kernels.turboquant_compress(x, mean, rot, levels, side.bits)
        diff = unpack_bits(got[0], side.bits) != unpack_bits(want[0], side.bits)
        assert not bool((diff & ~_near_edge(x, mean, rot, levels)).any()), f"{int(diff.sum())} codes differ"
    elif side.kind == "bonsai":
        rot = random_rotation(d, 5, DEVICE) if side.rotate else None
        g = min(side.group_size, d)
        want = bonsai_encode(x, mean, rot, g, side.scale_mode)
        got = kernels.bonsai_compress(x, mean, rot, g, side.scale_mode)
        assert torch.equal(got[0], want[0])
    else:
        want = kivi_encode_keys(x, side.bits, side.group_size) + kivi_encode_values(x, side.bits, side.group_size)
        got = (kernels.kivi_compress_keys(x, side.bits, side.group_size)
               + kernels.kivi_compress_values(x, side.bits, side.group_size))
        assert torch.equal(got[0], want[0]) and torch.equal(got[3], want[3])
    for g_, w_ in zip(got, want):
        if g_.dtype != torch.uint8:  # metadata: one fp16 rounding of a float32 sum taken in another order
            assert g_.dtype == w_.dtype == META
            torch.testing.assert_close(g_.float(), w_.float(), rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# GPU: decode attention against the reference
# ----------------------------------------------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("outliers", [False, True], ids=["randn", "outliers"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("impl", ["triton", "triton_only", "cuda"])
def test_decode_matches_reference(case, outliers, padded, impl):
    if INTERPRET and (case.id not in INTERPRET_CASES or outliers or impl != "triton_only"
                      or case.dtype == torch.bfloat16):
        pytest.skip("kept short under the interpreter (whose bfloat16 loads are not faithful)")
    q, keys, values, wk, wv = build(case, outliers, DEVICE)
    assert kernels.decode_supported(keys, values, q.dtype)
    _skip_uncovered(impl, q, keys, values)
    mask = left_padding_mask(case.batch, case.packed + case.window, DEVICE) if padded else None
    args = {"q": q, "keys": keys, "values": values, "window_k": wk, "window_v": wv, "key_mask": mask,
            "scaling": case.head_dim**-0.5}
    want = kernels.decode_attention(**args, impl="reference")
    got = kernels.decode_attention(**args, impl=impl)
    assert got.dtype == q.dtype and got.shape == (*q.shape[:2], case.dv)
    err = rel_err(got, want)
    assert err < (F32_FLOOR if case.dtype == torch.float32 else HALF_FLOOR), f"error {err:.3g}"


def _skip_uncovered(impl, q, keys, values):
    from tq_transformers.kernels import cuda_split

    if impl == "cuda" and not cuda_split.supported(q, keys, values, min_tokens=0):
        pytest.skip("the CUDA split kernel does not cover this pair (cuda_split.supported)")


def _capacity(view, extra: int):
    """`view` copied into a buffer `extra` tokens longer whose tail holds garbage (0xFF codes, NaN metadata)."""
    def grow(t, axis=2):
        pad = list(t.shape)
        pad[axis] = extra
        junk = torch.full(pad, 255 if t.dtype == torch.uint8 else float("nan"), dtype=t.dtype, device=t.device)
        return torch.cat([t, junk], axis)

    if isinstance(view, ChannelAffinePacked):
        ng = extra // view.group_size
        return dataclasses.replace(view, codes=grow(view.codes) if ng == 0 else torch.cat(
            [view.codes, torch.full((*view.codes.shape[:2], ng, *view.codes.shape[3:]), 255, dtype=torch.uint8,
                                    device=view.codes.device)], 2),
            scale=grow(view.scale) if ng == 0 else torch.cat([view.scale, view.scale[:, :, :ng] * float("nan")], 2),
            zero=torch.cat([view.zero, view.zero[:, :, :ng] * float("nan")], 2))
    out = dataclasses.replace(view, codes=grow(view.codes), scale=grow(view.scale))
    return dataclasses.replace(out, zero=grow(view.zero)) if isinstance(view, TokenAffinePacked) else out


@needs_kernels
@pytest.mark.parametrize("case", [DecodeCase(TQ4, TQ4, dtype=torch.float16), DecodeCase(KIVI2, KIVI2, packed=320),
                                  DecodeCase(BONSAI_IMPROVED, BONSAI_IMPROVED, dtype=torch.float32),
                                  DecodeCase(TQ4, KIVI2, head_dim=192, value_dim=128, batch=1, dtype=torch.float32),
                                  DecodeCase(KIVI2, BONSAI_G64, head_dim=192, value_dim=128, packed=320)],
                         ids=lambda c: c.id)
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("impl", ["triton", "triton_only", "cuda"])
def test_decode_with_device_lengths(case, padded, impl):
    """CUDA-graph steps: counts read on the device, views and windows sized by a larger capacity whose unused tails
    hold garbage; the exact call's output within the floor (another split of the packed tokens)."""
    if INTERPRET and (impl != "triton_only" or case.dtype == torch.bfloat16):
        pytest.skip("kept short under the interpreter (whose bfloat16 loads are not faithful)")
    q, keys, values, wk, wv = build(case, False, DEVICE)
    _skip_uncovered(impl, q, keys, values)
    n, w = case.packed, case.window
    mask = left_padding_mask(case.batch, n + w, DEVICE) if padded else None
    base = {"q": q, "scaling": case.head_dim**-0.5}
    want = kernels.decode_attention(keys=keys, values=values, window_k=wk, window_v=wv, key_mask=mask, **base,
                                    impl="reference")
    extra = 256
    big_k, big_v = _capacity(keys, extra), _capacity(values, extra)
    nan_k, nan_v = (torch.full((case.batch, case.kv_heads, 7, d), float("nan"), dtype=q.dtype, device=DEVICE)
                    for d in (case.head_dim, case.dv))
    wk_buf, wv_buf = torch.cat([wk, nan_k], 2), torch.cat([wv, nan_v], 2)
    key_mask = torch.zeros(case.batch, n + extra + 300, dtype=torch.bool, device=DEVICE)
    key_mask[:, : n + w] = True if mask is None else mask
    lengths = torch.tensor([n, w, w], device=DEVICE)
    got = kernels.decode_attention(keys=big_k, values=big_v, window_k=wk_buf, window_v=wv_buf,
                                   key_mask=key_mask if padded else None, lengths=lengths, **base, impl=impl)
    err = rel_err(got, want)
    assert err < (F32_FLOOR if case.dtype == torch.float32 else HALF_FLOOR), f"error {err:.3g}"


# The CUDA split kernel's plan variants (CUDA_PLAN; the sweeps of scripts/tune_decode_kernels.py): the accumulators
# rescaled only when a max moved, one mma chain, 8 warps a block, a register cap, two tiles loaded ahead (with 8
# warps and a cap: the Bonsai-1 candidate), the cp.async staging ring (codebook pairs; 16 warps a block; with 8 and
# the lazy rescale); the shared table (TurboQuant-4 pairs; alone, with the shipped codebook plan, with 16 warps and a
# 2-stage ring).
CUDA_PLANS = [{"lazy_rescale": True}, {"two_chains": False}, {"warps": 8}, {"min_blocks": 4, "waves": 2}, {"depth": 2},
              {"depth": 2, "warps": 8, "min_blocks": 2}, {"ring": 3}, {"ring": 3, "warps": 16},
              {"ring": 4, "warps": 8, "lazy_rescale": True}, {"shared_table": 1},
              {"shared_table": 1, "warps": 8, "lazy_rescale": True, "ring": 3},
              {"shared_table": 1, "warps": 16, "ring": 2}]


@needs_kernels
@pytest.mark.parametrize("plan", CUDA_PLANS, ids=lambda p: "-".join(f"{k}{int(v)}" for k, v in p.items()))
@pytest.mark.parametrize("case", [DecodeCase(TQ4, TQ4, packed=1000), DecodeCase(KIVI2, KIVI2, packed=992),
                                  DecodeCase(BONSAI, BONSAI, head_dim=64, packed=1000, dtype=torch.float16),
                                  DecodeCase(TQ4, BONSAI_G64, gqa=8, packed=1000)], ids=lambda c: c.id)
def test_cuda_plan_variants_match_reference(case, plan, monkeypatch):
    """Every plan variant of the CUDA split kernel (many tiles a split), with a left-padding mask that is a strided
    view starting off a word boundary, within the floor of the reference."""
    from tq_transformers.kernels import cuda_split

    if INTERPRET:
        pytest.skip("CUDA C++ kernel")
    monkeypatch.setattr(cuda_split, "PLAN_OVERRIDES", {})  # each variant as given, whatever the format's overrides
    for key, value in plan.items():
        monkeypatch.setitem(cuda_split.CUDA_PLAN, key, value)
    q, keys, values, wk, wv = build(case, True, DEVICE)
    _skip_uncovered("cuda", q, keys, values)
    if plan.get("shared_table"):  # on for the one pair whose tables are equal, off for the others
        assert cuda_split.plan_for(keys, values)["shared_table"] == int(case.keys == case.values == TQ4)
    total = case.packed + case.window
    mask = torch.ones(case.batch, total + 1, dtype=torch.bool, device=DEVICE)[:, 1:]
    mask[:] = left_padding_mask(case.batch, total, DEVICE)
    assert mask.data_ptr() % 4
    args = {"q": q, "keys": keys, "values": values, "window_k": wk, "window_v": wv, "key_mask": mask,
            "scaling": case.head_dim**-0.5}
    err = rel_err(kernels.decode_attention(**args, impl="cuda"), kernels.decode_attention(**args, impl="reference"))
    assert err < HALF_FLOOR, f"error {err:.3g}"


def test_cuda_build_cache_keys_are_the_compiled_plan_keys(monkeypatch):
    """Model-free: every CUDA_PLAN key the source is built from is in the build cache's key, and no other (a sweep of
    the launch-only keys must not recompile). Needs Triton installed, not a GPU."""
    pytest.importorskip("triton")
    from tq_transformers.kernels import cuda_split

    args = (128, 4, 4, True, None)
    base = cuda_split._source(*args)[0]
    for key, value in dict(cuda_split.CUDA_PLAN).items():
        changed = int(value) + 1 if not isinstance(value, bool) else not value
        monkeypatch.setitem(cuda_split.CUDA_PLAN, key, changed)
        assert (cuda_split._source(*args)[0] != base) == (key in cuda_split.COMPILED_PLAN_KEYS), key
        monkeypatch.setitem(cuda_split.CUDA_PLAN, key, value)


def test_cuda_plan_overrides_reach_the_source():
    """Model-free: the measured per-format overrides (``cuda_split.PLAN_OVERRIDES``) are what ``plan_for`` gives
    each key format, and they are compiled into its source; formats without one get CUDA_PLAN. Needs Triton
    installed (the launcher module imports it), not a GPU."""
    pytest.importorskip("triton")
    from tq_transformers.kernels import cuda_split

    def view(cls, bits):
        return dataclasses.replace(_FORMAT_STUBS[cls], bits=bits)

    for (cls, bits), override in cuda_split.PLAN_OVERRIDES.items():
        cfg = cuda_split.plan_for(view(cls, bits))
        assert cfg == {**cuda_split.CUDA_PLAN, **override}
        src = cuda_split._source(128, bits, bits, True, None, cfg)[0]
        assert f"#define NWARPS {cfg['warps']}\n" in src and f"#define LAZY_RESCALE {int(cfg['lazy_rescale'])} " in src
    assert cuda_split.plan_for(view(ChannelAffinePacked, 2)) == cuda_split.CUDA_PLAN


def test_cuda_staging_ring_only_where_tiles_are_chunk_aligned():
    """Model-free: the shipped staging ring (PLAN_OVERRIDES) stays on for codebook pairs whose tiles start on 16 bytes
    in every batch-head, goes off for misaligned scales and for affine keys, and the block's shared memory counts the
    rings. Needs Triton installed (the launcher module imports it), not a GPU."""
    pytest.importorskip("triton")
    from tq_transformers.kernels import cuda_split

    def pair(tokens):
        codes = torch.zeros(2, 4, tokens, 64, dtype=torch.uint8)
        keys = CodebookPacked(codes=codes, scale=torch.zeros(2, 4, tokens, dtype=META), levels=torch.zeros(16), bits=4)
        return keys, dataclasses.replace(keys, codes=codes.clone(), scale=keys.scale.clone())

    ring = cuda_split.PLAN_OVERRIDES[(CodebookPacked, 4)]["ring"]
    assert ring > 0
    cfg = cuda_split.plan_for(*pair(1024))
    assert cfg["ring"] == ring
    assert cuda_split.shared_bytes(128, 4, 4, None, cfg) == (cuda_split.TABLE_BYTES
                                                             + cfg["warps"] * ring * (16 * (64 + 64) + 4 * 16))
    assert cuda_split.plan_for(*pair(1001))["ring"] == 0  # a head's scales start 2002 bytes after the previous one
    assert cuda_split.shared_bytes(128, 2, 2, (32, 32), cfg) == cuda_split.TABLE_BYTES  # the affine kernel: no ring
    assert cuda_split.plan_for(dataclasses.replace(_FORMAT_STUBS[ChannelAffinePacked]))["ring"] == 0


def _cache_pair(cache, head_dim: int = 128):
    """(keys, values): the packed views of a small cache's first layer, filled on the CPU."""
    x = torch.randn(1, 2, 320, head_dim, generator=torch.Generator().manual_seed(5))
    cache.update(x, 0.5 * x, 0)
    keys, values = cache.layers[0].packed()
    assert keys.num_tokens > 0
    return keys, values


# An H200 SM (sm_90): 228 KiB of shared memory, of which each resident block takes its dynamic shared memory and 1 KiB
# the system reserves (cudaDevAttrReservedSharedMemoryPerBlock); 64 K registers.
SM_SHARED, BLOCK_RESERVED, SM_REGISTERS = 228 * 1024, 1024, 65536


def test_cuda_shared_table_reaches_the_source_and_halves_the_table():
    """Model-free: CUDA_PLAN's shared_table is compiled into the codebook kernel's source where one table can serve
    both decoders (one width, the code slots in one order: 4 bits), and the block's shared memory (where the staging
    rings start, and what the launch asks for) counts the 32 KiB table; the affine kernel, other widths and mixed
    widths keep the two-sided table whatever the plan says. At D = 128 with the shipped codebook plan (8 warps, a
    3-stage ring) the shared table lets two blocks share an SM instead of one (registers allowing: at most 128 a
    thread, which the offline SASS shows). Needs Triton installed (the launcher module imports it), not a GPU."""
    pytest.importorskip("triton")
    from tq_transformers.kernels import cuda_split

    plan = {**cuda_split.CUDA_PLAN, **cuda_split.PLAN_OVERRIDES[(CodebookPacked, 4)]}
    on, off = {**plan, "shared_table": 1}, {**plan, "shared_table": 0}
    assert "#define SHARED_TABLE 1 " in cuda_split._source(128, 4, 4, True, None, on)[0]
    assert "#define SHARED_TABLE 0 " in cuda_split._source(128, 4, 4, True, None, off)[0]
    assert "#define SHARED_TABLE 0 " in cuda_split._source(128, 4, 4, True, None)[0]  # CUDA_PLAN: off
    for args in [(128, 2, 2, True, None), (64, 1, 1, False, None), (128, 4, 2, True, None), (128, 4, 4, True, (32, 32)),
                 (128, 2, 2, False, (32, 32))]:
        assert "#define SHARED_TABLE 0 " in cuda_split._source(*args, on)[0], args
        assert cuda_split.shared_bytes(*args[:3], args[4], on) == cuda_split.shared_bytes(*args[:3], args[4], off)
    assert cuda_split.SHARED_TABLE_BYTES == cuda_split.TABLE_BYTES // 2 == 32 * 1024
    stage = 16 * (64 + 64) + 4 * 16  # a 4-bit tile's key and value rows at D = 128 and its 32 fp16 scales
    rings = plan["warps"] * plan["ring"] * stage
    assert cuda_split.shared_bytes(128, 4, 4, None, on) == cuda_split.SHARED_TABLE_BYTES + rings
    assert cuda_split.shared_bytes(128, 4, 4, None, off) == cuda_split.TABLE_BYTES + rings
    assert cuda_split.shared_bytes(128, 4, 4, None, {**on, "ring": 0}) == cuda_split.SHARED_TABLE_BYTES

    def blocks(cfg):
        return SM_SHARED // (cuda_split.shared_bytes(128, 4, 4, None, cfg) + BLOCK_RESERVED)

    assert (blocks(off), blocks(on)) == (1, 2)
    assert 2 * plan["warps"] * 32 * 128 <= SM_REGISTERS


def test_cuda_shared_table_only_for_pairs_of_one_table(monkeypatch):
    """Model-free: with CUDA_PLAN's shared_table on, ``plan_for`` keeps it for a TurboQuant-4 cache's pair (one
    codebook tensor for both sides) and switches it off for pairs whose word tables differ: KIVI (affine), Bonsai-1
    (the value side's slots reordered), key and value widths or grids that differ, TurboQuant keys with Bonsai
    values, and plan_for without the values. Levels that are equal but not one tensor are compared once (on both
    tensors' cache; ``keep_constants`` does it outside any graph), never again at a decode call. Needs Triton
    installed (the launcher module imports it), not a GPU."""
    pytest.importorskip("triton")
    from tq_transformers.kernels import cuda_split

    monkeypatch.setitem(cuda_split.CUDA_PLAN, "shared_table", 1)
    keys, values = _cache_pair(TurboQuantCache(bits=4, flush_size=64))
    assert keys.levels is values.levels
    cfg = cuda_split.plan_for(keys, values)
    assert cfg["shared_table"] == 1 and cfg["ring"] == cuda_split.PLAN_OVERRIDES[(CodebookPacked, 4)]["ring"]
    assert cuda_split.shared_bytes(128, 4, 4, None, cfg) == cuda_split.shared_bytes(128, 4, 4, None, {
        **cfg, "shared_table": 0}) - cuda_split.SHARED_TABLE_BYTES
    assert cuda_split.plan_for(keys)["shared_table"] == 0  # the values unknown
    others = {
        "kivi2": KIVICache(bits=2, group_size=32, residual_length=32),
        "kivi4": KIVICache(bits=4, group_size=32, residual_length=32),
        "bonsai1": BonsaiCache(group_size=64),
        "tq4-tq2": TurboQuantCache(key_bits=4, value_bits=2, flush_size=64),
        "tq4-uniform": TurboQuantCache(bits=4, value_grid="uniform", flush_size=64),
        "tq4-bonsai": MixedCache(key={"method": "turboquant", "bits": 4}, value={"method": "bonsai"}),
    }
    for name, cache in others.items():
        pair = _cache_pair(cache)
        assert cuda_split.plan_for(*pair)["shared_table"] == 0, name
    calls = []
    equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: calls.append(1) or equal(a, b))
    same = dataclasses.replace(values, levels=values.levels.clone())
    assert cuda_split.plan_for(keys, same)["shared_table"] == 1 and len(calls) == 2
    assert cuda_split.plan_for(keys, same)["shared_table"] == 1 and len(calls) == 2  # cached
    moved = dataclasses.replace(values, levels=values.levels + 1e-3)
    assert cuda_split.plan_for(keys, moved)["shared_table"] == 0
    calls.clear()
    kept = dataclasses.replace(values, levels=values.levels.clone())
    cuda_split.keep_constants(keys, kept, torch.bfloat16)
    assert calls
    calls.clear()
    assert cuda_split.plan_for(keys, kept)["shared_table"] == 1 and not calls


_FORMAT_STUBS = {
    CodebookPacked: CodebookPacked(codes=torch.zeros(1, 1, 1, 64, dtype=torch.uint8), scale=torch.zeros(1, 1, 1),
                                   levels=torch.zeros(16), bits=4),
    ChannelAffinePacked: ChannelAffinePacked(codes=torch.zeros(1, 1, 1, 32, 32, dtype=torch.uint8),
                                             scale=torch.zeros(1, 1, 1, 128), zero=torch.zeros(1, 1, 1, 128), bits=2,
                                             group_size=32),
}


def test_cuda_sources_fill_every_placeholder():
    """Model-free: the CUDA sources built for each kernel kind leave no placeholder unfilled (a CPU install never
    compiles them, but a typo here would only show on a GPU). Needs Triton installed (the launcher module imports
    it), not a GPU."""
    import re

    pytest.importorskip("triton")
    from tq_transformers.kernels import cuda_split

    for args in [(128, 4, 4, True, None), (64, 1, 2, False, None), (128, 2, 2, True, (32, 32))]:
        src, name = cuda_split._source(*args)
        assert name in src
        assert not re.findall(r"__[A-Z_]+__", src.replace("__global__", "").replace("__device__", "")
                              .replace("__forceinline__", "").replace("__shared__", "")
                              .replace("__launch_bounds__", "")), args
        assert f"#define D {args[0]}\n" in src and f"#define KB {args[1]}\n" in src


def _emulate_load_tables(tk: torch.Tensor, tv: torch.Tensor, shared: bool) -> list[int]:
    """``load_tables`` of cuda_prelude: the table's shared-memory words, one 16-byte store (``entry_quad``: the
    side's entry, 4 / WORDS times) after the other; entry byte = [key copies][value copies], or with the shared table
    the key side's copies alone (cuda_split's docstring)."""
    entry = 128 if shared else 256
    rows = (tk.tolist(), tv.tolist())
    image = []
    for i in range(256 * entry // 16):
        byte, side = i // (entry // 16), 0 if shared else (i // 8) & 1
        row = rows[side][byte]
        image += [row[k % len(row)] & 0xFFFFFFFF for k in range(4)]
    return image


def _emulate_base(side: str, lane: int, words: int, shared: bool) -> int:
    """``key_base`` / ``value_base`` of cuda_prelude: the lane's copy on its side."""
    return (128 if side == "v" and not shared else 0) + (lane % (32 // words)) * words * 4


def _emulate_lookup(image: list[int], idx: int, j: int, base: int, words: int, shared: bool) -> list[int]:
    """``lookup`` of cuda_prelude: the `words` words of shared memory at the offset the kernel computes for byte j of
    the 32-bit index word `idx` (a byte-permute: byte << 8 | base; the shared table: byte << 7 | base)."""
    byte = (idx >> (8 * j)) & 0xFF
    off = (byte << 7 | base) if shared else (byte << 8 | base)
    assert off % (4 * words) == 0 and off + 4 * words <= 4 * len(image)  # the LDS's alignment, inside the table
    return image[off // 4:off // 4 + words]


@pytest.mark.parametrize("shared", [False, True], ids=["sides", "shared"])
@pytest.mark.parametrize("bits", [4, 2, 1], ids=lambda b: f"{b}bit")
def test_cuda_table_layouts_put_each_entry_where_the_lookup_reads_it(bits, shared):
    """Model-free: the byte table as ``load_tables`` lays it out in shared memory (two sides a byte value, or with
    CUDA_PLAN's shared_table one side for both) and ``lookup``'s offsets from ``key_base`` / ``value_base``: every
    lane reads every byte value's entry of its side, the lanes of one LDS phase (32 / WORDS of them) read distinct
    banks, and the table is as large as ``cuda_split`` counts it (its ring starts right after). The emulated offsets
    are the source's (checked against its text). Needs Triton installed (the launcher module imports it), not a GPU."""
    pytest.importorskip("triton")
    from tq_transformers.kernels import cuda_prelude, cuda_split

    for line in ("const u32 off = (prmt(idx, 0, 0x4440 + j) << 7) | base;",
                 "const u32 off = prmt(base, idx, 0x3240 + 0x10 * j);  /* base.b0, idx.byte(j), 0, 0 */",
                 "return (lane % KREPL) * KWORDS * 4;",
                 "return (SHARED_TABLE ? 0 : SIDE_BYTES) + (lane % VREPL) * VWORDS * 4;",
                 "#define SIDE_BYTES 128 ", "#define ENTRY_BYTES 256 ", "#define ENTRY_BYTES SIDE_BYTES "):
        assert line in cuda_prelude.PRELUDE, line
    words = 4 // bits
    gen = torch.Generator().manual_seed(bits)
    tk = torch.randint(-2**31, 2**31, (256, words), generator=gen, dtype=torch.int64).to(torch.int32)
    tv = tk if shared else torch.randint(-2**31, 2**31, (256, words), generator=gen, dtype=torch.int64).to(torch.int32)
    image = _emulate_load_tables(tk, tv, shared)
    assert 4 * len(image) == (cuda_split.SHARED_TABLE_BYTES if shared else cuda_split.TABLE_BYTES)
    if bits == 4:  # where the launcher compiles the shared table
        cfg = {**cuda_split.CUDA_PLAN, "shared_table": int(shared), "ring": 0}
        assert cuda_split.shared_bytes(128, bits, bits, None, cfg) == 4 * len(image)
    for side, table in (("k", tk), ("v", tv)):
        rows = [[w & 0xFFFFFFFF for w in row] for row in table.tolist()]
        for byte in range(256):
            idx = byte << 16 | 0xA5  # byte 2 of the index word; the other bytes must not leak in
            banks = []
            for lane in range(32):
                base = _emulate_base(side, lane, words, shared)
                assert _emulate_lookup(image, idx, 2, base, words, shared) == rows[byte], (side, byte, lane)
                off = (byte << 7 | base) if shared else (byte << 8 | base)
                banks.append([(off // 4 + w) % 32 for w in range(words)])
            phase = 32 // words
            for p in range(0, 32, phase):
                hit = [b for lane_banks in banks[p:p + phase] for b in lane_banks]
                assert len(set(hit)) == len(hit), (side, byte, p)


def _emulate_interleave(a: int, b: int, f: int) -> tuple[int, int]:
    even = 0x0F0F0F0F if f == 4 else 0x33333333
    return (a & even) | ((b << f) & ~even & 0xFFFFFFFF), ((a >> f) & even) | (b & ~even & 0xFFFFFFFF)


@pytest.mark.parametrize("bits,shared", [(4, False), (2, False), (1, False), (4, True)],
                         ids=["4bit", "2bit", "1bit", "4bit-shared"])
def test_cuda_decode_layout_puts_each_level_where_the_mma_reads_it(bits, shared):
    """Model-free: the CUDA kernels' decoders (``cuda_prelude.decode_keys`` / ``decode_values``) emulated on the host
    with the tables the launcher builds (``cuda_split._word_table``, VALUE_SLOTS), laid out in shared memory as
    ``load_tables`` does and read at the offsets ``lookup`` computes for one lane of each side (two sides a byte
    value, or the shared table of a TurboQuant-4-like pair, filled from the key side's table alone): every 16-bit
    half of every A fragment word holds the level of the token and coordinate the m16n8k16 fragment layout assigns
    it (keys: rows gid / gid+8 = tokens w0 / w1, columns = key_coord; values: rows = coordinates 2mt / 2mt+1,
    columns = tokens). Needs Triton installed (the launcher module imports it), not a GPU."""
    pytest.importorskip("triton")
    from tq_transformers.kernels import cuda_split

    d = 128
    gen = torch.Generator().manual_seed(bits)
    levels = torch.randn(1 << bits, generator=gen).to(torch.float16)
    view = CodebookPacked(codes=torch.zeros(1, 1, 1, d * bits // 8, dtype=torch.uint8), scale=torch.zeros(1, 1, 1),
                          levels=levels, bits=bits)
    half = [int(x) for x in levels.view(torch.int16)]
    level = {c: half[c] & 0xFFFF for c in range(1 << bits)}
    words = 4 // bits

    def token(nbytes):  # random codes of one token's lane bytes, as 32-bit words and as codes
        codes = torch.randint(0, 1 << bits, (nbytes * 8 // bits,), generator=gen).tolist()
        packed = [sum(codes[(8 // bits) * j + k] << (bits * k) for k in range(8 // bits)) for j in range(nbytes)]
        raw = [sum(packed[4 * i + m] << (8 * m) for m in range(4) if 4 * i + m < nbytes)
               for i in range((nbytes + 3) // 4)]
        return codes, raw

    tk, tv = cuda_split._word_table(view, torch.float16, "k"), cuda_split._word_table(view, torch.float16, "v")
    assert cuda_split._tables_equal(view, view) == (bits == 4) == torch.equal(tk, tv)  # one codebook: 4 bits only
    image = _emulate_load_tables(tk, tk if shared else tv, shared)  # the shared table: the key side's only
    kbase, vbase = _emulate_base("k", 13, words, shared), _emulate_base("v", 22, words, shared)

    def klook(idx, j, n):
        return _emulate_lookup(image, idx, j, kbase, n, shared)

    def vlook(idx, j, n):
        return _emulate_lookup(image, idx, j, vbase, n, shared)

    # keys: two tokens, the lane's D/4 coordinates
    kbytes = d * bits // 32
    (c0, w0), (c1, w1) = token(kbytes), token(kbytes)
    ka = [[0] * 4 for _ in range(d // 16)]
    for j in range(kbytes):
        i, jj = j >> 2, j & 3
        if bits == 4:
            ka[j >> 1][2 * (j & 1)] = klook(w0[i], jj, 1)[0]
            ka[j >> 1][2 * (j & 1) + 1] = klook(w1[i], jj, 1)[0]
        else:
            x, y = _emulate_interleave(w0[i], w1[i], 4 if bits == 2 else 2)
            if bits == 2:
                ka[j][0:2], ka[j][2:4] = klook(x, jj, 2), klook(y, jj, 2)
            else:
                ka[2 * j], ka[2 * j + 1] = klook(x, jj, 4), klook(y, jj, 4)

    def key_coord(kk, h):
        return 8 * (kk >> 1) + 2 * (kk & 1) + 4 * h if bits == 1 else 4 * kk + 2 * h

    for kk in range(d // 16):
        for reg, (codes, h) in enumerate([(c0, 0), (c1, 0), (c0, 1), (c1, 1)]):  # a0..a3: row gid / gid+8, half
            c = key_coord(kk, h)
            assert ka[kk][reg] == level[codes[c]] | level[codes[c + 1]] << 16, (kk, reg)
    # values: four tokens (2tid, 2tid+1, 2tid+8, 2tid+9), the lane's D/8 coordinates
    vbytes = d * bits // 64
    toks = [token(vbytes) for _ in range(4)]
    va = [[0] * 4 for _ in range(d // 16)]
    for j in range(vbytes):
        i, jj = j >> 2, j & 3
        if bits in (4, 2):
            for pr in range(2):
                x, y = _emulate_interleave(toks[2 * pr][1][i], toks[2 * pr + 1][1][i], 4)
                if bits == 4:
                    va[j][2 * pr] = vlook(x, jj, 1)[0]
                    va[j][2 * pr + 1] = vlook(y, jj, 1)[0]
                else:
                    va[2 * j][2 * pr:2 * pr + 2] = vlook(x, jj, 2)
                    va[2 * j + 1][2 * pr:2 * pr + 2] = vlook(y, jj, 2)
        else:
            ab = _emulate_interleave(toks[0][1][i], toks[1][1][i], 2)
            cd = _emulate_interleave(toks[2][1][i], toks[3][1][i], 2)
            p0, p2 = _emulate_interleave(ab[0], cd[0], 4)
            p1, p3 = _emulate_interleave(ab[1], cd[1], 4)
            for k, p in enumerate((p0, p1, p2, p3)):
                va[4 * j + k] = vlook(p, jj, 4)
    for mt in range(d // 16):
        for reg, (coord, pair) in enumerate([(2 * mt, 0), (2 * mt + 1, 0), (2 * mt, 1), (2 * mt + 1, 1)]):
            lo, hi = toks[2 * pair][0][coord], toks[2 * pair + 1][0][coord]  # columns: tokens 2tid(+8), 2tid+1(+9)
            assert va[mt][reg] == level[lo] | level[hi] << 16, (mt, reg)
    assert words == tk.shape[1] == tv.shape[1]


@needs_kernels
def test_decode_takes_strided_windows():
    """Llama hands the cache [B, H, T, D] views of [B, T, H, D] tensors: the same output as contiguous copies."""
    case = DecodeCase(TQ4, TQ4, dtype=torch.float32)
    q, keys, values, _, _ = build(case, False, DEVICE)
    wk = make_inputs((2, 5, 2, 128), False, torch.float32, DEVICE, 13).transpose(1, 2)
    wv = make_inputs((2, 5, 2, 128), False, torch.float32, DEVICE, 14).transpose(1, 2)
    args = {"q": q, "keys": keys, "values": values, "key_mask": None, "scaling": 0.1}
    got = kernels.decode_attention(window_k=wk, window_v=wv, **args)
    assert torch.equal(got, kernels.decode_attention(window_k=wk.contiguous(), window_v=wv.contiguous(), **args))
