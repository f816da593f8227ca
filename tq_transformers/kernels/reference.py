"""PyTorch references of the kernels, with the same signatures (any device; written for clarity, not speed).

- ``decode_attention``: the packed tokens are dequantized by their format's own ``dequantize()``
  (``tq_transformers.formats``), the full-precision window is appended, and a plain float32 softmax attention runs.
- the compress references are the methods' own encoders (``tq_transformers.methods``): ``turboquant_compress`` is
  ``turboquant_encode``, ``bonsai_compress`` is ``bonsai_encode``, ``kivi_compress_keys`` / ``_values`` are
  ``kivi_encode_keys`` / ``_values`` (imported on first call: the method modules import this package).
- ``linear_group``: ``torch.nn.functional.linear`` per weight (the grouped skinny GEMM of ``triton_gemv``).

Shapes of one decode step (``B`` batch, ``Hkv`` KV heads, ``Hq = Hkv * G`` query heads, ``Dk`` / ``Dv`` the key
and value head dims, equal in most models and different in MLA-style attention, e.g. DeepSeek-V3's 192 / 128, ``n``
packed tokens attended, ``W`` window tokens)::

    q            [B, Hq, Dk]         query of the new token (model dtype, original domain)
    keys, values packed views (formats) of head_dim Dk / Dv, at least n tokens
    window_k     [B, Hkv, W, Dk]     full-precision window, the new token last
    window_v     [B, Hkv, W, Dv]
    key_mask     [B, n + W] bool     True = attend, or None
    lengths      int64 [3] or None   device counts [n, W, slot]: the views and windows are then capacity buffers
    out          [B, Hq, Dv]         in q's dtype
"""

from __future__ import annotations

import torch

#: the most weights one grouped GEMM takes (``linear_group``)
GEMV_MAX_MEMBERS = 4
#: the most rows of x (tokens of a step: batch x 1 in decode) one grouped GEMM takes: one 16-row tensor-core tile
GEMV_MAX_ROWS = 16


def check_linear_group(x, weights, biases) -> None:
    """ValueErrors naming the argument of a `linear_group` call that does not fit the others."""
    if not 1 <= len(weights) <= GEMV_MAX_MEMBERS:
        raise ValueError(f"weights must hold 1 to {GEMV_MAX_MEMBERS} matrices, got {len(weights)}")
    if biases is not None and (len(biases) != len(weights) or any(b is None for b in biases)):
        raise ValueError(f"biases must be None or one tensor per weight ({len(weights)}), got "
                         f"{[None if b is None else tuple(b.shape) for b in biases]}")
    if x.dim() != 2 or not 1 <= x.shape[0] <= GEMV_MAX_ROWS:
        raise ValueError(f"x must be [M, K] with 1 <= M <= {GEMV_MAX_ROWS}, got shape {tuple(x.shape)}")
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != x.shape[1] or w.dtype != x.dtype or w.device != x.device:
            raise ValueError(f"weights[{i}] must be [N, {x.shape[1]}] in {x.dtype} on {x.device}, got shape "
                             f"{tuple(w.shape)}, {w.dtype} on {w.device}")


def linear_group(x: torch.Tensor, weights, biases=None) -> tuple[torch.Tensor, ...]:
    """``tuple(F.linear(x, W_i, b_i))``: the reference of ``triton_gemv.linear_group``, same signature.

    Args:
        x: ``[M, K]`` (1 <= M <= GEMV_MAX_ROWS).
        weights: 1 to GEMV_MAX_MEMBERS tensors ``[N_i, K]``, x's dtype and device.
        biases: None, or one tensor ``[N_i]`` per weight.
    Returns:
        one ``[M, N_i]`` tensor per weight, in x's dtype.
    """
    check_linear_group(x, weights, biases)
    bs = biases if biases is not None else [None] * len(weights)
    return tuple(torch.nn.functional.linear(x, w, b) for w, b in zip(weights, bs))


def resolve_lengths(keys, values, window_k, window_v, key_mask, lengths):
    """The exact arguments that device-side `lengths` stand for (read on the host: this syncs)."""
    if lengths is None:
        return keys, values, window_k, window_v, key_mask
    n, w = (int(x) for x in lengths[:2].tolist())
    if not 0 <= n <= keys.num_tokens or not 0 < w <= window_k.shape[2]:
        raise ValueError(f"lengths must hold 0 <= n <= {keys.num_tokens} and 0 < W <= {window_k.shape[2]}, "
                         f"got {n}, {w}")
    mask = None if key_mask is None else key_mask[:, : n + w]
    return keys.prefix(n), values.prefix(n), window_k[:, :, :w], window_v[:, :, :w], mask


def attend(q, keys, values, key_mask, scaling: float):
    """Softmax attention of one query token in float32.

    Args:
        q: ``[B, Hq, Dk]``; query head h*G + g uses KV head h.
        keys: ``[B, Hkv, N, Dk]``; values: ``[B, Hkv, N, Dv]``.
        key_mask: ``[B, N]`` bool (True = attend) or None.
        scaling: the score scale.
    Returns:
        ``[B, Hq, Dv]`` in q's dtype.
    """
    b, hq, d = q.shape
    hkv = keys.shape[1]
    qg = q.float().reshape(b, hkv, hq // hkv, d)  # query head h*G + g uses KV head h
    scores = torch.einsum("bhgd,bhnd->bhgn", qg, keys.float()) * scaling
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgn,bhnd->bhgd", probs, values.float())
    return out.reshape(b, hq, values.shape[-1]).to(q.dtype)


def decode_attention(*, q, keys, values, window_k, window_v, key_mask, scaling: float, lengths=None,
                     impl: str = "reference"):
    """One decode step: every packed token of `keys` / `values` (or the first ``lengths[0]``), then the window.

    Args:
        q: ``[B, Hq, Dk]`` the new token's query (model dtype, original domain).
        keys, values: packed views (``formats``) of head_dim Dk / Dv.
        window_k: ``[B, Hkv, W, Dk]``; window_v: ``[B, Hkv, W, Dv]``: the full-precision window, the new token last.
        key_mask: ``[B, n + W]`` bool (True = attend) or None.
        scaling: the score scale.
        lengths: None, or int64 ``[3]`` device counts (``kernels.decode_attention``; read on the host here).
        impl: ignored (the signature of ``kernels.decode_attention``).
    Returns:
        ``[B, Hq, Dv]`` in q's dtype.
    """
    keys, values, window_k, window_v, key_mask = resolve_lengths(keys, values, window_k, window_v, key_mask,
                                                                 lengths)
    k = torch.cat([keys.dequantize(), window_k.float()], dim=2)
    v = torch.cat([values.dequantize(), window_v.float()], dim=2)
    return attend(q, k, v, key_mask, scaling)


def turboquant_compress(x, mean, rotation, levels, bits: int, norm_correction: bool = True):
    """``methods.turboquant.turboquant_encode``: x ``[B, H, T, D]`` -> (codes ``[B, H, T, D*b/8]``, norms fp16)."""
    from ..methods.turboquant import turboquant_encode

    return turboquant_encode(x, mean, rotation, levels, bits, norm_correction)


def bonsai_compress(x, mean, rotation, group_size: int, scale_mode: str = "mean_abs"):
    """``methods.bonsai.bonsai_encode``: x ``[B, H, T, D]`` -> (signs ``[B, H, T, D/8]``, scale fp16 ``[.., D/G]``)."""
    from ..methods.bonsai import bonsai_encode

    return bonsai_encode(x, mean, rotation, group_size, scale_mode)


def kivi_compress_keys(x, bits: int, group_size: int):
    """``methods.kivi.kivi_encode_keys``: x ``[B, H, T, D]`` -> (codes ``[B, H, T/G, G, D*b/8]``, scale, zero)."""
    from ..methods.kivi import kivi_encode_keys

    return kivi_encode_keys(x, bits, group_size)


def kivi_compress_values(x, bits: int, group_size: int):
    """``methods.kivi.kivi_encode_values``: x ``[B, H, T, D]`` -> (codes ``[B, H, T, D*b/8]``, scale, zero)."""
    from ..methods.kivi import kivi_encode_values

    return kivi_encode_values(x, bits, group_size)
