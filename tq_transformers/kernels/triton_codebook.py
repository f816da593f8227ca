"""Triton tile decoders of the codebook format (``formats.CodebookPacked``: TurboQuant, Bonsai).

A key decoder turns a tile of packed keys into the scores of the G query rows; a value decoder turns a tile of packed
values and the tile's probabilities into the accumulator update. The split kernel (``triton_split``) composes any key
decoder with any value decoder (constexpr-selected), so keys and values may use different formats or widths.

Codebook tile: codes ``[N, D*b/8]`` uint8 -> ``levels[code]`` (TurboQuant's Lloyd-Max levels, Bonsai's +-1), times
the per-token scale (applied to the scores / probabilities) or the per-group scale (applied to the tile).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import decode_bytes, lut, unpack_tile


@triton.jit
def codebook_tile(LUT, TABLE, bytes_i32, BITS: tl.constexpr, R: tl.constexpr, J: tl.constexpr, SIGN1: tl.constexpr,
                  F32: tl.constexpr, ASM: tl.constexpr):
    """[R, J] packed codes -> [R, J * 8/BITS] unscaled values: codebook levels, or +-1 for sign bits (SIGN1).

    Sign bits unpack to 2*bit - 1 in registers (faster on an H200 than the byte table, whose gathers load the L1).
    Codebooks: 16-bit models gather the byte table (`decode_bytes`, TABLE in the model dtype); float32 models unpack
    and look up the float32 LUT. Values come in TABLE's dtype (float32 with F32)."""
    if SIGN1:
        out = unpack_tile(bytes_i32, BITS, R, J).to(tl.float32) * 2.0 - 1.0
        if not F32:
            out = out.to(TABLE.dtype.element_ty)
    elif F32:
        out = lut(LUT + unpack_tile(bytes_i32, BITS, R, J), ASM)
    else:
        out = decode_bytes(TABLE, bytes_i32, 8 // BITS, R, J, ASM)
    return out


@triton.jit
def codebook_key_scores(q, KC, KS, n, n_ok, stride_kcn, stride_ksn, LUT, TABLE,
                        D: tl.constexpr, BITS: tl.constexpr, BJ: tl.constexpr, NGS: tl.constexpr,
                        SIGN1: tl.constexpr, F32: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores ``q . k_hat`` [GP, BLOCK_N] (float32) of the packed keys `n` [BLOCK_N] in the rotated domain.

    q [GP, BJ * 8/BITS] (model dtype, or float32 with F32); KC / KS point at this (batch, head)'s codes
    ``[N, D*BITS/8]`` and scales ``[N]`` (NGS = 1) or ``[N, NGS]`` (per-group)."""
    PER: tl.constexpr = 8 // BITS
    BD: tl.constexpr = BJ * PER
    j = tl.arange(0, BJ)
    d = tl.arange(0, BD)
    tile_ok = n_ok[:, None] & (j < D * BITS // 8)[None, :]
    kb = tl.load(KC + n[:, None] * stride_kcn + j[None, :], mask=tile_ok, other=0).to(tl.int32)
    kf = codebook_tile(LUT, TABLE, kb, BITS, BLOCK_N, BJ, SIGN1, F32, ASM)  # [BLOCK_N, BD]
    if NGS > 1:
        ks2 = tl.load(KS + n[:, None] * stride_ksn + d[None, :] // (D // NGS), mask=n_ok[:, None] & (d < D)[None, :],
                      other=0.0)
        kf = kf * ks2.to(kf.dtype)
    if F32:
        s = tl.dot(q, tl.trans(kf), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(kf))
    if NGS == 1:
        ks = tl.load(KS + n * stride_ksn, mask=n_ok, other=0.0).to(tl.float32)
        s = s * ks[None, :]
    return s


@triton.jit
def codebook_value_update(p, VC, VS, n, n_ok, stride_vcn, stride_vsn, LUT, TABLE,
                          D: tl.constexpr, BITS: tl.constexpr, BJ: tl.constexpr, NGS: tl.constexpr,
                          SIGN1: tl.constexpr, F32: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr):
    """``p @ v_hat`` [GP, BJ * 8/BITS] (float32, rotated domain) of the packed values `n`, p [GP, BLOCK_N] float32."""
    PER: tl.constexpr = 8 // BITS
    BD: tl.constexpr = BJ * PER
    j = tl.arange(0, BJ)
    d = tl.arange(0, BD)
    tile_ok = n_ok[:, None] & (j < D * BITS // 8)[None, :]
    vb = tl.load(VC + n[:, None] * stride_vcn + j[None, :], mask=tile_ok, other=0).to(tl.int32)
    vf = codebook_tile(LUT, TABLE, vb, BITS, BLOCK_N, BJ, SIGN1, F32, ASM)
    if NGS > 1:
        vs2 = tl.load(VS + n[:, None] * stride_vsn + d[None, :] // (D // NGS), mask=n_ok[:, None] & (d < D)[None, :],
                      other=0.0)
        vf = vf * vs2.to(vf.dtype)
    else:
        vs = tl.load(VS + n * stride_vsn, mask=n_ok, other=0.0).to(tl.float32)
        p = p * vs[None, :]
    if F32:
        return tl.dot(p, vf, input_precision="ieee")
    return tl.dot(p.to(vf.dtype), vf)
