"""Triton tile decoders of the affine formats (KIVI): ``formats.ChannelAffinePacked`` keys and
``formats.TokenAffinePacked`` values. Same contract as ``triton_codebook``'s decoders.

Keys, per channel over GS consecutive tokens: codes ``[N/GS, GS, D*b/8]`` (a row a token), scale / zero ``[N/GS, D]``;
values, per token over GS consecutive channels: codes ``[N, D*b/8]``, scale / zero ``[N, D/GS]``;
x_hat = zero + code * scale. Codes decode through the byte table of the integers 0 .. 2^b - 1 (exact in 16 bits).
Tiles are BD = D padded to a power of two coordinates wide (masked loads: the padding decodes to 0), so head dims
such as 192 (DeepSeek-V3's keys) are read as they are stored.
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
                      D: tl.constexpr, BD: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, F32: tl.constexpr,
                      ASM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores [GP, BLOCK_N] of the BLOCK_N / GS key groups from token n0 (a multiple of GS); groups at or past `end`
    read nothing. q [GP, BD] (zero past D); KC / KS / KZ point at this (batch, head)'s codes, scales and zeros. BD is
    D padded to a power of two (D = 192 -> 256): the padded coordinates decode to 0."""
    NGB: tl.constexpr = BLOCK_N // GS
    RB: tl.constexpr = D * BITS // 8  # bytes of one token's row of codes
    RBP: tl.constexpr = BD * BITS // 8  # the row padded
    d = tl.arange(0, BD)
    d_ok = d < D
    grp = n0 // GS + tl.arange(0, NGB)
    g_ok = grp * GS < end
    j = tl.arange(0, RBP)
    kptr = KC + grp[:, None, None] * stride_kcg + tl.arange(0, GS)[None, :, None] * RB + j[None, None, :]
    if BD == D:  # unpadded: the masks of the power-of-two dims stay as they were (vectorized loads)
        kb = tl.load(kptr, mask=g_ok[:, None, None], other=0).to(tl.int32)  # [NGB, GS, RB]
        meta_ok = g_ok[:, None]
    else:
        kb = tl.load(kptr, mask=g_ok[:, None, None] & (j < RB)[None, None, :], other=0).to(tl.int32)
        meta_ok = g_ok[:, None] & d_ok[None, :]
    kcode = tl.reshape(integer_tile(TABLE, tl.reshape(kb, (BLOCK_N, RBP)), BITS, BLOCK_N, RBP, F32, ASM),
                       (NGB, GS, BD))
    ksc = tl.load(KS + grp[:, None] * stride_ksg + d[None, :], mask=meta_ok, other=0.0).to(tl.float32)
    kzr = tl.load(KZ + grp[:, None] * stride_ksg + d[None, :], mask=meta_ok, other=0.0).to(tl.float32)
    kt = tl.trans(tl.reshape(kcode.to(tl.float32) * ksc[:, None, :] + kzr[:, None, :], (BLOCK_N, BD)))  # K^T
    if F32:
        return tl.dot(q, kt, input_precision="ieee")
    return tl.dot(q, kt.to(q.dtype))


@triton.jit
def affine_value_update(p, VC, VS, VZ, n, n_ok, stride_vcn, stride_vsn, TABLE,
                        D: tl.constexpr, BD: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, F32: tl.constexpr,
                        ASM: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr):
    """``p @ v_hat`` [GP, BD] (float32, 0 past D) of the packed values `n`; p [GP, BLOCK_N] float32; DTYPE the dot's
    operands. BD is D padded to a power of two, a whole number of the GS-channel groups (GS a power of two)."""
    NG: tl.constexpr = D // GS
    NGP: tl.constexpr = BD // GS  # groups of the padded tile
    RB: tl.constexpr = D * BITS // 8
    jv = tl.arange(0, BD * BITS // 8)
    vg = tl.arange(0, NGP)
    if BD == D:  # unpadded: the masks of the power-of-two dims stay as they were (vectorized loads)
        vb = tl.load(VC + n[:, None] * stride_vcn + jv[None, :], mask=n_ok[:, None], other=0).to(tl.int32)
        meta_ok = n_ok[:, None]
    else:
        vb = tl.load(VC + n[:, None] * stride_vcn + jv[None, :], mask=n_ok[:, None] & (jv < RB)[None, :],
                     other=0).to(tl.int32)
        meta_ok = n_ok[:, None] & (vg < NG)[None, :]
    vcode = tl.reshape(integer_tile(TABLE, vb, BITS, BLOCK_N, BD * BITS // 8, F32, ASM), (BLOCK_N, NGP, GS))
    vsc = tl.load(VS + n[:, None] * stride_vsn + vg[None, :], mask=meta_ok, other=0.0).to(tl.float32)
    vzr = tl.load(VZ + n[:, None] * stride_vsn + vg[None, :], mask=meta_ok, other=0.0).to(tl.float32)
    v = tl.reshape(vcode.to(tl.float32) * vsc[:, :, None] + vzr[:, :, None], (BLOCK_N, BD))
    if F32:
        return tl.dot(p, v, input_precision="ieee")
    return tl.dot(p.to(DTYPE), v.to(DTYPE))
