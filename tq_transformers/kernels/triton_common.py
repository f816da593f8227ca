"""Shared Triton building blocks: tile decoding, the online-softmax step, the split plan and the partial buffers.

Imported only through ``tq_transformers.kernels`` (lazily): a CPU install never imports Triton.

Decoding packed codes. ``packing`` stores 8 codes of b bits as one little-endian word of b bytes; for b in
{1, 2, 4, 8} byte ``j`` of a row holds codes ``j*PER .. j*PER + PER - 1`` (PER = 8 / b), lowest bits first.

- 16-bit models: one gather per packed byte from a 256-row table of the PER values it decodes to, already in the
  model dtype (``packing.byte_table``, `decode_bytes`)::

      bytes [N, J] --TABLE[byte]--> PER tensors [N, J] --join--> [N, J, PER] --reshape--> [N, D]  column = j*PER + i

- float32 models: a broadcast shift in registers (`unpack_tile`), then the float32 levels.

Split-K ("flash-decoding") partials: per (KV head of a batch row, split) the running max ``m`` and sum ``l`` of the G
query rows (base-2 scores) and the unnormalized accumulator ``acc`` (``[rows, G]`` and ``[rows, G, BD]``, float32);
the reduce kernel (``triton_reduce``) merges them with the window.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import triton
import triton.language as tl

from .constants import KIVI_SCALE_EPS, LOG2E, NORM_EPS, SM_COUNT_INTERPRETER

EPS = tl.constexpr(NORM_EPS)
SCALE_EPS = tl.constexpr(KIVI_SCALE_EPS)

__all__ = ["LOG2E", "cdiv", "derived", "fresh_derived", "num_splits", "partials", "pow2", "sm_count"]


# Host-side integer helpers in plain Python: `triton.cdiv` / `triton.next_power_of_2` cost microseconds a call on the
# host, and the decode path runs for every layer of every step.
def pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------------------------------
# Split plan and partial buffers
# ----------------------------------------------------------------------------------------------------------------------
# Programs per SM the split heuristic aims for, and the most splits of one KV head. Measured on an H200 with
# scripts/tune_decode_kernels.py (docs/RESULTS.md, "Speed (GPU), second pass"; swept 8, 16, 32): 8 best at 8 x 32K,
# within 5% of the best at 1 x 32K.
SPLIT_PLAN = {"waves": 8, "max_splits": 128}


def num_splits(bh: int, n_tokens: int, block_n: int, sms: int, waves: int | None = None,
               max_splits: int | None = None) -> tuple[int, int]:
    """(splits, tokens per split, a multiple of block_n) so that about `waves` programs per SM fill the GPU."""
    waves = SPLIT_PLAN["waves"] if waves is None else waves
    max_splits = SPLIT_PLAN["max_splits"] if max_splits is None else max_splits
    blocks = cdiv(max(n_tokens, 1), block_n)
    splits = max(1, min(blocks, cdiv(waves * sms, bh), max_splits))
    per = cdiv(blocks, splits) * block_n
    return cdiv(max(n_tokens, 1), per), per


_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of `device` (a fixed count for Triton's CPU interpreter)."""
    if device.type != "cuda":
        return SM_COUNT_INTERPRETER
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def partials(bh: int, splits: int, g: int, bd: int, device):
    """Per-split softmax state of the G query rows of each KV head: m, l ``[BH, S, G]`` and acc ``[BH, S, G, BD]``,
    views of one float32 allocation (16-byte aligned views)."""
    n = bh * splits * g
    a = cdiv(n, 4) * 4
    buf = torch.empty(2 * a + n * bd, dtype=torch.float32, device=device)
    return buf[:n].view(bh, splits, g), buf[a:a + n].view(bh, splits, g), buf[2 * a:].view(bh, splits, g, bd)


_DERIVED: dict = {}  # id(source) -> (weak reference to source, {tag: tensor})
_FRESH = [0]  # depth of fresh_derived() contexts


@contextlib.contextmanager
def fresh_derived():
    """Inside: :func:`derived` keeps nothing new (values already kept are still read), and values of mutable
    sources are computed afresh. The custom operators (``kernels.ops``) run inside it: under ``torch.compile`` they
    run in CUDA-graph warm-up and capture, where a kept tensor would live in the graph's private memory pool
    (inductor refuses the step: "tensors in the cudagraph pool not tracked as outputs", seen on the H200), and a
    fixed-capacity cache writes its means in place at its first flush. What the decode needs of constant sources is
    kept beforehand, outside any graph (``kernels.keep_decode_constants``)."""
    _FRESH[0] += 1
    try:
        yield
    finally:
        _FRESH[0] -= 1


def derived(source: torch.Tensor, tag, make, mutable: bool = False):
    """``make()``, a value derived from `source` only (a decode table, a rotated mean, the query rotation), computed
    once and kept while `source` lives. The dynamic caches replace their tensors rather than write into them, so a
    live source never changes value; `mutable` marks a source that a fixed-capacity cache writes in place (its
    means), computed afresh inside :func:`fresh_derived`."""
    fresh = _FRESH[0] > 0
    if fresh and mutable:
        return make()
    key = id(source)
    entry = _DERIVED.get(key)
    if entry is not None and entry[0]() is source and tag in entry[1]:
        return entry[1][tag]
    value = make()
    if fresh:
        return value
    if entry is None or entry[0]() is not source:
        entry = (weakref.ref(source, lambda _, key=key, table=_DERIVED: table.pop(key, None)), {})
        _DERIVED[key] = entry
    entry[1][tag] = value
    return value


# ----------------------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def round_half_even(x):
    """torch.round (ties to even) for x >= -0.5, exact in float32."""
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def div_scalar(x, c: tl.constexpr, RECIP: tl.constexpr):
    """x / c for a Python-number c, rounded as PyTorch does it: on CUDA `tensor / scalar` is `tensor * (1 / scalar)`
    (float32 reciprocal); on the CPU a true division."""
    if RECIP:
        return x * (1.0 / c)
    return tl.div_rn(x, c * 1.0)


@triton.jit
def lut(ptrs, ASM: tl.constexpr):
    """Codebook lookup ``LUT[code]``, one cached load per element. On the GPU it is inline PTX: given a plain
    ``tl.load``, Triton's pipeliner copies whole dequantized tiles through shared memory (2.6x slower, H200, 8 x 32K,
    docs/RESULTS.md second pass). ``ASM=False`` (the CPU interpreter) uses ``tl.load``."""
    if ASM:
        return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=f,l", [ptrs], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return tl.load(ptrs)


@triton.jit
def join_natural(o0, o1, o2, o3, o4, o5, o6, o7, PER: tl.constexpr):
    """Interleave PER same-shape tensors [R, J] into [R, J, PER] with element i of the last axis = o_i (joins keep
    both elements in the thread that loaded them)."""
    if PER == 1:
        return o0[:, :, None]
    elif PER == 2:
        return tl.join(o0, o1)
    elif PER == 4:
        return tl.reshape(tl.join(tl.join(o0, o2), tl.join(o1, o3)), (o0.shape[0], o0.shape[1], 4))
    else:
        ev = tl.reshape(tl.join(tl.join(o0, o4), tl.join(o2, o6)), (o0.shape[0], o0.shape[1], 4))
        od = tl.reshape(tl.join(tl.join(o1, o5), tl.join(o3, o7)), (o0.shape[0], o0.shape[1], 4))
        return tl.reshape(tl.join(ev, od), (o0.shape[0], o0.shape[1], 8))


@triton.jit
def decode_bytes(TABLE, bytes_i32, PER: tl.constexpr, R: tl.constexpr, J: tl.constexpr, ASM: tl.constexpr):
    """[R, J] packed bytes -> [R, J * PER] values ``TABLE[byte, i]`` (column j*PER + i), in TABLE's 16-bit dtype.

    One gather of 2*PER bytes per packed byte (inline PTX on the GPU, see `lut`)::

        byte 0b1011_0010 (4-bit codes 2, 11) --TABLE--> [level[2], level[11]]  -> columns 2j, 2j+1
    """
    ptrs = TABLE + bytes_i32 * PER
    if ASM:
        dt = TABLE.dtype.element_ty
        if PER == 1:
            v = tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [ptrs], dtype=dt, is_pure=True,
                                          pack=1)
            vals = join_natural(v, v, v, v, v, v, v, v, 1)
        elif PER == 2:
            o0, o1 = tl.inline_asm_elementwise(
                "{ .reg .b32 r; ld.global.nc.b32 r, [$2]; mov.b32 {$0, $1}, r; }",
                "=h,=h,l", [ptrs], dtype=(dt, dt), is_pure=True, pack=1)
            vals = join_natural(o0, o1, o0, o0, o0, o0, o0, o0, 2)
        elif PER == 4:
            o0, o1, o2, o3 = tl.inline_asm_elementwise(
                "{ .reg .b32 r0, r1; ld.global.nc.v2.b32 {r0, r1}, [$4]; mov.b32 {$0, $1}, r0; "
                "mov.b32 {$2, $3}, r1; }",
                "=h,=h,=h,=h,l", [ptrs], dtype=(dt, dt, dt, dt), is_pure=True, pack=1)
            vals = join_natural(o0, o1, o2, o3, o0, o0, o0, o0, 4)
        else:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                "{ .reg .b32 r0, r1, r2, r3; ld.global.nc.v4.b32 {r0, r1, r2, r3}, [$8]; mov.b32 {$0, $1}, r0; "
                "mov.b32 {$2, $3}, r1; mov.b32 {$4, $5}, r2; mov.b32 {$6, $7}, r3; }",
                "=h,=h,=h,=h,=h,=h,=h,=h,l", [ptrs], dtype=(dt, dt, dt, dt, dt, dt, dt, dt), is_pure=True, pack=1)
            vals = join_natural(o0, o1, o2, o3, o4, o5, o6, o7, 8)
    else:
        vals = tl.load(ptrs[:, :, None] + tl.arange(0, PER)[None, None, :])
    return tl.reshape(vals, (R, J * PER))


@triton.jit
def unpack_tile(bytes_i32, BITS: tl.constexpr, R: tl.constexpr, J: tl.constexpr):
    """[R, J] bytes -> [R, J * 8/BITS] integer codes in natural column order."""
    PER: tl.constexpr = 8 // BITS
    shifts = tl.arange(0, PER) * BITS
    codes = (bytes_i32[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (R, J * PER))


@triton.jit
def softmax_step(s, ok, MASK, mask_row, cols, stride_mn, HAS_MASK: tl.constexpr, m_i, l_i):
    """Online softmax (base 2) over one tile of scores s [GP, N] of keys `cols` [N]: keys outside the tile (`ok`
    False) or masked out (``MASK[mask_row + cols * stride_mn] == 0`` with HAS_MASK) get -inf. Returns the unnormalized
    probabilities p, the rescale factor alpha of the old accumulator, the new sum and the new running max. Rows that
    have seen only masked scores keep m = -inf and contribute nothing (no NaN)."""
    if HAS_MASK:
        ok = ok & (tl.load(MASK + mask_row + cols * stride_mn, mask=ok, other=0) != 0)
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, alpha, l_i * alpha + tl.sum(p, axis=1), m_new


@triton.jit
def store_partials(M_OUT, L_OUT, ACC_OUT, row, m_i, l_i, acc, G: tl.constexpr, GP: tl.constexpr, BD: tl.constexpr):
    """One split's online-softmax state for the G real query rows (of GP): M/L [rows, G], ACC [rows, G, BD]."""
    g = tl.arange(0, GP)
    d = tl.arange(0, BD)
    tl.store(M_OUT + row * G + g, m_i, mask=g < G)
    tl.store(L_OUT + row * G + g, l_i, mask=g < G)
    tl.store(ACC_OUT + (row * G + g[:, None]) * BD + d[None, :], acc, mask=g[:, None] < G)
