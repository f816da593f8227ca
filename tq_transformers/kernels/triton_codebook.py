"""Triton tile decoders of the codebook format (``formats.CodebookPacked``: TurboQuant, Bonsai).

A key decoder turns a tile of packed keys into the scores of the G query rows; a value decoder turns a tile of packed
values and the tile's probabilities into the accumulator update. The split kernel (``triton_split``) composes any key
decoder with any value decoder (constexpr-selected), so keys and values may use different formats or widths.

Codebook tile: codes ``[N, D*b/8]`` uint8 -> ``levels[code]`` (TurboQuant's Lloyd-Max levels, Bonsai's +-1), times
the per-token scale (applied to the scores / probabilities) or the per-group scale (applied to the tile).

Two decoders of the codes: whole codes per byte (b = 1, 2, 4; BYTEWISE) decode a byte at a time (`codebook_tile`);
any other width, and the two-rate channel split of a fractional TurboQuant rate (``formats.SplitCodebookPacked``),
decode a coordinate at a time (`coordinate_tile`): coordinate c of part 1 reads the two bytes that hold bits
[c*b1, c*b1 + b1) of its row, coordinates D1.. of part 2 likewise in their own row, and each looks up one float32
table (part 2's levels after part 1's)::

    b1 = 3, c = 3: bits 9..11 -> bytes 1, 2 of the row: ((byte1 | byte2 << 8) >> 1) & 0b111 -> LUT[code]
    part 2, c = D1 + 5, b2 = 2: bits 10..11 of part 2's row -> LUT[2**b1 + code]
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
def _part_codes(C, n, n_ok, stride_cn, c, in_part, BITS: tl.constexpr, ROW: tl.constexpr):
    """Integer codes [N, BD] of coordinates `c` [BD] of one part (0 where not `in_part`), ROW bytes a row."""
    bit = c * BITS
    byte = bit // 8
    row = C + n[:, None] * stride_cn + byte[None, :]
    ok = n_ok[:, None] & in_part[None, :]
    lo = tl.load(row, mask=ok, other=0).to(tl.int32)
    hi = tl.load(row + 1, mask=ok & (byte + 1 < ROW)[None, :], other=0).to(tl.int32)  # codes across two bytes
    return ((lo | (hi << 8)) >> (bit % 8)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def coordinate_tile(C, C2, n, n_ok, stride_cn, stride_c2n, LUT, D: tl.constexpr, D1: tl.constexpr,
                    BITS: tl.constexpr, BITS2: tl.constexpr, BD: tl.constexpr, ASM: tl.constexpr):
    """[N, BD] float32 levels of codes of any width 1..8, coordinate by coordinate (module docstring): coordinates
    0..D1-1 from C (BITS a code), D1..D-1 from C2 (BITS2; LUT holds its levels after C's 2**BITS), 0 past D."""
    c = tl.arange(0, BD)
    in1 = c < D1
    code = _part_codes(C, n, n_ok, stride_cn, c, in1, BITS, D1 * BITS // 8)
    if D1 < D:
        in2 = (c >= D1) & (c < D)
        code2 = _part_codes(C2, n, n_ok, stride_c2n, tl.where(in2, c - D1, 0), in2, BITS2, (D - D1) * BITS2 // 8)
        code = tl.where(in1, code, code2 + (1 << BITS))
    return tl.where((c < D)[None, :], lut(LUT + code, ASM), 0.0)


@triton.jit
def _decode(C, C2, n, n_ok, stride_cn, stride_c2n, LUT, TABLE, D: tl.constexpr, D1: tl.constexpr,
            BITS: tl.constexpr, BITS2: tl.constexpr, BD: tl.constexpr, BYTEWISE: tl.constexpr,
            SIGN1: tl.constexpr, F32: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr, dtype):
    """The unscaled tile [BLOCK_N, BD] of the packed tokens `n`: in TABLE's dtype (BYTEWISE), else in `dtype`."""
    if BYTEWISE:
        BJ: tl.constexpr = BD * BITS // 8
        j = tl.arange(0, BJ)
        tile_ok = n_ok[:, None] & (j < D * BITS // 8)[None, :]
        cb = tl.load(C + n[:, None] * stride_cn + j[None, :], mask=tile_ok, other=0).to(tl.int32)
        return codebook_tile(LUT, TABLE, cb, BITS, BLOCK_N, BJ, SIGN1, F32, ASM)
    out = coordinate_tile(C, C2, n, n_ok, stride_cn, stride_c2n, LUT, D, D1, BITS, BITS2, BD, ASM)
    return out if F32 else out.to(dtype)


@triton.jit
def codebook_key_scores(q, KC, KC2, KS, n, n_ok, stride_kcn, stride_kc2n, stride_ksn, LUT, TABLE,
                        D: tl.constexpr, D1: tl.constexpr, BITS: tl.constexpr, BITS2: tl.constexpr,
                        BD: tl.constexpr, NGS: tl.constexpr, BYTEWISE: tl.constexpr,
                        SIGN1: tl.constexpr, F32: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores ``q . k_hat`` [GP, BLOCK_N] (float32) of the packed keys `n` [BLOCK_N] in the rotated domain.

    q [GP, BD] (model dtype, or float32 with F32); KC / KS point at this (batch, head)'s codes
    ``[N, D*BITS/8]`` and scales ``[N]`` (NGS = 1) or ``[N, NGS]`` (per-group); KC2 at the second part's codes
    ``[N, (D - D1)*BITS2/8]`` of a split (D1 < D; unused when D1 = D)."""
    d = tl.arange(0, BD)
    kf = _decode(KC, KC2, n, n_ok, stride_kcn, stride_kc2n, LUT, TABLE, D, D1, BITS, BITS2, BD, BYTEWISE, SIGN1,
                 F32, ASM, BLOCK_N, q.dtype)  # [BLOCK_N, BD]
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
def codebook_value_update(p, VC, VC2, VS, n, n_ok, stride_vcn, stride_vc2n, stride_vsn, LUT, TABLE,
                          D: tl.constexpr, D1: tl.constexpr, BITS: tl.constexpr, BITS2: tl.constexpr,
                          BD: tl.constexpr, NGS: tl.constexpr, BYTEWISE: tl.constexpr,
                          SIGN1: tl.constexpr, F32: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr, dtype):
    """``p @ v_hat`` [GP, BD] (float32, rotated domain) of the packed values `n`, p [GP, BLOCK_N] float32; the
    arguments as for `codebook_key_scores`, `dtype` the model's."""
    d = tl.arange(0, BD)
    vf = _decode(VC, VC2, n, n_ok, stride_vcn, stride_vc2n, LUT, TABLE, D, D1, BITS, BITS2, BD, BYTEWISE, SIGN1,
                 F32, ASM, BLOCK_N, dtype)
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
