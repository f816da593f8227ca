"""Pure-PyTorch references of the Triton kernels, with the same signatures.

Every function here is written for clarity, not speed: the compress functions repeat the math of each layer's
``_quantize_block`` (so the kernels can be checked against them code for code), and the decode-attention functions
dequantize the packed tokens in full, append the full-precision window and run a plain softmax attention in float32.

Shapes (one decoder layer, one decode step; ``B`` batch, ``Hkv`` KV heads, ``Hq = Hkv * G`` query heads,
``D`` head_dim, ``N`` packed tokens held, ``n`` of them attended (``num_quantized <= N``), ``W`` window tokens)::

    q            [B, Hq, D]          query of the single new token (model dtype)
    window_k/v   [B, Hkv, W, D]      full-precision window, the new token last (model dtype)
    key_mask     [B, n + W] bool     True = attend (left padding masked), or None
    out          [B, Hq, D]          attention output (q's dtype)

``lengths`` (optional, every decode attention): an int64 tensor ``[n, W, ...]`` on the device, the counts read there
instead (CUDA-graph replays, ``tq_transformers.cuda_graphs``). ``num_quantized`` is then only an upper bound on ``n``
(what the Triton kernels size their grid by), the window tensors are buffers of at least ``W`` tokens and ``key_mask``
may be longer than ``n + W``.

Packed layouts are the layers' (see ``turboquant``, ``kivi``, ``bonsai`` and ``packing``).
"""

from __future__ import annotations

import torch

from ..packing import pack_bits, unpack_bits

_EPS = 1e-8
_KIVI_SCALE_EPS = 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# Compress-on-write
# ----------------------------------------------------------------------------------------------------------------------
def turboquant_compress(x, mean, rotation, levels, bits: int, norm_correction: bool = True):
    """x `[B, H, T, D]` -> (codes uint8 `[B, H, T, D*bits/8]`, norms fp16 `[B, H, T]`).

    mean: fp16 `[B, H, 1, D]` or None; rotation: P `[D, D]` float32; levels: the codebook `[2^bits]` float32.
    """
    x = x.float()
    if mean is not None:
        x = x - mean.float()
    gamma = x.norm(dim=-1)  # [B, H, T]
    y = (x / gamma.clamp_min(_EPS).unsqueeze(-1)) @ rotation.T  # unit rows, rotated
    edges = (levels[1:] + levels[:-1]) / 2
    idx = torch.bucketize(y.contiguous(), edges)
    norms = gamma / levels[idx].norm(dim=-1).clamp_min(_EPS) if norm_correction else gamma
    return pack_bits(idx, bits), norms.to(torch.float16)


def kivi_compress(keys, values, bits: int, group_size: int):
    """Keys per channel in groups of G tokens, values per token in groups of G channels (T a multiple of G).

    Returns (k_codes `[B, H, T/G, D, G*b/8]`, k_scale, k_zero `[B, H, T/G, D]`,
    v_codes `[B, H, T, D*b/8]`, v_scale, v_zero `[B, H, T, D/G]`), codes uint8, scales and zeros fp16.
    """
    from ..kivi import minmax_quantize

    b, h, t, d = keys.shape
    g = group_size
    kc, ks, kz = minmax_quantize(keys.float().reshape(b, h, t // g, g, d), bits, dim=3)
    vc, vs, vz = minmax_quantize(values.float().reshape(b, h, t, d // g, g), bits, dim=4)
    return (
        pack_bits(kc.transpose(-1, -2), bits),
        ks,
        kz,
        pack_bits(vc.reshape(b, h, t, d), bits),
        vs,
        vz,
    )


def bonsai_compress(x, mean, rotation, group_size: int, scale_mode: str = "mean_abs"):
    """x `[B, H, T, D]` -> (signs uint8 `[B, H, T, D/8]`, scale fp16 `[B, H, T, D/G]`).

    mean: fp16 `[B, H, 1, D]` or None; rotation: `[D, D]` or None; scale_mode "mean_abs" (Q1_0) or "l2".
    """
    x = x.float()
    if mean is not None:
        x = x - mean.float()
    if rotation is not None:
        x = x @ rotation.T
    b, h, t, d = x.shape
    grouped = x.reshape(b, h, t, d // group_size, group_size)
    l1 = grouped.abs().sum(-1)
    scale = l1 / group_size if scale_mode == "mean_abs" else (grouped * grouped).sum(-1) / l1.clamp_min(_EPS)
    return pack_bits((x >= 0).to(torch.uint8), 1), scale.to(torch.float16)


# ----------------------------------------------------------------------------------------------------------------------
# Decode attention
# ----------------------------------------------------------------------------------------------------------------------
def attend(q, keys, values, key_mask, scaling: float):
    """Softmax attention of one query token in float32. q `[B, Hq, D]`, keys/values `[B, Hkv, N, D]`."""
    b, hq, d = q.shape
    hkv = keys.shape[1]
    qg = q.float().reshape(b, hkv, hq // hkv, d)  # query head h*G + g uses KV head h
    scores = torch.einsum("bhgd,bhnd->bhgn", qg, keys.float()) * scaling
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgn,bhnd->bhgd", probs, values.float())
    return out.reshape(b, hq, d).to(q.dtype)


def _resolve(num_quantized, window_k, window_v, key_mask, lengths):
    """The exact arguments that device-side `lengths` stand for (read on the host: the reference may sync)."""
    if lengths is None:
        return num_quantized, window_k, window_v, key_mask
    n, w = (int(x) for x in lengths[:2].tolist())
    if not 0 <= n <= num_quantized or not 0 < w <= window_k.shape[2]:
        raise ValueError(f"lengths must hold 0 <= n <= {num_quantized} and 0 < W <= {window_k.shape[2]}, got {n}, {w}")
    mask = None if key_mask is None else key_mask[:, : n + w]
    return n, window_k[:, :, :w], window_v[:, :, :w], mask


def _with_window(old_k, old_v, window_k, window_v):
    return torch.cat([old_k, window_k.float()], dim=2), torch.cat([old_v, window_v.float()], dim=2)


def turboquant_decode_attention(
    q, k_codes, k_norms, v_codes, v_norms, num_quantized: int, levels, bits: int, k_rotation, v_rotation,
    k_mean, v_mean, window_k, window_v, key_mask, scaling: float, lengths=None,
):
    """TurboQuant (MSE) decode attention: the first `num_quantized` packed tokens, then the window."""
    n, window_k, window_v, key_mask = _resolve(num_quantized, window_k, window_v, key_mask, lengths)
    old = []
    for codes, norms, rot, mean in ((k_codes, k_norms, k_rotation, k_mean), (v_codes, v_norms, v_rotation, v_mean)):
        y = levels[unpack_bits(codes[:, :, :n], bits).long()] * norms[:, :, :n].float().unsqueeze(-1)
        x = y @ rot
        old.append(x if mean is None else x + mean.float())
    keys, values = _with_window(old[0], old[1], window_k, window_v)
    return attend(q, keys, values, key_mask, scaling)


def kivi_decode_attention(
    q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, num_quantized: int, bits: int, group_size: int,
    window_k, window_v, key_mask, scaling: float, lengths=None,
):
    """KIVI decode attention: the first `num_quantized` packed tokens (a multiple of G), then the window."""
    num_quantized, window_k, window_v, key_mask = _resolve(num_quantized, window_k, window_v, key_mask, lengths)
    g = group_size
    ng = num_quantized // g
    kc = unpack_bits(k_codes[:, :, :ng], bits).float()  # [B, H, Ng, D, G]
    k = kc * k_scale[:, :, :ng].float().unsqueeze(-1) + k_zero[:, :, :ng].float().unsqueeze(-1)
    b, h, _, d, _ = k.shape
    k = k.transpose(-1, -2).reshape(b, h, ng * g, d)
    n = num_quantized
    vc = unpack_bits(v_codes[:, :, :n], bits).float().reshape(b, h, n, d // g, g)
    v = vc * v_scale[:, :, :n].float().unsqueeze(-1) + v_zero[:, :, :n].float().unsqueeze(-1)
    keys, values = _with_window(k, v.reshape(b, h, n, d), window_k, window_v)
    return attend(q, keys, values, key_mask, scaling)


def bonsai_decode_attention(
    q, k_signs, k_scale, v_signs, v_scale, num_quantized: int, group_size: int, k_rotation, v_rotation,
    k_mean, v_mean, window_k, window_v, key_mask, scaling: float, lengths=None,
):
    """Bonsai 1-bit decode attention: the first `num_quantized` packed tokens, then the window."""
    n, window_k, window_v, key_mask = _resolve(num_quantized, window_k, window_v, key_mask, lengths)
    old = []
    for signs, scale, rot, mean in ((k_signs, k_scale, k_rotation, k_mean), (v_signs, v_scale, v_rotation, v_mean)):
        pm = unpack_bits(signs[:, :, :n], 1).float() * 2 - 1
        b, h, _, d = pm.shape
        x = (pm.reshape(b, h, n, d // group_size, group_size) * scale[:, :, :n].float().unsqueeze(-1))
        x = x.reshape(b, h, n, d)
        if rot is not None:
            x = x @ rot
        old.append(x if mean is None else x + mean.float())
    keys, values = _with_window(old[0], old[1], window_k, window_v)
    return attend(q, keys, values, key_mask, scaling)
