"""Grouped skinny GEMM for decode steps: ``y_i = x @ W_i.T (+ b_i)`` for up to four weights that read the same input,
in one launch (the attention's q / k / v projections of a decode step; ``tq_transformers.projections``).

Why: in a graph-replayed 1 x 32K Llama-3.1-8B decode step, cuBLAS reads the 32 MiB q / o weights at 69% of the copy
bandwidth and the 8 MiB k / v weights at 38%, plus five split-K reduce kernels a layer (H200, docs/RESULTS.md "Where a
graph-replayed decode step's GPU time goes" and session 15). One launch over the three input projections streams
48 MiB without a split-K reduce.

Layout: program ``p`` computes ``BLOCK_N`` output columns of one member (the members' column blocks follow each
other: member i owns programs ``[start_i, start_{i+1})``) for all ``M`` rows of x (at most ``BLOCK_M`` = 16: one
``tl.dot`` tile; the rows beyond M are masked). It streams its ``[BLOCK_N, K]`` slice of the weight in
``[BLOCK_N, BLOCK_K]`` tiles through a ``NUM_STAGES``-deep software pipeline, accumulates in float32 on the tensor
cores and adds the bias in float32 before the one rounding to the output dtype::

    x [M, K]  .  W_i [N_i, K]^T  ->  y_i [M, N_i]       (W_i rows contiguous along K, as nn.Linear stores them)

``reference.linear_group`` is the PyTorch reference of the same signature (``torch.nn.functional.linear`` per
member).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import GEMV_MAX_MEMBERS as MAX_MEMBERS
from .reference import GEMV_MAX_ROWS as MAX_ROWS
from .reference import check_linear_group
from .triton_common import cdiv

__all__ = ["GEMV_TUNING", "linear_group"]
# Launch settings: output columns a program, K elements a tile, warps, pipeline depth. Chosen by the sum of the
# q / k / v group's and o_proj's times at batch 1 and 8 over the sweep of scripts/tune_gemv.py (3 x 3 x 2 x 2
# variants, each within one rounding of float32 math; H200, 2026-12-03, docs/RESULTS.md "thirteenth pass"): q / k / v
# 16.5-16.8 us (75% of copy) against 26.2-26.7 us (47%) for cuBLAS's three GEMVs, o_proj 11.6 us (72%) against
# 12.4-12.6 (66-68%), at batch 1 and 8. The sweep's best for q / k / v alone (block_n 64, block_k 128) was 0.7 us
# faster there and 1.3 us slower for o_proj.
GEMV_TUNING = {"block_n": 32, "block_k": 256, "num_warps": 4, "num_stages": 5}


@triton.jit(do_not_specialize=["M", "start1", "start2", "start3", "n0", "n1", "n2", "n3"])
def gemv_kernel(
    X, W0, W1, W2, W3, B0, B1, B2, B3, O0, O1, O2, O3,
    M, K, start1, start2, start3, n0, n1, n2, n3,
    stride_xm, stride_w0, stride_w1, stride_w2, stride_w3,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """X [M, K] (row stride stride_xm); W_i [n_i, K] (row stride stride_wi, unit stride along K); B_i [n_i];
    O_i [M, n_i] contiguous. Member i owns programs [start_i, start_{i+1}) (start0 = 0)."""
    pid = tl.program_id(0)
    if pid < start1:
        w_ptr, o_ptr, n, stride_w, blk = W0, O0, n0, stride_w0, pid
    elif pid < start2:
        w_ptr, o_ptr, n, stride_w, blk = W1, O1, n1, stride_w1, pid - start1
    elif pid < start3:
        w_ptr, o_ptr, n, stride_w, blk = W2, O2, n2, stride_w2, pid - start2
    else:
        w_ptr, o_ptr, n, stride_w, blk = W3, O3, n3, stride_w3, pid - start3
    cols = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < n
    rows = tl.arange(0, BLOCK_M)
    r_ok = rows < M
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            x = tl.load(X + rows[:, None] * stride_xm + (k0 + kk)[None, :], mask=r_ok[:, None], other=0.0)
            w = tl.load(w_ptr + cols[:, None] * stride_w + (k0 + kk)[None, :], mask=c_ok[:, None], other=0.0)
        else:
            k_ok = k0 + kk < K
            x = tl.load(X + rows[:, None] * stride_xm + (k0 + kk)[None, :], mask=r_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w = tl.load(w_ptr + cols[:, None] * stride_w + (k0 + kk)[None, :], mask=c_ok[:, None] & k_ok[None, :],
                        other=0.0)
        acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:  # the bias pointers exist only here (None otherwise)
        if pid < start1:
            b_ptr = B0
        elif pid < start2:
            b_ptr = B1
        elif pid < start3:
            b_ptr = B2
        else:
            b_ptr = B3
        acc += tl.load(b_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(o_ptr + rows[:, None] * n + cols[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=r_ok[:, None] & c_ok[None, :])


def linear_group(x: torch.Tensor, weights, biases=None, tuning: dict | None = None) -> tuple[torch.Tensor, ...]:
    """``reference.linear_group`` in one launch of `gemv_kernel` (module docstring).

    Args:
        x: ``[M, K]``, a 16-bit dtype, unit stride along K (1 <= M <= MAX_ROWS).
        weights: 1 to MAX_MEMBERS tensors ``[N_i, K]``, x's dtype and device, unit stride along K.
        biases: None, or one tensor ``[N_i]`` per weight (all or none: a None entry raises).
        tuning: GEMV_TUNING's keys, to override (the tuning script's sweep).
    Returns:
        one contiguous ``[M, N_i]`` tensor per weight, in x's dtype.
    """
    check_linear_group(x, weights, biases)
    cfg = GEMV_TUNING if tuning is None else {**GEMV_TUNING, **tuning}
    if x.stride(1) != 1 or any(w.stride(1) != 1 for w in weights):
        raise ValueError("x and the weights must have unit stride along K")
    m, k = x.shape
    bn = cfg["block_n"]
    ns = [w.shape[0] for w in weights]
    outs = [torch.empty(m, n, dtype=x.dtype, device=x.device) for n in ns]
    starts, total = [], 0
    for n in ns:
        total += cdiv(n, bn)
        starts.append(total)
    starts += [total] * (MAX_MEMBERS - len(starts))
    pad = MAX_MEMBERS - len(weights)
    ws = list(weights) + [weights[0]] * pad  # unused members: never reached (their programs do not exist)
    bs = (list(biases) + [biases[0]] * pad) if biases is not None else [None] * MAX_MEMBERS
    os_ = outs + [outs[0]] * pad
    nn_ = ns + [ns[0]] * pad
    gemv_kernel[(total,)](
        X=x, W0=ws[0], W1=ws[1], W2=ws[2], W3=ws[3], B0=bs[0], B1=bs[1], B2=bs[2], B3=bs[3],
        O0=os_[0], O1=os_[1], O2=os_[2], O3=os_[3],
        M=m, K=k, start1=starts[0], start2=starts[1], start3=starts[2], n0=nn_[0], n1=nn_[1], n2=nn_[2], n3=nn_[3],
        stride_xm=x.stride(0), stride_w0=ws[0].stride(0), stride_w1=ws[1].stride(0), stride_w2=ws[2].stride(0),
        stride_w3=ws[3].stride(0),
        HAS_BIAS=biases is not None, EVEN_K=k % cfg["block_k"] == 0, BLOCK_M=MAX_ROWS, BLOCK_N=bn,
        BLOCK_K=cfg["block_k"], NUM_STAGES=cfg["num_stages"], num_warps=cfg["num_warps"],
    )
    return tuple(outs)
