"""The Triton split-K decode kernel: any key tile decoder with any value tile decoder, and its launcher.

One program per (split of the packed tokens, KV head of one batch row): it loads the G query heads of that KV head
once ([GP, BDK], GP = G padded to 16 rows for the tensor cores), streams its share of the codes and metadata, decodes
tiles in registers and keeps an online softmax (base 2), then writes its partials (``triton_common.partials``).

Key decoders (KEY_AFFINE): codebook (``triton_codebook.codebook_key_scores``) or per-channel affine
(``triton_affine.affine_key_scores``); value decoders (VAL_AFFINE): codebook or per-token affine. Each side has its
own bits, scale grouping and tables. Centering: scores of packed keys get ``q . mu_k`` (computed once a program).

Each side has its own head dim (DK, DV: 192 / 128 in DeepSeek-V3-style attention) and tile width (BDK, BDV: powers of
two at least the head dims, ``side_width``; masked loads leave the padding at 0).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import packing
from ..formats import ChannelAffinePacked, CodebookPacked, SplitCodebookPacked, format_parts
from .triton_affine import affine_key_scores, affine_value_update
from .triton_codebook import codebook_key_scores, codebook_value_update
from .triton_common import derived, num_splits, partials, pow2, sm_count, softmax_step, store_partials

# Launch settings of the split kernel: packed tokens per loop iteration, warps, software-pipelining depth. The best
# of a sweep on an H200 (scripts/tune_decode_kernels.py, docs/RESULTS.md "Speed (GPU), second pass"), keyed by the
# key format; an affine-key block is a whole number of key groups.
SPLIT_TUNING = {
    "codebook": {"block_n": 128, "num_warps": 4, "num_stages": 3},
    "affine": {"block_n": 128, "num_warps": 4, "num_stages": 2},
    # tiles wider than 128 coordinates (head_dim 256): not swept; half the tokens and 2 stages, so the pipelined
    # tiles fit the 227 KiB of shared memory (the 128-token, 3-stage setting asked 273 KiB, H200, 2026-12-01)
    "wide": {"block_n": 64, "num_warps": 4, "num_stages": 2},
}
WIDE = 128  # tile width above which the "wide" setting applies
MMA_ROWS = 16  # query rows of a program, padded to the smallest tensor-core tile

# Scalars that change from step to step are not specialized (Triton would compile a new variant when one becomes 1
# or a multiple of 16 in the middle of a generation). Strides stay specialized: they decide the vector width of loads.
_PER_STEP = ["n_q", "tokens_per_split", "num_splits", "stride_mb"]


@triton.jit(do_not_specialize=_PER_STEP)
def split_kernel(
    Q, MU, KC, KC2, KS, KZ, VC, VC2, VS, VZ, LUT_K, TABLE_K, LUT_V, TABLE_V, MASK, LENS, M_OUT, L_OUT, ACC_OUT,
    n_q, tokens_per_split, num_splits, num_heads,
    stride_kcb, stride_kch, stride_kcn, stride_kc2b, stride_kc2h, stride_kc2n, stride_ksb, stride_ksh, stride_ksn,
    stride_vcb, stride_vch, stride_vcn, stride_vc2b, stride_vc2h, stride_vc2n, stride_vsb, stride_vsh, stride_vsn,
    stride_mb, stride_mn,
    sm_scale_log2,
    G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
    KEY_AFFINE: tl.constexpr, KEY_BITS: tl.constexpr, KEY_NGS: tl.constexpr, KEY_SIGN1: tl.constexpr,
    KEY_GS: tl.constexpr, KEY_D1: tl.constexpr, KEY_BITS2: tl.constexpr, KEY_BYTEWISE: tl.constexpr,
    VAL_AFFINE: tl.constexpr, VAL_BITS: tl.constexpr, VAL_NGS: tl.constexpr, VAL_SIGN1: tl.constexpr,
    VAL_GS: tl.constexpr, VAL_D1: tl.constexpr, VAL_BITS2: tl.constexpr, VAL_BYTEWISE: tl.constexpr,
    HAS_MU: tl.constexpr, HAS_MASK: tl.constexpr, DEV_LEN: tl.constexpr, BLOCK_N: tl.constexpr, F32: tl.constexpr,
    ASM: tl.constexpr,
):
    """Q [B*Hkv, G, DK] (in the keys' domain), MU [B*Hkv, BDK] float32 (the key mean in that domain); stride_kcn is
    the stride of the key codes' token axis (of their group axis for affine keys); the scales' likewise. Partials
    M/L [B*Hkv, S, G], ACC [B*Hkv, S, G, BDV]. DK / DV: the key / value head dims (they may differ: 192 / 128 in
    DeepSeek-V3-style attention); BDK / BDV: the tile widths, powers of two at least DK / DV (padding masked).
    KC2 / VC2: the second part's codes of a split codebook side (its first KEY_D1 / VAL_D1 coordinates are in KC /
    VC; D1 = DK / DV for one part). With DEV_LEN the packed tokens attended are LENS[0], read on the device (`n_q` is
    then only the bound the splits were sized for)."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    g = tl.arange(0, GP)
    dk = tl.arange(0, BDK)
    q = tl.load(Q + (pid_bh * G + g[:, None]) * DK + dk[None, :], mask=(g[:, None] < G) & (dk < DK)[None, :],
                other=0.0)
    if HAS_MU:
        mu = tl.load(MU + pid_bh * BDK + dk)
        qmu = tl.sum(q.to(tl.float32) * mu[None, :], axis=1)
    else:
        qmu = tl.zeros((GP,), dtype=tl.float32)
    if F32:
        q = q.to(tl.float32)
    if DEV_LEN:
        n_q = tl.load(LENS).to(tl.int32)
    start = pid_s * tokens_per_split
    end = tl.minimum(start + tokens_per_split, n_q)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), dtype=tl.float32)
    acc = tl.zeros((GP, BDV), dtype=tl.float32)
    kc = KC + b * stride_kcb + h * stride_kch
    ks = KS + b * stride_ksb + h * stride_ksh
    vc = VC + b * stride_vcb + h * stride_vch
    vs = VS + b * stride_vsb + h * stride_vsh
    kc2 = KC2 + b * stride_kc2b + h * stride_kc2h
    vc2 = VC2 + b * stride_vc2b + h * stride_vc2h
    nn = tl.arange(0, BLOCK_N)
    for it in range(0, end - start, BLOCK_N):  # the tail is masked by `end`; none past the packed tokens
        n0 = start + it
        n = n0 + nn
        n_ok = n < end
        if KEY_AFFINE:
            s = affine_key_scores(q, kc, ks, KZ + b * stride_ksb + h * stride_ksh, n0, end, stride_kcn, stride_ksn,
                                  TABLE_K, DK, BDK, KEY_BITS, KEY_GS, F32, ASM, BLOCK_N)
        else:
            s = codebook_key_scores(q, kc, kc2, ks, n, n_ok, stride_kcn, stride_kc2n, stride_ksn, LUT_K, TABLE_K, DK,
                                    KEY_D1, KEY_BITS, KEY_BITS2, BDK, KEY_NGS, KEY_BYTEWISE, KEY_SIGN1, F32, ASM,
                                    BLOCK_N)
        s = (s + qmu[:, None]) * sm_scale_log2
        p, alpha, l_i, m_new = softmax_step(s, n_ok, MASK, b * stride_mb, n, stride_mn, HAS_MASK, m_i, l_i)
        if VAL_AFFINE:
            upd = affine_value_update(p, vc, vs, VZ + b * stride_vsb + h * stride_vsh, n, n_ok, stride_vcn,
                                      stride_vsn, TABLE_V, DV, BDV, VAL_BITS, VAL_GS, F32, ASM, BLOCK_N,
                                      Q.dtype.element_ty)
        else:
            upd = codebook_value_update(p, vc, vc2, vs, n, n_ok, stride_vcn, stride_vc2n, stride_vsn, LUT_V, TABLE_V,
                                        DV, VAL_D1, VAL_BITS, VAL_BITS2, BDV, VAL_NGS, VAL_BYTEWISE, VAL_SIGN1, F32,
                                        ASM, BLOCK_N, Q.dtype.element_ty)
        acc = acc * alpha[:, None] + upd
        m_i = m_new
    store_partials(M_OUT, L_OUT, ACC_OUT, pid_bh * num_splits + pid_s, m_i, l_i, acc, G, GP, BDV)


# ----------------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------------
BYTEWISE_BITS = (1, 2, 4)  # codebook widths decoded a byte at a time; others (and splits) a coordinate at a time


def bytewise(view) -> bool:
    """Whether a codebook side is decoded a byte at a time (``triton_codebook``: one part of 1, 2 or 4 bits)."""
    return isinstance(view, CodebookPacked) and view.bits in BYTEWISE_BITS


def codebook_width(head_dim: int, bits: int) -> int:
    """Tile width of a byte-decoded codebook side: whole bytes of codes padded to 16 (a power of two), in
    coordinates."""
    return pow2(head_dim * bits // 8, 16) * (8 // bits)


def side_width(view, head_dim: int) -> int:
    """Tile width (coordinates) of one side: a power of two at least head_dim and 16 (head_dim 192 -> 256; the
    kernels mask the padding)."""
    if bytewise(view):
        return codebook_width(head_dim, view.bits)
    return pow2(head_dim, 16)


def f32(t: torch.Tensor) -> torch.Tensor:
    """`t` as contiguous float32 (itself when it already is: the derived-tensor cache keys on the object)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def _is_sign(levels: torch.Tensor) -> bool:
    return levels.numel() == 2 and derived(levels, "is_sign", lambda: bool(torch.equal(
        levels.float().cpu(), torch.tensor([-1.0, 1.0]))))


def _tables(view, dtype):
    """(LUT float32, byte TABLE in `dtype`) of one side; None where the kernel reads neither. A side decoded a
    coordinate at a time reads only the LUT: a split's levels one part after the other."""
    if isinstance(view, SplitCodebookPacked):
        first, second = (f32(part.levels) for part in view.parts)
        return derived(first, ("split_lut", id(second)), lambda: torch.cat([first, second])), None
    if isinstance(view, CodebookPacked):
        levels = f32(view.levels)
        if dtype == torch.float32 or not bytewise(view):
            return levels, None
        return levels, derived(levels, ("table", view.bits, dtype), lambda: packing.byte_table(levels, view.bits,
                                                                                                dtype))
    if dtype == torch.float32:
        return None, None
    ints = integer_levels(view.bits, view.codes.device)
    return None, derived(ints, ("table", view.bits, dtype), lambda: packing.byte_table(ints, view.bits, dtype))


@functools.cache
def integer_levels(bits: int, device: torch.device) -> torch.Tensor:
    """0 .. 2^bits - 1: affine codes as levels (kept alive here, so their byte tables stay cached)."""
    return torch.arange(1 << bits, dtype=torch.float32, device=device)


def query_rotation(rotation: torch.Tensor, dtype: torch.dtype):
    """(M^T, factor) with P = factor * M, cached per rotation and dtype. A randomized Hadamard rotation has entries
    +-1/sqrt(d): M is its sign matrix, exact in any dtype, so the query is rotated by one matmul in its own dtype and
    the factor goes into the score scale. Any other rotation is used as it is, in float32 (factor 1)."""

    def make():
        r = rotation.float()
        c = r.abs().amax()
        if bool(torch.equal(r.abs(), c.expand_as(r))):
            return torch.sign(r).T.to(dtype).contiguous(), float(c)
        return r.T.contiguous(), 1.0

    return derived(rotation, ("query", dtype), make)


def rotate_query(q: torch.Tensor, rotation: torch.Tensor | None):
    """q [B, Hq, Dk] -> (q' [B, Hq, Dk] in q's dtype, factor): the query in the keys' rotated domain is factor * q'
    (`rotation` the keys' [Dk, Dk], or None)."""
    if rotation is None:
        return q.contiguous(), 1.0
    mt, factor = query_rotation(rotation, q.dtype)
    b, hq, d = q.shape
    q2 = q.reshape(b * hq, d)
    if mt.dtype == q.dtype:
        return torch.mm(q2, mt).view(b, hq, d), factor
    return torch.mm(q2.float(), mt).to(q.dtype).view(b, hq, d), factor


def key_mean(keys, width: int):
    """The key mean in the keys' domain (mean @ P^T), float32 [B*H, width] zero-padded; None when not centered."""
    if not isinstance(keys, (CodebookPacked, SplitCodebookPacked)) or keys.mean is None:
        return None
    mean, rot = keys.mean, keys.rotation

    def make():
        m = mean.float().reshape(-1, mean.shape[-1])
        m = m if rot is None else m @ rot.float().T
        return torch.nn.functional.pad(m, (0, width - m.shape[-1])).contiguous()

    return derived(mean, ("mean", None if rot is None else id(rot), width), make, mutable=True)


def keep_constants(view, dtype: torch.dtype, keys: bool) -> None:
    """Compute and keep what the decode kernels derive from one side's constant tensors (its codebook's tables and
    sign test, the query or value rotation), so that a step inside ``fresh_derived()`` (a graph) finds them."""
    _tables(view, dtype)
    if isinstance(view, (CodebookPacked, SplitCodebookPacked)):
        if view.bits == 1:
            _is_sign(view.levels)
        if view.rotation is not None:
            if keys:
                query_rotation(view.rotation, dtype)
            else:
                from .triton_reduce import value_rotation

                value_rotation(view.rotation)


def _side_args(view, prefix: str) -> dict:
    """Pointer, stride and constexpr arguments of one side of the split kernel."""
    first = format_parts(view)
    codes, scale, second = first[0].codes, first[0].scale, first[-1].codes
    low = prefix.lower()
    out = {f"{prefix}C": codes, f"{prefix}C2": second, f"{prefix}S": scale, f"{prefix}Z": getattr(view, "zero", None),
           f"stride_{low}cb": codes.stride(0), f"stride_{low}ch": codes.stride(1), f"stride_{low}cn": codes.stride(2),
           f"stride_{low}c2b": second.stride(0), f"stride_{low}c2h": second.stride(1),
           f"stride_{low}c2n": second.stride(2), f"stride_{low}sb": scale.stride(0),
           f"stride_{low}sh": scale.stride(1), f"stride_{low}sn": scale.stride(2)}
    side = "KEY" if prefix == "K" else "VAL"
    codebook = isinstance(view, (CodebookPacked, SplitCodebookPacked))
    out.update({f"{side}_AFFINE": not codebook, f"{side}_BITS": first[0].bits, f"{side}_BITS2": first[-1].bits,
                f"{side}_D1": first[0].head_dim if codebook else view.head_dim, f"{side}_BYTEWISE": bytewise(view),
                f"{side}_NGS": (scale.shape[3] if scale.dim() == 4 else 1) if codebook else 1,
                f"{side}_SIGN1": bytewise(view) and view.bits == 1 and _is_sign(view.levels),
                f"{side}_GS": 1 if codebook else view.group_size})
    return out


def split_partials(q, keys, values, key_mask, scale_log2: float, lengths=None, bound: int | None = None):
    """Launch the split kernel.

    Args:
        q: ``[B, Hq, Dk]`` already in the keys' domain (model dtype, contiguous).
        keys, values: packed views of head_dim Dk / Dv (``kernels.decode_supported``).
        key_mask: ``[B, >= n + W]`` bool or None; scale_log2: the score scale times log2(e).
        lengths: None or the device counts (``kernels.decode_attention``); bound: the packed tokens the splits are
            sized for (default: keys.num_tokens).
    Returns:
        (m, l ``[B*Hkv, S, G]``, acc ``[B*Hkv, S, G, BDV]``) float32 partials, BDV = ``side_width(values, Dv)``.
    """
    b, hq, dk = q.shape
    dv = values.head_dim
    hkv = format_parts(keys)[0].codes.shape[1]
    g = hq // hkv
    bdk, bdv = side_width(keys, dk), side_width(values, dv)
    key_affine = isinstance(keys, ChannelAffinePacked)
    tune = SPLIT_TUNING["wide" if max(bdk, bdv) > WIDE else "affine" if key_affine else "codebook"]
    block_n = max(1, tune["block_n"] // keys.group_size) * keys.group_size if key_affine else tune["block_n"]
    n_q = keys.num_tokens if bound is None else bound
    splits, per = num_splits(b * hkv, n_q, block_n, sm_count(q.device))
    m, l_, acc = partials(b * hkv, splits, g, bdv, q.device)
    f32_model = q.dtype == torch.float32
    lut_k, table_k = _tables(keys, q.dtype)
    lut_v, table_v = _tables(values, q.dtype)
    mu = key_mean(keys, bdk)
    split_kernel[(splits, b * hkv)](
        Q=q, MU=mu, LUT_K=lut_k, TABLE_K=table_k, LUT_V=lut_v, TABLE_V=table_v, MASK=key_mask, LENS=lengths,
        M_OUT=m, L_OUT=l_, ACC_OUT=acc, n_q=n_q, tokens_per_split=per, num_splits=splits, num_heads=hkv,
        stride_mb=0 if key_mask is None else key_mask.stride(0),
        stride_mn=0 if key_mask is None else key_mask.stride(1),
        sm_scale_log2=scale_log2, G=g, GP=pow2(g, MMA_ROWS), DK=dk, DV=dv, BDK=bdk, BDV=bdv,
        **_side_args(keys, "K"), **_side_args(values, "V"),
        HAS_MU=mu is not None, HAS_MASK=key_mask is not None, DEV_LEN=lengths is not None, BLOCK_N=block_n,
        F32=f32_model, ASM=q.is_cuda, num_warps=tune["num_warps"], num_stages=tune["num_stages"],
    )
    return m, l_, acc
