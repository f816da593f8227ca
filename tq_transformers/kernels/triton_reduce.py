"""The Triton reduce kernel: merge the split partials, finish the packed part, attend to the window.

One program per query head: the splits' maximum, then CHUNK partials per step; the value
accumulator is rotated back once (``y @ P_v``) when the values are rotated; the value mean is added weighted by the
packed part's probability mass (``l``); the full-precision window is attended with the same online softmax; the
output ``[B, Hq, Dv]`` is written in q's dtype. Keys (the query, the key window) have head dim DK, values (the
partials, the value window, the output) DV; tiles are padded to powers of two (BDK, BDV) and masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import derived, pow2

# Launch settings of the reduce kernel: split partials loaded per step, window tokens per tile, warps. One program per
# query head, so a decode step at batch 1 has 32 programs merging up to a few hundred splits each (the first version,
# one program per KV head merging 4 partials a step, dominated a 1 x 32K step on an H200: docs/RESULTS.md "Speed (GPU),
# fifth pass"). The window tile: 128 tokens (4 warps) against 32 saved 3-12% of a 1 x 32K decode call at the default
# windows (H200, `scripts/tune_decode_kernels.py --reduce-sweep`, 2026-12-01, docs/RESULTS.md "seventh pass").
REDUCE_TUNING = {"chunk": 32, "block_w": 128, "num_warps": 4}


@triton.jit(do_not_specialize=["num_splits", "W", "n_q", "stride_mb"])
def reduce_kernel(
    M, L, ACC, Q, WK, WV, PV, MUV, MASK, OUT, LENS,
    num_splits, W, n_q, num_heads,
    stride_wkb, stride_wkh, stride_wkn, stride_wvb, stride_wvh, stride_wvn, stride_mb, stride_mn,
    sm_scale_log2,
    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr,
    HAS_ROT: tl.constexpr,
    HAS_MU: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_W: tl.constexpr, DEV_LEN: tl.constexpr,
):
    """One program per query head. M/L [B*Hkv, S, G], ACC [B*Hkv, S, G, BD], Q [B*Hkv*G, DK] (original domain),
    WK [B, Hkv, W, DK], WV [B, Hkv, W, DV], PV [DV, DV] float32 (the value rotation), MUV [B*Hkv, DV] float32, OUT
    [B*Hkv*G, DV]; BDK, BD: powers of two at least DK, DV. With DEV_LEN, n_q and W are LENS[0], LENS[1]. float32
    throughout (CUDA-core dot products: one query row needs no tensor cores)."""
    pid = tl.program_id(0)
    bh = pid // G
    gq = pid % G
    if DEV_LEN:
        n_q = tl.load(LENS).to(tl.int32)
        W = tl.load(LENS + 1).to(tl.int32)
    b = bh // num_heads
    h = bh % num_heads
    d = tl.arange(0, BD)
    d_ok = d < DV
    dk = tl.arange(0, BDK)
    dk_ok = dk < DK
    sp = tl.arange(0, CHUNK)
    m_i = tl.max(tl.full((CHUNK,), float("-inf"), tl.float32), axis=0)
    for s0 in range(0, num_splits, CHUNK):  # the splits' maximum
        ok = s0 + sp < num_splits
        m_i = tl.maximum(m_i, tl.max(tl.load(M + (bh * num_splits + s0 + sp) * G + gq, mask=ok,
                                             other=float("-inf")), axis=0))
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_i = tl.sum(tl.zeros((CHUNK,), tl.float32), axis=0)
    acc = tl.zeros((BD,), dtype=tl.float32)
    for s0 in range(0, num_splits, CHUNK):  # CHUNK partials [CHUNK, BD] a step, weighted by exp2(m_s - m)
        ok = s0 + sp < num_splits
        row = (bh * num_splits + s0 + sp) * G + gq
        wu = tl.exp2(tl.load(M + row, mask=ok, other=float("-inf")) - m_safe)
        l_i += tl.sum(tl.load(L + row, mask=ok, other=0.0) * wu, axis=0)
        accs = tl.load(ACC + row[:, None] * BD + d[None, :], mask=ok[:, None], other=0.0)
        acc += tl.sum(accs * wu[:, None], axis=0)
    if HAS_ROT:  # back from the value rotation: x = y @ P
        pv = tl.load(PV + d[:, None] * DV + d[None, :], mask=d_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.sum(acc[:, None] * pv, axis=0)
    if HAS_MU:  # each packed value is v_hat + mu_v: add mu_v times the packed share of the probability
        acc = acc + l_i * tl.load(MUV + bh * DV + d, mask=d_ok, other=0.0)
    q = tl.load(Q + pid * DK + dk, mask=dk_ok, other=0.0).to(tl.float32)
    ww = tl.arange(0, BLOCK_W)
    for w0 in range(0, W, BLOCK_W):
        w = w0 + ww
        w_ok = w < W
        k = tl.load(WK + b * stride_wkb + h * stride_wkh + w[:, None] * stride_wkn + dk[None, :],
                    mask=w_ok[:, None] & dk_ok[None, :], other=0.0)
        v = tl.load(WV + b * stride_wvb + h * stride_wvh + w[:, None] * stride_wvn + d[None, :],
                    mask=w_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * sm_scale_log2
        if HAS_MASK:
            w_ok = w_ok & (tl.load(MASK + b * stride_mb + (n_q + w) * stride_mn, mask=w_ok, other=0) != 0)
        s = tl.where(w_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new_safe)
        p = tl.exp2(s - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new
    tl.store(OUT + pid * DV + d, (acc / l_i).to(OUT.dtype.element_ty), mask=d_ok)


def value_mean(values) -> torch.Tensor | None:
    """The stored value mean [B, H, 1, Dv] as float32 [B*H, Dv] (original domain), cached; None when not centered."""
    mean = getattr(values, "mean", None)
    if mean is None:
        return None
    return derived(mean, "mean_flat", lambda: mean.float().reshape(-1, mean.shape[-1]).contiguous(), mutable=True)


def value_rotation(rot: torch.Tensor) -> torch.Tensor:
    """The value rotation P as contiguous float32, cached."""
    return derived(rot, "f32", lambda: rot.float().contiguous())


def reduce_window(q, values, window_k, window_v, m, l_, acc, n_q: int, key_mask, scale_log2: float, lengths=None):
    """Launch the reduce kernel.

    Args:
        q: ``[B, Hq, Dk]`` (original domain, contiguous); values: the packed values (head_dim Dv: their rotation and
            mean); window_k ``[B, Hkv, W, Dk]``, window_v ``[B, Hkv, W, Dv]``; m, l_, acc: the split kernel's
            partials (acc ``[B*Hkv, S, G, BDV]``, BDV >= Dv); n_q: packed tokens (the mask's offset of the window);
            key_mask, scale_log2, lengths: as for the split kernel.
    Returns:
        ``[B, Hq, Dv]`` in q's dtype.
    """
    b, hq, dk = q.shape
    dv = window_v.shape[-1]
    hkv = window_k.shape[1]
    g = hq // hkv
    out = torch.empty(b, hq, dv, dtype=q.dtype, device=q.device)
    rot = getattr(values, "rotation", None)
    pv = None if rot is None else value_rotation(rot)
    muv = value_mean(values)
    reduce_kernel[(b * hq,)](
        M=m, L=l_, ACC=acc, Q=q, WK=window_k, WV=window_v, PV=pv, MUV=muv, MASK=key_mask, OUT=out, LENS=lengths,
        num_splits=m.shape[1], W=window_k.shape[2], n_q=n_q, num_heads=hkv,
        stride_wkb=window_k.stride(0), stride_wkh=window_k.stride(1), stride_wkn=window_k.stride(2),
        stride_wvb=window_v.stride(0), stride_wvh=window_v.stride(1), stride_wvn=window_v.stride(2),
        stride_mb=0 if key_mask is None else key_mask.stride(0),
        stride_mn=0 if key_mask is None else key_mask.stride(1),
        sm_scale_log2=scale_log2, G=g, DK=dk, DV=dv, BDK=pow2(dk), BD=acc.shape[-1], CHUNK=REDUCE_TUNING["chunk"],
        HAS_ROT=pv is not None,
        HAS_MU=muv is not None, HAS_MASK=key_mask is not None, BLOCK_W=REDUCE_TUNING["block_w"],
        DEV_LEN=lengths is not None, num_warps=REDUCE_TUNING["num_warps"],
    )
    return out
