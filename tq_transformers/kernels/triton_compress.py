"""Triton compress-on-write kernels: TurboQuant, Bonsai, KIVI keys and KIVI values.

Each wrapper has the signature and the exact codes of its PyTorch reference, the method's encoder
(``methods.turboquant.turboquant_encode``, ``methods.bonsai.bonsai_encode``, ``methods.kivi.kivi_encode_keys`` /
``kivi_encode_values``); metadata (norms, scales, zero points) is written in ``METADATA_DTYPE``, equal up to one
rounding of a float32 sum taken in another order.

Imported only through ``tq_transformers.kernels`` (lazily): a CPU install never imports Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .constants import METADATA_DTYPE
from .triton_common import EPS, SCALE_EPS, cdiv, div_scalar, pow2, round_half_even

# Launch settings of the compress kernels: tokens per program and warps. TurboQuant's, from a sweep on an H200
# (2026-12-01, docs/RESULTS.md "seventh pass"): 32K tokens x 8 heads took 2,570 us with the rotation's dot in "ieee"
# float32 (FMA loops) at 32 tokens / 4 warps, the whole of TurboQuant-4's prefill overhead; 513 us with "tf32x3"
# (three TF32 tensor-core passes, float32 accuracy: codes differ from the PyTorch encoder's only within 1e-5 of a
# bucket edge, as "ieee"'s do) at 64 tokens / 4 warps. The others are left as the first pass set them (a [BLOCK_T, D]
# float32 tile in registers at D = 128).
COMPRESS_TUNING = {
    "turboquant": {"block_t": 64, "num_warps": 4, "dot_precision": "tf32x3"},
    "bonsai": {"block_t": 32, "num_warps": 4},
    "kivi_keys": {"num_warps": 4},  # one program per group of GS tokens
    "kivi_values": {"block_t": 16, "num_warps": 4},
}
MIN_TILE = 16  # the smallest tl.dot / tile width


@triton.jit
def turboquant_compress_kernel(
    X, MU, P, LEVELS, EDGES, CODES, NORMS,
    T, num_heads,
    stride_xb, stride_xh, stride_xt, stride_mub, stride_muh, stride_cb, stride_ch, stride_ct, stride_nb, stride_nh,
    D: tl.constexpr, BD: tl.constexpr, BJ: tl.constexpr, BITS: tl.constexpr,
    HAS_MU: tl.constexpr, NORM_CORR: tl.constexpr, BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_T tokens of one head. x -> center -> /||x|| -> rotate -> bucketize -> pack, norms."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BD)
    j = tl.arange(0, BJ)
    t_ok = t < T
    d_ok = d < D
    j_ok = j < D // 8
    x = tl.load(X + b * stride_xb + h * stride_xh + t[:, None] * stride_xt + d[None, :],
                mask=t_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    if HAS_MU:
        mu = tl.load(MU + b * stride_mub + h * stride_muh + d, mask=d_ok, other=0.0).to(tl.float32)
        x = tl.where(d_ok[None, :], x - mu[None, :], 0.0)
    gamma = tl.sqrt_rn(tl.sum(x * x, axis=1))  # [BLOCK_T]
    u = tl.div_rn(x, tl.maximum(gamma, EPS)[:, None])
    word = tl.zeros((BLOCK_T, BJ), dtype=tl.int64)
    csq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for i in tl.static_range(8):
        # PT_i[d, j] = P[8j + i, d]: the rotated coordinates 8j + i, i.e. code i of run j
        pt = tl.load(P + (8 * j[None, :] + i) * D + d[:, None], mask=d_ok[:, None] & j_ok[None, :], other=0.0)
        y = tl.dot(u, pt, input_precision=DOT_PRECISION)  # [BLOCK_T, BJ]
        idx = tl.zeros((BLOCK_T, BJ), dtype=tl.int32)
        for k in tl.static_range((1 << BITS) - 1):
            idx += (y > tl.load(EDGES + k)).to(tl.int32)
        c = tl.load(LEVELS + idx)
        csq += tl.sum(tl.where(j_ok[None, :], c * c, 0.0), axis=1)
        word = word | (idx.to(tl.int64) << (BITS * i))
    if NORM_CORR:
        norms = tl.div_rn(gamma, tl.maximum(tl.sqrt_rn(csq), EPS))
    else:
        norms = gamma
    tl.store(NORMS + b * stride_nb + h * stride_nh + t, norms.to(NORMS.dtype.element_ty), mask=t_ok)
    base = CODES + b * stride_cb + h * stride_ch + t[:, None] * stride_ct + j[None, :] * BITS
    for k in tl.static_range(BITS):
        tl.store(base + k, ((word >> (8 * k)) & 0xFF).to(tl.uint8), mask=t_ok[:, None] & j_ok[None, :])


@triton.jit
def bonsai_compress_kernel(
    X, MU, P, SIGNS, SCALE,
    T, num_heads,
    stride_xb, stride_xh, stride_xt, stride_mub, stride_muh, stride_sb, stride_sh, stride_st,
    stride_gb, stride_gh, stride_gt,
    D: tl.constexpr, BD: tl.constexpr, BJ: tl.constexpr, GS: tl.constexpr,
    HAS_MU: tl.constexpr, ROT: tl.constexpr, L2: tl.constexpr, BLOCK_T: tl.constexpr, RECIP: tl.constexpr,
):
    """One program: BLOCK_T tokens of one head. x -> center -> (rotate) -> sign bits and per-group scales."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BD)
    j = tl.arange(0, BJ)
    t_ok = t < T
    d_ok = d < D
    j_ok = j < D // 8
    xrow = X + b * stride_xb + h * stride_xh + t[:, None] * stride_xt
    if ROT:
        x = tl.load(xrow + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if HAS_MU:
            mu = tl.load(MU + b * stride_mub + h * stride_muh + d, mask=d_ok, other=0.0).to(tl.float32)
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
                muc = tl.load(MU + b * stride_mub + h * stride_muh + col, mask=j_ok, other=0.0).to(tl.float32)
                y = y - muc[None, :]
        word = word | ((y >= 0).to(tl.int32) << i)
        sabs += tl.abs(y)
        ssq += y * y
    tl.store(SIGNS + b * stride_sb + h * stride_sh + t[:, None] * stride_st + j[None, :], word.to(tl.uint8),
             mask=t_ok[:, None] & j_ok[None, :])
    grp = j // (GS // 8)
    for g in tl.static_range(D // GS):
        in_g = (grp == g) & j_ok
        l1 = tl.sum(tl.where(in_g[None, :], sabs, 0.0), axis=1)
        if L2:
            sc = tl.div_rn(tl.sum(tl.where(in_g[None, :], ssq, 0.0), axis=1), tl.maximum(l1, EPS))
        else:
            sc = div_scalar(l1, GS, RECIP)
        tl.store(SCALE + b * stride_gb + h * stride_gh + t * stride_gt + g, sc.to(SCALE.dtype.element_ty), mask=t_ok)


@triton.jit
def minmax_meta(lo, hi, QMAX: tl.constexpr, RECIP: tl.constexpr, META: tl.constexpr):
    """KIVI's zero point and scale (in META, the metadata dtype) from the float32 min and max of a group, as
    ``methods.kivi.minmax_quantize``."""
    zero16 = lo.to(META)
    scale16 = tl.maximum(div_scalar(hi - zero16.to(tl.float32), QMAX, RECIP), SCALE_EPS).to(META)
    return zero16, scale16


@triton.jit
def kivi_key_compress_kernel(
    X, CODES, SCALE, ZERO,
    num_heads,
    stride_xb, stride_xh, stride_xt, stride_cb, stride_ch, stride_cg, stride_sb, stride_sh, stride_sg,
    D: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr, RECIP: tl.constexpr,
):
    """One program: one group of GS tokens x D channels of one head; min-max over the tokens of each channel. Codes
    are written token-major (``[GS, D*b/8]`` a group): channel 8j + i of a token is code i of its run j."""
    pid_g = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    J: tl.constexpr = D // 8  # runs of 8 channels
    QMAX: tl.constexpr = (1 << BITS) - 1
    t = tl.arange(0, GS)
    j = tl.arange(0, J)
    xg = X + b * stride_xb + h * stride_xh + (pid_g * GS) * stride_xt
    meta = b * stride_sb + h * stride_sh + pid_g * stride_sg
    word = tl.zeros((GS, J), dtype=tl.int64)
    for i in tl.static_range(8):
        x = tl.load(xg + t[:, None] * stride_xt + 8 * j[None, :] + i).to(tl.float32)  # channels 8j + i
        fin = (x == x) & (tl.abs(x) < float("inf"))
        lo = tl.min(tl.where(fin, x, float("inf")), axis=0)
        hi = tl.max(tl.where(fin, x, float("-inf")), axis=0)
        none = lo == float("inf")
        lo = tl.where(none, 0.0, lo)
        hi = tl.where(none, 0.0, hi)
        zero16, scale16 = minmax_meta(lo, hi, QMAX, RECIP, SCALE.dtype.element_ty)
        tl.store(SCALE + meta + 8 * j + i, scale16)
        tl.store(ZERO + meta + 8 * j + i, zero16)
        q = round_half_even(tl.div_rn(x - zero16.to(tl.float32)[None, :], scale16.to(tl.float32)[None, :]))
        q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0)
        q = tl.where(fin, q, 0.0).to(tl.int64)
        word = word | (q << (BITS * i))
    base = CODES + b * stride_cb + h * stride_ch + pid_g * stride_cg + t[:, None] * (D * BITS // 8) + j[None, :] * BITS
    for k in tl.static_range(BITS):
        tl.store(base + k, ((word >> (8 * k)) & 0xFF).to(tl.uint8))


@triton.jit
def kivi_value_compress_kernel(
    X, CODES, SCALE, ZERO,
    T, num_heads,
    stride_xb, stride_xh, stride_xt, stride_cb, stride_ch, stride_ct, stride_sb, stride_sh, stride_st,
    D: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr, BLOCK_T: tl.constexpr, RECIP: tl.constexpr,
):
    """One program: BLOCK_T tokens of one head; min-max over each group of GS channels of a token."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    J: tl.constexpr = D // 8
    NG: tl.constexpr = D // GS
    QMAX: tl.constexpr = (1 << BITS) - 1
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, J)
    t_ok = t < T
    grp = j // (GS // 8)  # group of columns 8j + i, for every i
    xrow = X + b * stride_xb + h * stride_xh + t[:, None] * stride_xt
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
        zero16, scale16 = minmax_meta(lo, hi, QMAX, RECIP, SCALE.dtype.element_ty)
        tl.store(SCALE + b * stride_sb + h * stride_sh + t * stride_st + g, scale16, mask=t_ok)
        tl.store(ZERO + b * stride_sb + h * stride_sh + t * stride_st + g, zero16, mask=t_ok)
        zero = tl.where(in_g[None, :], zero16.to(tl.float32)[:, None], zero)
        scale = tl.where(in_g[None, :], scale16.to(tl.float32)[:, None], scale)
    word = tl.zeros((BLOCK_T, J), dtype=tl.int64)
    for i in tl.static_range(8):
        x = tl.load(xrow + 8 * j[None, :] + i, mask=t_ok[:, None], other=0.0).to(tl.float32)
        fin = (x == x) & (tl.abs(x) < float("inf"))
        q = round_half_even(tl.div_rn(x - zero, scale))
        q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0)
        q = tl.where(fin, q, 0.0).to(tl.int64)
        word = word | (q << (BITS * i))
    base = CODES + b * stride_cb + h * stride_ch + t[:, None] * stride_ct + j[None, :] * BITS
    for k in tl.static_range(BITS):
        tl.store(base + k, ((word >> (8 * k)) & 0xFF).to(tl.uint8), mask=t_ok[:, None])




# ----------------------------------------------------------------------------------------------------------------------
# Wrappers (the signatures of the methods' encoders)
# ----------------------------------------------------------------------------------------------------------------------
def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _mean_strides(mean) -> dict:
    return {"stride_mub": 0 if mean is None else mean.stride(0), "stride_muh": 0 if mean is None else mean.stride(1)}


def turboquant_compress(x, mean, rotation, levels, bits: int, norm_correction: bool = True):
    """x ``[B, H, T, D]`` -> (codes uint8 ``[B, H, T, D*bits/8]``, norms ``[B, H, T]`` in METADATA_DTYPE)."""
    b, h, t, d = x.shape
    x = _rows(x)
    codes = torch.empty(b, h, t, d * bits // 8, dtype=torch.uint8, device=x.device)
    norms = torch.empty(b, h, t, dtype=METADATA_DTYPE, device=x.device)
    levels = levels.float().contiguous()
    tune = COMPRESS_TUNING["turboquant"]
    turboquant_compress_kernel[(cdiv(t, tune["block_t"]), b * h)](
        X=x, MU=mean, P=rotation.float().contiguous(), LEVELS=levels, EDGES=((levels[1:] + levels[:-1]) / 2),
        CODES=codes, NORMS=norms, T=t, num_heads=h,
        stride_xb=x.stride(0), stride_xh=x.stride(1), stride_xt=x.stride(2), **_mean_strides(mean),
        stride_cb=codes.stride(0), stride_ch=codes.stride(1), stride_ct=codes.stride(2),
        stride_nb=norms.stride(0), stride_nh=norms.stride(1),
        D=d, BD=pow2(d, MIN_TILE), BJ=pow2(d // 8, MIN_TILE), BITS=bits, HAS_MU=mean is not None,
        NORM_CORR=norm_correction, BLOCK_T=tune["block_t"], num_warps=tune["num_warps"],
        DOT_PRECISION=tune["dot_precision"] if x.is_cuda else "ieee",
    )
    return codes, norms


def bonsai_compress(x, mean, rotation, group_size: int, scale_mode: str = "mean_abs"):
    """x ``[B, H, T, D]`` -> (signs uint8 ``[B, H, T, D/8]``, scale ``[B, H, T, D/G]`` in METADATA_DTYPE)."""
    b, h, t, d = x.shape
    x = _rows(x)
    signs = torch.empty(b, h, t, d // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(b, h, t, d // group_size, dtype=METADATA_DTYPE, device=x.device)
    tune = COMPRESS_TUNING["bonsai"]
    bonsai_compress_kernel[(cdiv(t, tune["block_t"]), b * h)](
        X=x, MU=mean, P=None if rotation is None else rotation.float().contiguous(), SIGNS=signs, SCALE=scale,
        T=t, num_heads=h, stride_xb=x.stride(0), stride_xh=x.stride(1), stride_xt=x.stride(2), **_mean_strides(mean),
        stride_sb=signs.stride(0), stride_sh=signs.stride(1), stride_st=signs.stride(2),
        stride_gb=scale.stride(0), stride_gh=scale.stride(1), stride_gt=scale.stride(2),
        D=d, BD=pow2(d, MIN_TILE), BJ=pow2(d // 8, MIN_TILE), GS=group_size, HAS_MU=mean is not None,
        ROT=rotation is not None, L2=scale_mode == "l2", BLOCK_T=tune["block_t"], RECIP=x.is_cuda,
        num_warps=tune["num_warps"],
    )
    return signs, scale


def kivi_compress_keys(x, bits: int, group_size: int):
    """Keys ``[B, H, T, D]`` (T a multiple of G) -> (codes uint8 ``[B, H, T/G, G, D*b/8]``, scale, zero
    ``[B, H, T/G, D]``)."""
    b, h, t, d = x.shape
    x = _rows(x)
    gs = group_size
    codes = torch.empty(b, h, t // gs, gs, d * bits // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(b, h, t // gs, d, dtype=METADATA_DTYPE, device=x.device)
    zero = torch.empty_like(scale)
    kivi_key_compress_kernel[(t // gs, b * h)](
        X=x, CODES=codes, SCALE=scale, ZERO=zero, num_heads=h,
        stride_xb=x.stride(0), stride_xh=x.stride(1), stride_xt=x.stride(2),
        stride_cb=codes.stride(0), stride_ch=codes.stride(1), stride_cg=codes.stride(2),
        stride_sb=scale.stride(0), stride_sh=scale.stride(1), stride_sg=scale.stride(2),
        D=d, GS=gs, BITS=bits, RECIP=x.is_cuda, num_warps=COMPRESS_TUNING["kivi_keys"]["num_warps"],
    )
    return codes, scale, zero


def kivi_compress_values(x, bits: int, group_size: int):
    """Values ``[B, H, T, D]`` -> (codes uint8 ``[B, H, T, D*b/8]``, scale, zero ``[B, H, T, D/G]``)."""
    b, h, t, d = x.shape
    x = _rows(x)
    gs = group_size
    codes = torch.empty(b, h, t, d * bits // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(b, h, t, d // gs, dtype=METADATA_DTYPE, device=x.device)
    zero = torch.empty_like(scale)
    tune = COMPRESS_TUNING["kivi_values"]
    kivi_value_compress_kernel[(cdiv(t, tune["block_t"]), b * h)](
        X=x, CODES=codes, SCALE=scale, ZERO=zero, T=t, num_heads=h,
        stride_xb=x.stride(0), stride_xh=x.stride(1), stride_xt=x.stride(2),
        stride_cb=codes.stride(0), stride_ch=codes.stride(1), stride_ct=codes.stride(2),
        stride_sb=scale.stride(0), stride_sh=scale.stride(1), stride_st=scale.stride(2),
        D=d, GS=gs, BITS=bits, BLOCK_T=tune["block_t"], RECIP=x.is_cuda, num_warps=tune["num_warps"],
    )
    return codes, scale, zero
