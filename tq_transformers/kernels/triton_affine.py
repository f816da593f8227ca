"""Triton tile decoders of the affine formats (KIVI): ``formats.ChannelAffinePacked`` keys and
``formats.TokenAffinePacked`` values. Same contract as ``triton_codebook``'s decoders.

Keys, per channel over GS consecutive tokens: codes ``[N/GS, GS, D*b/8]`` (a row a token), scale / zero ``[N/GS, D]``;
values, per token over GS consecutive channels: codes ``[N, D*b/8]``, scale / zero ``[N, D/GS]``;
x_hat = zero + code * scale. Codes decode through the byte table of the integers 0 .. 2^b - 1 (exact in 16 bits).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import decode_bytes, unpack_tile


@triton.jit
def integer_tile(TABLE, bytes_i32, BITS: tl.constexpr, R: tl.constexpr, J: tl.constexpr, F32: tl.constexpr,
                 ASM: tl.constexpr):
    """[R, J] packed codes -> [R, J * 8/BITS] integer codes (TABLE's 16-bit dtype, or int32 with F32)."""
    if F32:
        out = unpack_tile(bytes_i32, BITS, R, J)
    else:
        out = decode_bytes(TABLE, bytes_i32, 8 // BITS, R, J, ASM)
    return out


@triton.jit
def affine_key_scores(q, KC, KS, KZ, n0, end, stride_kcg, stride_ksg, TABLE,
                      D: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, F32: tl.constexpr, ASM: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Scores [GP, BLOCK_N] of the BLOCK_N / GS key groups from token n0 (a multiple of GS); groups at or past `end`
    read nothing. q [GP, D]; KC / KS / KZ point at this (batch, head)'s codes, scales and zeros."""
    NGB: tl.constexpr = BLOCK_N // GS
    RB: tl.constexpr = D * BITS // 8  # bytes of one token's row of codes
    d = tl.arange(0, D)
    grp = n0 // GS + tl.arange(0, NGB)
    g_ok = grp * GS < end
    kb = tl.load(KC + grp[:, None, None] * stride_kcg + tl.arange(0, GS)[None, :, None] * RB
                 + tl.arange(0, RB)[None, None, :], mask=g_ok[:, None, None], other=0).to(tl.int32)  # [NGB, GS, RB]
    kcode = tl.reshape(integer_tile(TABLE, tl.reshape(kb, (BLOCK_N, RB)), BITS, BLOCK_N, RB, F32, ASM), (NGB, GS, D))
    ksc = tl.load(KS + grp[:, None] * stride_ksg + d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
    kzr = tl.load(KZ + grp[:, None] * stride_ksg + d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
    kt = tl.trans(tl.reshape(kcode.to(tl.float32) * ksc[:, None, :] + kzr[:, None, :], (BLOCK_N, D)))  # K^T
    if F32:
        return tl.dot(q, kt, input_precision="ieee")
    return tl.dot(q, kt.to(q.dtype))


@triton.jit
def affine_value_update(p, VC, VS, VZ, n, n_ok, stride_vcn, stride_vsn, TABLE,
                        D: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, F32: tl.constexpr, ASM: tl.constexpr,
                        BLOCK_N: tl.constexpr, DTYPE: tl.constexpr):
    """``p @ v_hat`` [GP, D] (float32) of the packed values `n`; p [GP, BLOCK_N] float32; DTYPE the dot's operands."""
    NG: tl.constexpr = D // GS
    jv = tl.arange(0, D * BITS // 8)
    vg = tl.arange(0, NG)
    vb = tl.load(VC + n[:, None] * stride_vcn + jv[None, :], mask=n_ok[:, None], other=0).to(tl.int32)
    vcode = tl.reshape(integer_tile(TABLE, vb, BITS, BLOCK_N, D * BITS // 8, F32, ASM), (BLOCK_N, NG, GS))
    vsc = tl.load(VS + n[:, None] * stride_vsn + vg[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
    vzr = tl.load(VZ + n[:, None] * stride_vsn + vg[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
    v = tl.reshape(vcode.to(tl.float32) * vsc[:, :, None] + vzr[:, :, None], (BLOCK_N, D))
    if F32:
        return tl.dot(p, v, input_precision="ieee")
    return tl.dot(p.to(DTYPE), v.to(DTYPE))
