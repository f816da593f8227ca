"""Triton kernels: compress-on-write and split-K decode attention on the packed caches.

Imported only through ``tq_transformers.kernels`` (lazily): a CPU install never imports Triton.

Decoding packed codes. ``packing`` stores 8 codes of b bits as one little-endian word of b bytes; for b in
{1, 2, 4, 8} byte ``j`` of a row simply holds codes ``j*PER .. j*PER + PER - 1`` (PER = 8 / b), lowest bits first.

- 16-bit models, codebooks (TurboQuant levels, KIVI's integers): one gather per packed byte from a 256-row table of
  the PER values it decodes to, already in the model dtype (``packing.byte_table``, `_decode_bytes`)::

      bytes [N, J] --TABLE[byte]--> PER tensors [N, J] --join--> [N, J, PER] --reshape--> [N, D]  column = j*PER + i

- sign bits (Bonsai) and float32 models: a broadcast shift in registers, then 2*bit - 1 or the float32 levels::

      bytes [N, J] --(>> b*i, & mask)--> [N, J, PER] --reshape--> [N, D]

Decode attention (flash-decoding). One program per (KV head of one batch row, split of the packed tokens): it loads
the G query heads of that KV head once ([GP, D], GP = G padded to 16 rows for the tensor cores), streams its share of
the codes and metadata, decodes tiles in registers only, and keeps an online softmax (base 2). It writes per split
the running max ``m``, the sum ``l`` and the unnormalized accumulator ``acc`` of the G real rows ([rows, G] and
[rows, G, D]). A reduce program per KV head merges the splits (all split maxima at once, then UNROLL partials per
step), rotates the value accumulator back once (TurboQuant, rotated Bonsai), adds the value mean weighted by the
quantized share of the probability (``l`` of the packed part), attends to the full-precision window and writes
``out [B, Hq, D]``.

Centering: scores of packed keys get ``q . mu_k`` added (a per-head constant, computed once per program).

Measured on an H200 (docs/RESULTS.md): these kernels are bound by the L1/shared-memory unit (table gathers and the
conversion of decoded tiles to the tensor-core operand layout), at 5-14% of the copy bandwidth.
"""

from __future__ import annotations

import functools
import weakref

import torch
import triton
import triton.language as tl

from .. import packing

_EPS = tl.constexpr(1e-8)  # as turboquant / bonsai `_EPS` (constexpr: read inside kernels)
_KIVI_SCALE_EPS = tl.constexpr(1e-5)  # as kivi `_SCALE_EPS`
_LOG2E = 1.4426950408889634


# Host-side integer helpers in plain Python: `triton.cdiv` / `triton.next_power_of_2` are constexpr functions whose
# calls cost microseconds each on the host, and the decode path runs for every layer of every step.
def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _round_half_even(x):
    """torch.round (ties to even) for x >= -0.5, exact in float32."""
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _lut(ptrs, ASM: tl.constexpr):
    """Codebook lookup ``LUT[code]``, one cached load per element.

    On the GPU it is written as inline PTX: given a plain ``tl.load``, Triton's software pipeliner turns this
    per-element gather into asynchronous copies of whole dequantized fp32 tiles into shared memory (2 stages of
    K and V tiles: 136 KiB a program, one program per SM): the TurboQuant kernel was 2.6x slower (H200, 8 x 32K).
    ``ASM=False`` (Triton's CPU interpreter, which has no inline assembly) uses ``tl.load``."""
    if ASM:
        return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=f,l", [ptrs], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return tl.load(ptrs)


@triton.jit
def _join_natural(o0, o1, o2, o3, o4, o5, o6, o7, PER: tl.constexpr):
    """Interleave PER same-shape tensors [R, J] into [R, J, PER] with element i of the last axis = o_i.

    ``tl.join(x, y)`` appends an axis of 2 (x, y); joining the even and the odd outputs and merging axes puts
    output 2a + b at position 2a + b, so both elements stay in the thread that loaded them (no data movement)."""
    if PER == 1:
        return o0[:, :, None]
    elif PER == 2:
        return tl.join(o0, o1)
    elif PER == 4:
        ev = tl.join(o0, o2)
        od = tl.join(o1, o3)
        return tl.reshape(tl.join(ev, od), (o0.shape[0], o0.shape[1], 4))
    else:
        ev = tl.reshape(tl.join(tl.join(o0, o4), tl.join(o2, o6)), (o0.shape[0], o0.shape[1], 4))
        od = tl.reshape(tl.join(tl.join(o1, o5), tl.join(o3, o7)), (o0.shape[0], o0.shape[1], 4))
        return tl.reshape(tl.join(ev, od), (o0.shape[0], o0.shape[1], 8))


@triton.jit
def _decode_bytes(TABLE, bytes_i32, PER: tl.constexpr, R: tl.constexpr, J: tl.constexpr, ASM: tl.constexpr):
    """[R, J] packed bytes -> [R, J * PER] values ``TABLE[byte, i]`` in natural column order (column j*PER + i).

    TABLE [256, PER] holds, for every byte value, the PER values its codes decode to, already in the model's 16-bit
    dtype (``byte_table``). One gather of 2*PER bytes per packed byte replaces per-code unpacking, conversion and
    lookup: 1 load for 2 TurboQuant-4 codes, 4 KIVI-2 codes or 8 one-bit TurboQuant codes::

        byte 0b1011_0010 (4-bit codes 2, 11) --TABLE--> [level[2], level[11]]  -> columns 2j, 2j+1

    On the GPU the gather is inline PTX (a plain ``tl.load`` would be pipelined through shared memory, see `_lut`);
    ``ASM=False`` (Triton's interpreter) uses ``tl.load``."""
    ptrs = TABLE + bytes_i32 * PER
    if ASM:
        dt = TABLE.dtype.element_ty
        if PER == 1:
            v = tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [ptrs], dtype=dt, is_pure=True,
                                          pack=1)
            vals = _join_natural(v, v, v, v, v, v, v, v, 1)
        elif PER == 2:
            o0, o1 = tl.inline_asm_elementwise(
                "{ .reg .b32 r; ld.global.nc.b32 r, [$2]; mov.b32 {$0, $1}, r; }",
                "=h,=h,l", [ptrs], dtype=(dt, dt), is_pure=True, pack=1)
            vals = _join_natural(o0, o1, o0, o0, o0, o0, o0, o0, 2)
        elif PER == 4:
            o0, o1, o2, o3 = tl.inline_asm_elementwise(
                "{ .reg .b32 r0, r1; ld.global.nc.v2.b32 {r0, r1}, [$4]; mov.b32 {$0, $1}, r0; "
                "mov.b32 {$2, $3}, r1; }",
                "=h,=h,=h,=h,l", [ptrs], dtype=(dt, dt, dt, dt), is_pure=True, pack=1)
            vals = _join_natural(o0, o1, o2, o3, o0, o0, o0, o0, 4)
        else:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                "{ .reg .b32 r0, r1, r2, r3; ld.global.nc.v4.b32 {r0, r1, r2, r3}, [$8]; mov.b32 {$0, $1}, r0; "
                "mov.b32 {$2, $3}, r1; mov.b32 {$4, $5}, r2; mov.b32 {$6, $7}, r3; }",
                "=h,=h,=h,=h,=h,=h,=h,=h,l", [ptrs], dtype=(dt, dt, dt, dt, dt, dt, dt, dt), is_pure=True, pack=1)
            vals = _join_natural(o0, o1, o2, o3, o4, o5, o6, o7, 8)
    else:
        vals = tl.load(ptrs[:, :, None] + tl.arange(0, PER)[None, None, :])
    return tl.reshape(vals, (R, J * PER))


@triton.jit
def _unpack_tile(bytes_i32, BITS: tl.constexpr, R: tl.constexpr, J: tl.constexpr):
    """[R, J] bytes -> [R, J * 8/BITS] integer codes in natural column order."""
    PER: tl.constexpr = 8 // BITS
    shifts = tl.arange(0, PER) * BITS
    codes = (bytes_i32[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (R, J * PER))


# ----------------------------------------------------------------------------------------------------------------------
# Compress-on-write
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _tq_compress_kernel(
    X, MU, P, LEVELS, EDGES, CODES, NORMS,
    T, H,
    s_xb, s_xh, s_xt, s_mub, s_muh, s_cb, s_ch, s_ct, s_nb, s_nh,
    D: tl.constexpr, BD: tl.constexpr, BJ: tl.constexpr, BITS: tl.constexpr,
    HAS_MU: tl.constexpr, NORM_CORR: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program: BLOCK_T tokens of one head. x -> center -> /||x|| -> rotate -> bucketize -> pack, norms."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BD)
    j = tl.arange(0, BJ)
    t_ok = t < T
    d_ok = d < D
    j_ok = j < D // 8
    x = tl.load(X + b * s_xb + h * s_xh + t[:, None] * s_xt + d[None, :], mask=t_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    if HAS_MU:
        mu = tl.load(MU + b * s_mub + h * s_muh + d, mask=d_ok, other=0.0).to(tl.float32)
        x = tl.where(d_ok[None, :], x - mu[None, :], 0.0)
    gamma = tl.sqrt_rn(tl.sum(x * x, axis=1))  # [BLOCK_T]
    u = tl.div_rn(x, tl.maximum(gamma, _EPS)[:, None])
    word = tl.zeros((BLOCK_T, BJ), dtype=tl.int64)
    csq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for i in tl.static_range(8):
        # PT_i[d, j] = P[8j + i, d]: the rotated coordinates 8j + i, i.e. code i of run j
        pt = tl.load(P + (8 * j[None, :] + i) * D + d[:, None], mask=d_ok[:, None] & j_ok[None, :], other=0.0)
        y = tl.dot(u, pt, input_precision="ieee")  # [BLOCK_T, BJ]
        idx = tl.zeros((BLOCK_T, BJ), dtype=tl.int32)
        for k in tl.static_range((1 << BITS) - 1):
            idx += (y > tl.load(EDGES + k)).to(tl.int32)
        c = tl.load(LEVELS + idx)
        csq += tl.sum(tl.where(j_ok[None, :], c * c, 0.0), axis=1)
        word = word | (idx.to(tl.int64) << (BITS * i))
    if NORM_CORR:
        norms = tl.div_rn(gamma, tl.maximum(tl.sqrt_rn(csq), _EPS))
    else:
        norms = gamma
    tl.store(NORMS + b * s_nb + h * s_nh + t, norms.to(tl.float16), mask=t_ok)
    base = CODES + b * s_cb + h * s_ch + t[:, None] * s_ct + j[None, :] * BITS
    for k in tl.static_range(BITS):
        tl.store(base + k, ((word >> (8 * k)) & 0xFF).to(tl.uint8), mask=t_ok[:, None] & j_ok[None, :])


@triton.jit
def _bonsai_compress_kernel(
    X, MU, P, SIGNS, SCALE,
    T, H,
    s_xb, s_xh, s_xt, s_mub, s_muh, s_sb, s_sh, s_st, s_gb, s_gh, s_gt,
    D: tl.constexpr, BD: tl.constexpr, BJ: tl.constexpr, GS: tl.constexpr,
    HAS_MU: tl.constexpr, ROT: tl.constexpr, L2: tl.constexpr, BLOCK_T: tl.constexpr, RECIP: tl.constexpr,
):
    """One program: BLOCK_T tokens of one head. x -> center -> (rotate) -> sign bits and per-group scales."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BD)
    j = tl.arange(0, BJ)
    t_ok = t < T
    d_ok = d < D
    j_ok = j < D // 8
    xrow = X + b * s_xb + h * s_xh + t[:, None] * s_xt
    if ROT:
        x = tl.load(xrow + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if HAS_MU:
            mu = tl.load(MU + b * s_mub + h * s_muh + d, mask=d_ok, other=0.0).to(tl.float32)
            x = tl.where(d_ok[None, :], x - mu[None, :], 0.0)
    word = tl.zeros((BLOCK_T, BJ), dtype=tl.int32)
    sabs = tl.zeros((BLOCK_T, BJ), dtype=tl.float32)
    ssq = tl.zeros((BLOCK_T, BJ), dtype=tl.float32)
    for i in tl.static_range(8):
        col = 8 * j + i
        if ROT:
            pt = tl.load(P + col[None, :] * D + d[:, None], mask=d_ok[:, None] & j_ok[None, :], other=0.0)
            y = tl.dot(x, pt, input_precision="ieee")
        else:
            y = tl.load(xrow + col[None, :], mask=t_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)
            if HAS_MU:
                muc = tl.load(MU + b * s_mub + h * s_muh + col, mask=j_ok, other=0.0).to(tl.float32)
                y = y - muc[None, :]
        word = word | ((y >= 0).to(tl.int32) << i)
        sabs += tl.abs(y)
        ssq += y * y
    tl.store(SIGNS + b * s_sb + h * s_sh + t[:, None] * s_st + j[None, :], word.to(tl.uint8),
             mask=t_ok[:, None] & j_ok[None, :])
    grp = j // (GS // 8)
    for g in tl.static_range(D // GS):
        in_g = (grp == g) & j_ok
        l1 = tl.sum(tl.where(in_g[None, :], sabs, 0.0), axis=1)
        if L2:
            sc = tl.div_rn(tl.sum(tl.where(in_g[None, :], ssq, 0.0), axis=1), tl.maximum(l1, _EPS))
        else:
            sc = _div_scalar(l1, GS, RECIP)
        tl.store(SCALE + b * s_gb + h * s_gh + t * s_gt + g, sc.to(tl.float16), mask=t_ok)


@triton.jit
def _div_scalar(x, c: tl.constexpr, RECIP: tl.constexpr):
    """x / c for a Python-number c, rounded as PyTorch does it: on CUDA, `tensor / scalar` is computed as
    `tensor * (1 / scalar)` (float32 reciprocal); on the CPU as a true division."""
    if RECIP:
        return x * (1.0 / c)
    return tl.div_rn(x, c * 1.0)


@triton.jit
def _minmax_meta(lo, hi, QMAX: tl.constexpr, RECIP: tl.constexpr):
    """KIVI's fp16 zero point and scale from the float32 min and max of a group (as ``kivi.minmax_quantize``)."""
    zero16 = lo.to(tl.float16)
    scale16 = tl.maximum(_div_scalar(hi - zero16.to(tl.float32), QMAX, RECIP), _KIVI_SCALE_EPS).to(tl.float16)
    return zero16, scale16


@triton.jit
def _kivi_key_compress_kernel(
    X, CODES, SCALE, ZERO,
    H,
    s_xb, s_xh, s_xt, s_cb, s_ch, s_cg, s_sb, s_sh, s_sg,
    D: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr, RECIP: tl.constexpr,
):
    """One program: one group of GS tokens x D channels of one head; min-max over the tokens of each channel."""
    pid_g = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    R: tl.constexpr = GS // 8  # runs of 8 tokens
    QMAX: tl.constexpr = (1 << BITS) - 1
    r = tl.arange(0, R)
    d = tl.arange(0, D)
    xg = X + b * s_xb + h * s_xh + (pid_g * GS) * s_xt
    lo = tl.full((D,), float("inf"), tl.float32)
    hi = tl.full((D,), float("-inf"), tl.float32)
    for i in tl.static_range(8):
        x = tl.load(xg + (8 * r[:, None] + i) * s_xt + d[None, :]).to(tl.float32)  # tokens 8r + i
        fin = (x == x) & (tl.abs(x) < float("inf"))
        lo = tl.minimum(lo, tl.min(tl.where(fin, x, float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(fin, x, float("-inf")), axis=0))
    none = lo == float("inf")
    lo = tl.where(none, 0.0, lo)
    hi = tl.where(none, 0.0, hi)
    zero16, scale16 = _minmax_meta(lo, hi, QMAX, RECIP)
    zero = zero16.to(tl.float32)
    scale = scale16.to(tl.float32)
    word = tl.zeros((R, D), dtype=tl.int64)
    for i in tl.static_range(8):
        x = tl.load(xg + (8 * r[:, None] + i) * s_xt + d[None, :]).to(tl.float32)
        fin = (x == x) & (tl.abs(x) < float("inf"))
        q = _round_half_even(tl.div_rn(x - zero[None, :], scale[None, :]))
        q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0)
        q = tl.where(fin, q, 0.0).to(tl.int64)
        word = word | (q << (BITS * i))
    base = CODES + b * s_cb + h * s_ch + pid_g * s_cg + d[None, :] * (GS * BITS // 8) + r[:, None] * BITS
    for k in tl.static_range(BITS):
        tl.store(base + k, ((word >> (8 * k)) & 0xFF).to(tl.uint8))
    tl.store(SCALE + b * s_sb + h * s_sh + pid_g * s_sg + d, scale16)
    tl.store(ZERO + b * s_sb + h * s_sh + pid_g * s_sg + d, zero16)


@triton.jit
def _kivi_value_compress_kernel(
    X, CODES, SCALE, ZERO,
    T, H,
    s_xb, s_xh, s_xt, s_cb, s_ch, s_ct, s_sb, s_sh, s_st,
    D: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr, BLOCK_T: tl.constexpr, RECIP: tl.constexpr,
):
    """One program: BLOCK_T tokens of one head; min-max over each group of GS channels of a token."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    J: tl.constexpr = D // 8
    NG: tl.constexpr = D // GS
    QMAX: tl.constexpr = (1 << BITS) - 1
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, J)
    t_ok = t < T
    grp = j // (GS // 8)  # group of columns 8j + i, for every i
    xrow = X + b * s_xb + h * s_xh + t[:, None] * s_xt
    lo_c = tl.full((BLOCK_T, J), float("inf"), tl.float32)
    hi_c = tl.full((BLOCK_T, J), float("-inf"), tl.float32)
    for i in tl.static_range(8):
        x = tl.load(xrow + 8 * j[None, :] + i, mask=t_ok[:, None], other=0.0).to(tl.float32)
        fin = (x == x) & (tl.abs(x) < float("inf"))
        lo_c = tl.minimum(lo_c, tl.where(fin, x, float("inf")))
        hi_c = tl.maximum(hi_c, tl.where(fin, x, float("-inf")))
    zero = tl.zeros((BLOCK_T, J), dtype=tl.float32)
    scale = tl.zeros((BLOCK_T, J), dtype=tl.float32)
    for g in tl.static_range(NG):
        in_g = grp == g
        lo = tl.min(tl.where(in_g[None, :], lo_c, float("inf")), axis=1)
        hi = tl.max(tl.where(in_g[None, :], hi_c, float("-inf")), axis=1)
        none = lo == float("inf")
        lo = tl.where(none, 0.0, lo)
        hi = tl.where(none, 0.0, hi)
        zero16, scale16 = _minmax_meta(lo, hi, QMAX, RECIP)
        tl.store(SCALE + b * s_sb + h * s_sh + t * s_st + g, scale16, mask=t_ok)
        tl.store(ZERO + b * s_sb + h * s_sh + t * s_st + g, zero16, mask=t_ok)
        zero = tl.where(in_g[None, :], zero16.to(tl.float32)[:, None], zero)
        scale = tl.where(in_g[None, :], scale16.to(tl.float32)[:, None], scale)
    word = tl.zeros((BLOCK_T, J), dtype=tl.int64)
    for i in tl.static_range(8):
        x = tl.load(xrow + 8 * j[None, :] + i, mask=t_ok[:, None], other=0.0).to(tl.float32)
        fin = (x == x) & (tl.abs(x) < float("inf"))
        q = _round_half_even(tl.div_rn(x - zero, scale))
        q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0)
        q = tl.where(fin, q, 0.0).to(tl.int64)
        word = word | (q << (BITS * i))
    base = CODES + b * s_cb + h * s_ch + t[:, None] * s_ct + j[None, :] * BITS
    for k in tl.static_range(BITS):
        tl.store(base + k, ((word >> (8 * k)) & 0xFF).to(tl.uint8), mask=t_ok[:, None])


# ----------------------------------------------------------------------------------------------------------------------
# Decode attention: split kernels
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _codebook_tile(LUT, TABLE, bytes_i32, BITS: tl.constexpr, R: tl.constexpr, J: tl.constexpr, SIGN1: tl.constexpr,
                   F32: tl.constexpr, ASM: tl.constexpr):
    """[R, J] packed codes -> [R, J * 8/BITS] unscaled values: codebook levels (TurboQuant) or +-1 (Bonsai signs).

    Sign bits: unpacked to 2*bit - 1 in registers (no memory access; measured faster on an H200 than the byte table,
    whose gathers load the L1, the bottleneck of these kernels). Codebooks: 16-bit models take one byte-table gather
    per packed byte, in the model dtype (`_decode_bytes`); float32 models unpack and look up the float32 levels.
    Values come in the model dtype (TABLE's)."""
    if SIGN1:
        out = _unpack_tile(bytes_i32, BITS, R, J).to(tl.float32) * 2.0 - 1.0
        if not F32:
            out = out.to(TABLE.dtype.element_ty)
    elif F32:
        out = _lut(LUT + _unpack_tile(bytes_i32, BITS, R, J), ASM)
    else:
        out = _decode_bytes(TABLE, bytes_i32, 8 // BITS, R, J, ASM)
    return out


@triton.jit
def _integer_tile(TABLE, bytes_i32, BITS: tl.constexpr, R: tl.constexpr, J: tl.constexpr, F32: tl.constexpr,
                  ASM: tl.constexpr):
    """[R, J] packed codes -> [R, J * 8/BITS] integer codes: exact small integers in the model's 16-bit dtype from
    the byte table of 0 .. 2^BITS - 1 (`_decode_bytes`), or int32 by unpacking for float32 models."""
    if F32:
        out = _unpack_tile(bytes_i32, BITS, R, J)
    else:
        out = _decode_bytes(TABLE, bytes_i32, 8 // BITS, R, J, ASM)
    return out


@triton.jit
def _softmax_step(s, ok, MASK_ROW, cols, s_mn, HAS_MASK: tl.constexpr, m_i, l_i):
    """Online softmax (base 2) over one tile of scores s [GP, N] of keys `cols` [N]: keys outside the tile (`ok`
    False) or masked out by the key mask (``MASK_ROW[cols * s_mn] == 0``, with HAS_MASK) get -inf. Returns the
    unnormalized probabilities p, the rescale factor alpha of the old accumulator, the new sum and the new running
    max. Rows that have seen only masked scores keep m = -inf and contribute nothing (no NaN)."""
    if HAS_MASK:
        ok = ok & (tl.load(MASK_ROW + cols * s_mn, mask=ok, other=0) != 0)
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, alpha, l_i * alpha + tl.sum(p, axis=1), m_new


@triton.jit
def _store_partials(M_OUT, L_OUT, ACC_OUT, row, m_i, l_i, acc, G: tl.constexpr, GP: tl.constexpr, BD: tl.constexpr):
    """One split's online-softmax state for the G real query rows (of GP): M/L [rows, G], ACC [rows, G, BD]."""
    g = tl.arange(0, GP)
    d = tl.arange(0, BD)
    tl.store(M_OUT + row * G + g, m_i, mask=g < G)
    tl.store(L_OUT + row * G + g, l_i, mask=g < G)
    tl.store(ACC_OUT + (row * G + g[:, None]) * BD + d[None, :], acc, mask=g[:, None] < G)



# ----------------------------------------------------------------------------------------------------------------------
# Scalars that change from step to step (lengths, split counts, the key mask's row stride) are not specialized: Triton
# would otherwise compile a new variant when one of them becomes 1 or a multiple of 16 in the middle of a generation.
# Strides of the codes, scales and window stay specialized (their divisibility decides the vector width of loads).
_PER_STEP = ["n_q", "tokens_per_split", "num_splits", "s_mb"]


@triton.jit(do_not_specialize=_PER_STEP)
def _codebook_split_kernel(
    Q, MU, KC, KS, VC, VS, LUT, TABLE, MASK, M_OUT, L_OUT, ACC_OUT, LENS,
    n_q, tokens_per_split, num_splits, H,
    s_kcb, s_kch, s_kcn, s_ksb, s_ksh, s_ksn, s_vcb, s_vch, s_vcn, s_vsb, s_vsh, s_vsn, s_mb, s_mn,
    sm_scale_log2,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BJ: tl.constexpr, BITS: tl.constexpr, NGS: tl.constexpr,
    SIGN1: tl.constexpr, HAS_MU: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, F32: tl.constexpr,
    ASM: tl.constexpr, DEV_LEN: tl.constexpr,
):
    """TurboQuant (codebook levels x per-token norm) and Bonsai (+-1 x per-group scale) packed tokens.

    Q [B*Hkv, G, D] (rotated when the method rotates), MU [B*Hkv, D] float32 (the key mean in Q's domain),
    codes [B, Hkv, N, D*BITS/8] uint8, scales [B, Hkv, N, NGS] ([B, Hkv, N] when NGS = 1);
    partials M/L [B*Hkv, S, G], ACC [B*Hkv, S, G, BD]. With DEV_LEN, the packed tokens attended are read from LENS[0]
    on the device (`n_q` is then only the bound the splits were sized for: CUDA-graph replays).
    """
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    PER: tl.constexpr = 8 // BITS
    BD: tl.constexpr = BJ * PER
    DB: tl.constexpr = D * BITS // 8
    GSZ: tl.constexpr = D // NGS
    g = tl.arange(0, GP)
    d = tl.arange(0, BD)
    j = tl.arange(0, BJ)
    nn = tl.arange(0, BLOCK_N)
    d_ok = d < D
    j_ok = j < DB
    q = tl.load(Q + (pid_bh * G + g[:, None]) * D + d[None, :], mask=(g[:, None] < G) & d_ok[None, :], other=0.0)
    qf = q.to(tl.float32)
    if HAS_MU:
        mu = tl.load(MU + pid_bh * D + d, mask=d_ok, other=0.0)
        qmu = tl.sum(qf * mu[None, :], axis=1)
    else:
        qmu = tl.zeros((GP,), dtype=tl.float32)
    if F32:
        qd = qf
    else:
        qd = q
    if DEV_LEN:
        n_q = tl.load(LENS).to(tl.int32)
    start = pid_s * tokens_per_split
    end = tl.minimum(start + tokens_per_split, n_q)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), dtype=tl.float32)
    acc = tl.zeros((GP, BD), dtype=tl.float32)
    kc_base = KC + b * s_kcb + h * s_kch
    vc_base = VC + b * s_vcb + h * s_vch
    ks_base = KS + b * s_ksb + h * s_ksh
    vs_base = VS + b * s_vsb + h * s_vsh
    for it in range(0, end - start, BLOCK_N):  # the tail is masked by `end`; none past the packed tokens
        n0 = start + it
        n = n0 + nn
        n_ok = n < end
        tile_ok = n_ok[:, None] & j_ok[None, :]
        kb = tl.load(kc_base + n[:, None] * s_kcn + j[None, :], mask=tile_ok, other=0).to(tl.int32)
        kf = _codebook_tile(LUT, TABLE, kb, BITS, BLOCK_N, BJ, SIGN1, F32, ASM)  # [BLOCK_N, BD]
        if NGS > 1:
            ks2 = tl.load(ks_base + n[:, None] * s_ksn + d[None, :] // GSZ, mask=n_ok[:, None] & d_ok[None, :],
                          other=0.0)
            kf = kf * ks2.to(kf.dtype)
        if F32:
            s = tl.dot(qd, tl.trans(kf), input_precision="ieee")
        else:
            s = tl.dot(qd, tl.trans(kf))
        if NGS == 1:
            ks = tl.load(ks_base + n * s_ksn, mask=n_ok, other=0.0).to(tl.float32)
            s = s * ks[None, :]
        s = (s + qmu[:, None]) * sm_scale_log2
        p, alpha, l_i, m_new = _softmax_step(s, n_ok, MASK + b * s_mb, n, s_mn, HAS_MASK, m_i, l_i)
        vb = tl.load(vc_base + n[:, None] * s_vcn + j[None, :], mask=tile_ok, other=0).to(tl.int32)
        vf = _codebook_tile(LUT, TABLE, vb, BITS, BLOCK_N, BJ, SIGN1, F32, ASM)
        if NGS > 1:
            vs2 = tl.load(vs_base + n[:, None] * s_vsn + d[None, :] // GSZ, mask=n_ok[:, None] & d_ok[None, :],
                          other=0.0)
            vf = vf * vs2.to(vf.dtype)
        else:
            vs = tl.load(vs_base + n * s_vsn, mask=n_ok, other=0.0).to(tl.float32)
            p = p * vs[None, :]
        if F32:
            acc = acc * alpha[:, None] + tl.dot(p, vf, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(qd.dtype), vf)
        m_i = m_new
    _store_partials(M_OUT, L_OUT, ACC_OUT, pid_bh * num_splits + pid_s, m_i, l_i, acc, G, GP, BD)


@triton.jit(do_not_specialize=_PER_STEP)
def _kivi_split_kernel(
    Q, KC, KS, KZ, VC, VS, VZ, TABLE, MASK, M_OUT, L_OUT, ACC_OUT, LENS,
    n_q, tokens_per_split, num_splits, H,
    s_kcb, s_kch, s_kcg, s_ksb, s_ksh, s_ksg, s_vcb, s_vch, s_vcn, s_vsb, s_vsh, s_vsn, s_mb, s_mn,
    sm_scale_log2,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, NGB: tl.constexpr,
    HAS_MASK: tl.constexpr, F32: tl.constexpr, ASM: tl.constexpr, DEV_LEN: tl.constexpr,
):
    """KIVI packed tokens, NGB key groups (NGB * GS tokens) per iteration.

    keys  k_codes [B, Hkv, N/GS, D, GS*BITS/8], k_scale/k_zero [B, Hkv, N/GS, D]  (per channel, GS tokens a group)
    values v_codes [B, Hkv, N, D*BITS/8],       v_scale/v_zero [B, Hkv, N, D/GS]  (per token, GS channels a group)
    """
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    GB: tl.constexpr = GS * BITS // 8
    DBV: tl.constexpr = D * BITS // 8
    NG: tl.constexpr = D // GS
    BLOCK_N: tl.constexpr = NGB * GS
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    gl = tl.arange(0, NGB)
    jb = tl.arange(0, GB)
    jv = tl.arange(0, DBV)
    vg = tl.arange(0, NG)
    nn = tl.arange(0, BLOCK_N)
    q = tl.load(Q + (pid_bh * G + g[:, None]) * D + d[None, :], mask=g[:, None] < G, other=0.0)
    if F32:
        q = q.to(tl.float32)
    if DEV_LEN:
        n_q = tl.load(LENS).to(tl.int32)
    start = pid_s * tokens_per_split
    end = tl.minimum(start + tokens_per_split, n_q)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), dtype=tl.float32)
    acc = tl.zeros((GP, D), dtype=tl.float32)
    kc_base = KC + b * s_kcb + h * s_kch
    ks_base = KS + b * s_ksb + h * s_ksh
    kz_base = KZ + b * s_ksb + h * s_ksh
    vc_base = VC + b * s_vcb + h * s_vch
    vs_base = VS + b * s_vsb + h * s_vsh
    vz_base = VZ + b * s_vsb + h * s_vsh
    for it in range(0, end - start, BLOCK_N):  # the tail is masked by `end`; none past the packed tokens
        n0 = start + it
        grp = n0 // GS + gl  # [NGB]
        g_ok = grp * GS < end
        kb = tl.load(kc_base + grp[None, :, None] * s_kcg + d[:, None, None] * GB + jb[None, None, :],
                     mask=g_ok[None, :, None], other=0).to(tl.int32)  # [D, NGB, GB]
        kcode = tl.reshape(_integer_tile(TABLE, tl.reshape(kb, (D * NGB, GB)), BITS, D * NGB, GB, F32, ASM),
                           (D, NGB, GS))
        ksc = tl.load(ks_base + grp[None, :] * s_ksg + d[:, None], mask=g_ok[None, :], other=0.0).to(tl.float32)
        kzr = tl.load(kz_base + grp[None, :] * s_ksg + d[:, None], mask=g_ok[None, :], other=0.0).to(tl.float32)
        kt = tl.reshape(kcode.to(tl.float32) * ksc[:, :, None] + kzr[:, :, None], (D, BLOCK_N))  # K^T
        if F32:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt.to(q.dtype))
        s = s * sm_scale_log2
        n = n0 + nn
        n_ok = n < end
        p, alpha, l_i, m_new = _softmax_step(s, n_ok, MASK + b * s_mb, n, s_mn, HAS_MASK, m_i, l_i)
        vb = tl.load(vc_base + n[:, None] * s_vcn + jv[None, :], mask=n_ok[:, None], other=0).to(tl.int32)
        vcode = tl.reshape(_integer_tile(TABLE, vb, BITS, BLOCK_N, DBV, F32, ASM), (BLOCK_N, NG, GS))
        vsc = tl.load(vs_base + n[:, None] * s_vsn + vg[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
        vzr = tl.load(vz_base + n[:, None] * s_vsn + vg[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
        v = tl.reshape(vcode.to(tl.float32) * vsc[:, :, None] + vzr[:, :, None], (BLOCK_N, D))
        if F32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    _store_partials(M_OUT, L_OUT, ACC_OUT, pid_bh * num_splits + pid_s, m_i, l_i, acc, G, GP, D)


# ----------------------------------------------------------------------------------------------------------------------
# Decode attention: reduce (+ window, rotation back, value mean)
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["num_splits", "W", "n_q", "s_mb"])
def _reduce_kernel(
    M, L, ACC, Q, WK, WV, PV, MUV, MASK, OUT, LENS,
    num_splits, W, n_q, H,
    s_wkb, s_wkh, s_wkn, s_wvb, s_wvh, s_wvn, s_mb, s_mn,
    sm_scale_log2,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, SP: tl.constexpr, UNROLL: tl.constexpr,
    HAS_ROT: tl.constexpr, HAS_MU: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_W: tl.constexpr, F32: tl.constexpr,
    DEV_LEN: tl.constexpr,
):
    """One program per KV head of one row: merge the splits, finish the packed part, attend to the window. With
    DEV_LEN, the packed and window token counts are LENS[0] and LENS[1], read on the device."""
    pid_bh = tl.program_id(0)
    if DEV_LEN:
        n_q = tl.load(LENS).to(tl.int32)
        W = tl.load(LENS + 1).to(tl.int32)
    b = pid_bh // H
    h = pid_bh % H
    g = tl.arange(0, GP)
    d = tl.arange(0, BD)
    d_ok = d < D
    g_ok = g < G
    # the splits' maxima [SP, GP] at once, then every split's weight exp2(m_s - m): independent loads, no chain
    sp = tl.arange(0, SP)
    sp_ok = (sp[:, None] < num_splits) & g_ok[None, :]
    rows = pid_bh * num_splits + sp
    ms = tl.load(M + rows[:, None] * G + g[None, :], mask=sp_ok, other=float("-inf"))
    m_i = tl.max(ms, axis=0)  # [GP]
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    ls = tl.load(L + rows[:, None] * G + g[None, :], mask=sp_ok, other=0.0)
    l_i = tl.sum(ls * tl.exp2(ms - m_safe[None, :]), axis=0)
    acc = tl.zeros((GP, BD), dtype=tl.float32)
    for s0 in range(0, num_splits, UNROLL):
        for u in tl.static_range(UNROLL):  # UNROLL tiles in flight
            row = pid_bh * num_splits + s0 + u
            ok = g_ok & (s0 + u < num_splits)
            wu = tl.exp2(tl.load(M + row * G + g, mask=ok, other=float("-inf")) - m_safe)
            accs = tl.load(ACC + (row * G + g[:, None]) * BD + d[None, :], mask=ok[:, None], other=0.0)
            acc += accs * wu[:, None]
    if HAS_ROT:  # back from the value rotation: x = y @ P
        pv = tl.load(PV + d[:, None] * D + d[None, :], mask=d_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(acc, pv, input_precision="ieee")
    if HAS_MU:  # each packed value is v_hat + mu_v: add mu_v times the packed share of the probability
        muv = tl.load(MUV + pid_bh * D + d, mask=d_ok, other=0.0)
        acc = acc + l_i[:, None] * muv[None, :]
    q = tl.load(Q + (pid_bh * G + g[:, None]) * D + d[None, :], mask=(g[:, None] < G) & d_ok[None, :], other=0.0)
    if F32:
        q = q.to(tl.float32)
    ww = tl.arange(0, BLOCK_W)
    for w0 in range(0, W, BLOCK_W):
        w = w0 + ww
        w_ok = w < W
        ld = w_ok[:, None] & d_ok[None, :]
        k = tl.load(WK + b * s_wkb + h * s_wkh + w[:, None] * s_wkn + d[None, :], mask=ld, other=0.0)
        v = tl.load(WV + b * s_wvb + h * s_wvh + w[:, None] * s_wvn + d[None, :], mask=ld, other=0.0)
        if F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)))
        s = s * sm_scale_log2
        p, alpha, l_i, m_new = _softmax_step(s, w_ok, MASK + b * s_mb, n_q + w, s_mn, HAS_MASK, m_i, l_i)
        if F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(OUT + (pid_bh * G + g[:, None]) * D + d[None, :], out.to(OUT.dtype.element_ty),
             mask=(g[:, None] < G) & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------------
# Python wrappers (same signatures as ``reference``)
# ----------------------------------------------------------------------------------------------------------------------
def _mean_args(mean, like):
    if mean is None:
        return like, 0, 0, False
    return mean, mean.stride(0), mean.stride(1), True


def turboquant_compress(x, mean, rotation, levels, bits: int, norm_correction: bool = True):
    b, h, t, d = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    codes = torch.empty(b, h, t, d * bits // 8, dtype=torch.uint8, device=x.device)
    norms = torch.empty(b, h, t, dtype=torch.float16, device=x.device)
    levels = levels.float().contiguous()
    edges = ((levels[1:] + levels[:-1]) / 2).contiguous()
    mu, s_mub, s_muh, has_mu = _mean_args(mean, x)
    block_t = 32
    grid = (_cdiv(t, block_t), b * h)
    _tq_compress_kernel[grid](
        x, mu, rotation.float().contiguous(), levels, edges, codes, norms, t, h,
        x.stride(0), x.stride(1), x.stride(2), s_mub, s_muh,
        codes.stride(0), codes.stride(1), codes.stride(2), norms.stride(0), norms.stride(1),
        D=d, BD=_pow2(d, 16), BJ=_pow2(d // 8, 16), BITS=bits, HAS_MU=has_mu, NORM_CORR=norm_correction,
        BLOCK_T=block_t, num_warps=4,
    )
    return codes, norms


def kivi_compress(keys, values, bits: int, group_size: int):
    b, h, t, d = keys.shape
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    values = values if values.stride(-1) == 1 else values.contiguous()
    dev = keys.device
    gs = group_size
    kc = torch.empty(b, h, t // gs, d, gs * bits // 8, dtype=torch.uint8, device=dev)
    ks = torch.empty(b, h, t // gs, d, dtype=torch.float16, device=dev)
    kz = torch.empty_like(ks)
    vc = torch.empty(b, h, t, d * bits // 8, dtype=torch.uint8, device=dev)
    vs = torch.empty(b, h, t, d // gs, dtype=torch.float16, device=dev)
    vz = torch.empty_like(vs)
    _kivi_key_compress_kernel[(t // gs, b * h)](
        keys, kc, ks, kz, h,
        keys.stride(0), keys.stride(1), keys.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2),
        D=d, GS=gs, BITS=bits, RECIP=keys.is_cuda, num_warps=4,
    )
    block_t = 16
    _kivi_value_compress_kernel[(_cdiv(t, block_t), b * h)](
        values, vc, vs, vz, t, h,
        values.stride(0), values.stride(1), values.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        vs.stride(0), vs.stride(1), vs.stride(2),
        D=d, GS=gs, BITS=bits, BLOCK_T=block_t, RECIP=values.is_cuda, num_warps=4,
    )
    return kc, ks, kz, vc, vs, vz


def bonsai_compress(x, mean, rotation, group_size: int, scale_mode: str = "mean_abs"):
    b, h, t, d = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    signs = torch.empty(b, h, t, d // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(b, h, t, d // group_size, dtype=torch.float16, device=x.device)
    mu, s_mub, s_muh, has_mu = _mean_args(mean, x)
    rot = rotation.float().contiguous() if rotation is not None else x
    block_t = 32
    _bonsai_compress_kernel[(_cdiv(t, block_t), b * h)](
        x, mu, rot, signs, scale, t, h,
        x.stride(0), x.stride(1), x.stride(2), s_mub, s_muh,
        signs.stride(0), signs.stride(1), signs.stride(2), scale.stride(0), scale.stride(1), scale.stride(2),
        D=d, BD=_pow2(d, 16), BJ=_pow2(d // 8, 16), GS=group_size, HAS_MU=has_mu, ROT=rotation is not None,
        L2=scale_mode == "l2", BLOCK_T=block_t, RECIP=x.is_cuda, num_warps=4,
    )
    return signs, scale


# Programs per SM the split heuristic aims for (flash-decoding: enough programs in flight to hide memory latency).
SPLIT_WAVES = 8  # swept 8, 16, 32 on an H200 (scripts/tune_decode_kernels.py): 8 best at 8 x 32K, within 5% at 1 x 32K
MAX_SPLITS = 128
# Launch settings of the split kernels, the best of a sweep on an H200 (scripts/tune_decode_kernels.py, see
# docs/RESULTS.md): packed tokens per loop iteration, warps per program, software-pipelining depth. KIVI's block is a
# whole number of its key groups.
DECODE_TUNING = {
    "codebook": {"block_n": 128, "num_warps": 4, "num_stages": 3},
    "kivi": {"block_n": 128, "num_warps": 4, "num_stages": 2},
}
REDUCE_UNROLL = 4  # split partials the reduce kernel loads per step


def _num_splits(bh: int, n_q: int, block_n: int, num_sms: int) -> tuple[int, int]:
    """Splits of the packed tokens so that about SPLIT_WAVES programs per SM fill the GPU; tokens per split."""
    blocks = _cdiv(n_q, block_n)
    splits = max(1, min(blocks, _cdiv(SPLIT_WAVES * num_sms, bh), MAX_SPLITS))
    per = _cdiv(blocks, splits) * block_n
    return _cdiv(n_q, per), per


_SM_COUNT: dict = {}


def _sms(device) -> int:
    if device.type != "cuda":  # Triton's interpreter (TRITON_INTERPRET=1) runs on CPU tensors
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _mask_args(key_mask):
    if key_mask is None:
        return None, 0, 0, False
    return key_mask, key_mask.stride(0), key_mask.stride(-1), True


def _finish(q, window_k, window_v, m, l_, acc, n_q, key_mask, scaling, v_rotation, v_mean, bd, lengths=None):
    """Launch the reduce kernel. q [B, Hq, D] (original domain), partials from a split kernel."""
    b, hq, d = q.shape
    hkv = window_k.shape[1]
    g = hq // hkv
    gp = _pow2(g, 16)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    mask, s_mb, s_mn, has_mask = _mask_args(key_mask)
    muv = _mean_in(v_mean, None) if v_mean is not None else m
    pv = _f32(v_rotation) if v_rotation is not None else m
    _reduce_kernel[(b * hkv,)](
        m, l_, acc, q, window_k, window_v, pv, muv, mask if has_mask else m, out, m if lengths is None else lengths,
        m.shape[1], window_k.shape[2], n_q, hkv,
        window_k.stride(0), window_k.stride(1), window_k.stride(2),
        window_v.stride(0), window_v.stride(1), window_v.stride(2), s_mb, s_mn,
        scaling * _LOG2E,
        G=g, GP=gp, D=d, BD=bd, SP=_pow2(m.shape[1]), UNROLL=REDUCE_UNROLL,
        HAS_ROT=v_rotation is not None, HAS_MU=v_mean is not None, HAS_MASK=has_mask,
        BLOCK_W=32, F32=q.dtype == torch.float32, DEV_LEN=lengths is not None, num_warps=4,
    )
    return out


_DERIVED: dict = {}  # id(source) -> (weak reference to source, {tag: tensor}); tensors compare elementwise


def _derived(source: torch.Tensor, tag, make):
    """``make()``, a value derived from `source` only (a decode table, the key mean in the rotated domain, the query
    rotation as sign matrix and factor), computed once and kept while `source` lives. The caches replace their tensors rather than write into them (flush, crop,
    reorder and reset all assign new tensors), so a live source never changes value."""
    entry = _DERIVED.get(id(source))
    if entry is None or entry[0]() is not source:
        entry = (weakref.ref(source, lambda _, key=id(source): _DERIVED.pop(key, None)), {})
        _DERIVED[id(source)] = entry
    if tag not in entry[1]:
        entry[1][tag] = make()
    return entry[1][tag]


def byte_table(levels: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """``packing.byte_table`` for `_decode_bytes`, cached while the levels tensor lives."""
    return _derived(levels, ("table", bits, dtype), lambda: packing.byte_table(levels, bits, dtype))


def _mean_in(mean: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """A stored mean [B, H, 1, D] as float32 [B*H, D], rotated (mean @ P^T) when the method rotates; cached."""

    def make():
        m = mean.float().reshape(-1, mean.shape[-1])
        return (m if rotation is None else m @ rotation.float().T).contiguous()

    return _derived(mean, ("mean", None if rotation is None else id(rotation)), make)


@functools.lru_cache(maxsize=None)
def _integer_levels(bits: int, device: torch.device) -> torch.Tensor:
    """0 .. 2^bits - 1: KIVI's codes as levels."""
    return torch.arange(1 << bits, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _sign_levels(device: torch.device) -> torch.Tensor:
    """Bonsai's sign bits as levels: bit 0 -> -1, bit 1 -> +1."""
    return torch.tensor([-1.0, 1.0], device=device)


def _partials(bh: int, splits: int, g: int, bd: int, device):
    """Per-split softmax state of the G query rows of each KV head: m, l [BH, S, G] and acc [BH, S, G, BD], views of
    one float32 allocation (one allocator call per step and layer instead of three)."""
    n = bh * splits * g
    a = -(-n // 4) * 4  # offsets in whole 16-byte units, so every view is aligned like a fresh allocation
    buf = torch.empty(2 * a + n * bd, dtype=torch.float32, device=device)
    return buf[:n].view(bh, splits, g), buf[a:a + n].view(bh, splits, g), buf[2 * a:].view(bh, splits, g, bd)


def _codebook_attention(q, q_rot, q_factor, k_mu, kc, ks, vc, vs, lut, bits, sign1, n_q, window_k, window_v, key_mask,
                        scaling, v_rotation, v_mean, lengths=None):
    tune = DECODE_TUNING["codebook"]
    block_n = tune["block_n"]
    q = q.contiguous()
    b, hq, d = q.shape
    hkv = kc.shape[1]
    g = hq // hkv
    gp = _pow2(g, 16)
    bj = _pow2(d * bits // 8, 16)
    bd = bj * (8 // bits)
    q_rot = q_rot.contiguous()
    splits, per = _num_splits(b * hkv, n_q, block_n, _sms(q.device))
    m, l_, acc = _partials(b * hkv, splits, g, bd, q.device)
    mask, s_mb, s_mn, has_mask = _mask_args(key_mask)
    if q.dtype == torch.float32:
        table = m  # unused: float32 decodes through the float32 LUT
    else:
        table = byte_table(_sign_levels(q.device) if sign1 else lut, bits, q.dtype)
    _codebook_split_kernel[(splits, b * hkv)](
        q_rot, k_mu if k_mu is not None else m, kc, ks, vc, vs, lut if lut is not None else m, table,
        mask if has_mask else m, m, l_, acc, m if lengths is None else lengths,
        n_q, per, splits, hkv,
        kc.stride(0), kc.stride(1), kc.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), vs.stride(0), vs.stride(1), vs.stride(2), s_mb, s_mn,
        scaling * q_factor * _LOG2E,  # q_rot is the rotated query / q_factor
        G=g, GP=gp, D=d, BJ=bj, BITS=bits, NGS=ks.shape[3] if ks.dim() == 4 else 1, SIGN1=sign1,
        HAS_MU=k_mu is not None,
        HAS_MASK=has_mask, BLOCK_N=block_n, F32=q.dtype == torch.float32, ASM=q.is_cuda, DEV_LEN=lengths is not None,
        num_warps=tune["num_warps"], num_stages=tune["num_stages"],
    )
    return _finish(q, window_k, window_v, m, l_, acc, n_q, key_mask, scaling, v_rotation, v_mean, bd, lengths)


def turboquant_decode_attention(
    q, k_codes, k_norms, v_codes, v_norms, num_quantized: int, levels, bits: int, k_rotation, v_rotation,
    k_mean, v_mean, window_k, window_v, key_mask, scaling: float, lengths=None,
):
    q_rot, factor = _rotate_query(q, k_rotation)
    k_mu = _mean_in(k_mean, k_rotation) if k_mean is not None else None  # q . mu = (P q) . (P mu)
    return _codebook_attention(
        q, q_rot, factor, k_mu, k_codes, k_norms, v_codes, v_norms, _f32(levels), bits, False,
        num_quantized, window_k, window_v, key_mask, scaling, v_rotation, v_mean, lengths,
    )


def _f32(t: torch.Tensor) -> torch.Tensor:
    """`t` as contiguous float32 (itself when it already is: the derived-tensor cache keys on the object)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def _query_rotation(rotation: torch.Tensor, dtype: torch.dtype):
    """(M^T, factor) with P = factor * M for the query's rotation, cached per rotation and dtype.

    A randomized Hadamard rotation has entries +-1/sqrt(d): M is its sign matrix, exact in any dtype, so the query is
    rotated by one matmul in its own dtype (float32 accumulation, one rounding, as before) and the factor goes into
    the split kernel's score scale. Any other rotation is used as it is, in float32 (factor 1)."""

    def make():
        r = rotation.float()
        c = r.abs().amax()
        if bool(torch.equal(r.abs(), c.expand_as(r))):
            return torch.sign(r).T.to(dtype).contiguous(), float(c)
        return r.T.contiguous(), 1.0

    return _derived(rotation, ("query", dtype), make)


def _rotate_query(q: torch.Tensor, rotation: torch.Tensor):
    """q [B, Hq, D] -> (q @ M^T [B, Hq, D] in q's dtype, factor): the rotated query is factor * (q @ M^T)."""
    mt, factor = _query_rotation(rotation, q.dtype)
    b, hq, d = q.shape
    q2 = q.reshape(b * hq, d)
    if mt.dtype == q.dtype:
        return torch.mm(q2, mt).view(b, hq, d), factor
    return torch.mm(q2.float(), mt).to(q.dtype).view(b, hq, d), factor


def bonsai_decode_attention(
    q, k_signs, k_scale, v_signs, v_scale, num_quantized: int, group_size: int, k_rotation, v_rotation,
    k_mean, v_mean, window_k, window_v, key_mask, scaling: float, lengths=None,
):
    k_mu = _mean_in(k_mean, k_rotation) if k_mean is not None else None
    q_rot, factor = (q, 1.0) if k_rotation is None else _rotate_query(q, k_rotation)
    return _codebook_attention(
        q, q_rot, factor, k_mu, k_signs, k_scale, v_signs, v_scale, None, 1, True,
        num_quantized, window_k, window_v, key_mask, scaling, v_rotation, v_mean, lengths,
    )


def kivi_decode_attention(
    q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, num_quantized: int, bits: int, group_size: int,
    window_k, window_v, key_mask, scaling: float, lengths=None,
):
    b, hq, d = q.shape
    hkv = k_codes.shape[1]
    g = hq // hkv
    gp = _pow2(g, 16)
    tune = DECODE_TUNING["kivi"]
    ngb = max(1, tune["block_n"] // group_size)
    block_n = ngb * group_size
    q = q.contiguous()
    splits, per = _num_splits(b * hkv, num_quantized, block_n, _sms(q.device))
    m, l_, acc = _partials(b * hkv, splits, g, d, q.device)
    mask, s_mb, s_mn, has_mask = _mask_args(key_mask)
    table = m if q.dtype == torch.float32 else byte_table(_integer_levels(bits, q.device), bits, q.dtype)
    _kivi_split_kernel[(splits, b * hkv)](
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, table, mask if has_mask else m, m, l_, acc,
        m if lengths is None else lengths, num_quantized, per, splits, hkv,
        k_codes.stride(0), k_codes.stride(1), k_codes.stride(2), k_scale.stride(0), k_scale.stride(1),
        k_scale.stride(2), v_codes.stride(0), v_codes.stride(1), v_codes.stride(2),
        v_scale.stride(0), v_scale.stride(1), v_scale.stride(2), s_mb, s_mn,
        scaling * _LOG2E,
        G=g, GP=gp, D=d, BITS=bits, GS=group_size, NGB=ngb, HAS_MASK=has_mask, F32=q.dtype == torch.float32,
        ASM=q.is_cuda, DEV_LEN=lengths is not None, num_warps=tune["num_warps"], num_stages=tune["num_stages"],
    )
    return _finish(q, window_k, window_v, m, l_, acc, num_quantized, key_mask, scaling, None, None, d, lengths)
