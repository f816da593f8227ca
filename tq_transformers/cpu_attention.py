"""Decode attention on the packed formats for the CPU: the history is never dequantized as a whole.

The reference (``kernels.reference.decode_attention``) rebuilds every packed key and value (codes -> levels, times
the scale, rotated back with a ``[D, D]`` product per token, the mean added), then attends. Here the algebra of each
format (``formats``) is moved to the query and to the probabilities instead, so a step only turns the codes into
their code values (one byte-table lookup per packed byte, ``packing.byte_table``) and multiplies them by small
matrices (KIVI's codes need no lookup: shifts and masks). Same arguments and result as
``kernels.decode_attention``; the results differ only by float32 rounding.

Keys, one query head (q ``[D]``, scores of the packed tokens before ``scaling``):

- ``CodebookPacked`` (TurboQuant; Bonsai): ``x_hat = (levels[codes] * scale) @ P + mean``, so
  ``q . x_hat = scale * ((q @ P.T) . levels[codes]) + q . mean``: the query is rotated once, the codes are read in
  the rotated domain, the scale multiplies the score (per group of coordinates: a score per group, then scaled and
  summed) and the mean adds one number per head.
- ``ChannelAffinePacked`` (KIVI keys): ``x_hat[t, c] = zero[g, c] + code[t, c] * scale[g, c]`` (g = t's group), so
  ``q . x_hat = (q * scale[g]) . code[t] + q . zero[g]``: the scale and zero fold into the query, per token group.

Values, softmax weights p ``[N]`` of the packed tokens:

- ``CodebookPacked``: ``sum p x_hat = ((p * scale) @ levels[codes]) @ P + (sum p) mean``: the weighted sum is
  accumulated in the rotated domain and rotated back once.
- ``TokenAffinePacked`` (KIVI values): ``sum p x_hat[:, c] = (p * scale[:, j]) @ code[:, c] + p @ zero[:, j]``
  (j = c's channel group): the scale and zero fold into the weights.

Why code values times small matrices rather than a query-side score table (q . level for every level, gathered by
code): with grouped-query attention (6 query heads a KV head on Qwen2.5-1.5B) a table gathers once per query head,
the code values once per KV head, and the products after them are BLAS matrix products.

The packed tokens are read in chunks of about ``CHUNK_VALUES`` decoded code values (all batch rows and heads at once,
so that one chunk is a few large BLAS products, not many small ones); the
scores of all tokens are kept (``[B, Hq, N]`` float32, small), so the softmax is exact, not online. Nothing is stored
between steps: the cache holds only its packed tokens.

``SplitCodebookPacked`` (a fractional TurboQuant rate) is read part by part: each part is a slice of the rotated
coordinates with its own codes and levels and the shared per-token scale, so its scores add up and its weighted sums
fill its slice of the rotated accumulator.

Keys and values may have different head dims (Dk, Dv: MLA-style heads, e.g. DeepSeek-V3's 192 / 128): each side
is read at its own dim, and the output has the values' dim.

``supported(keys, values)`` says which views this covers (codebook codes of any width and two-rate splits, affine
codes of 1, 2, 4 and 8 bits; a scale per token or per group); callers fall back to the reference path for anything
else.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .formats import ChannelAffinePacked, CodebookPacked, SplitCodebookPacked, TokenAffinePacked, format_parts
from .kernels.reference import resolve_lengths
from .packing import SUPPORTED_WIDTHS, byte_table, unpack_bits

__all__ = ["BYTE_TABLE_BITS", "CHUNK_VALUES", "decode_attention", "supported"]

#: code widths read through one byte table (whole codes in a byte); codebook codes of other widths (3, 5, 6, 7 bits)
#: are unpacked (``packing.unpack_bits``) and looked up
BYTE_TABLE_BITS = (1, 2, 4, 8)
#: float32 code values decoded per chunk (8 MiB): on the 2-core Intel Xeon (AVX-512) of 2026-12-02, one layer of
#: Qwen2.5-1.5B at 8K packed tokens (2 KV heads, head_dim 128) took 4.3 ms (TurboQuant-4) / 4.0 ms (KIVI-2) a step in
#: one chunk of 8,192 tokens against 7.0 / 9.3 ms in chunks of 1,024 and 7.9 / 12.9 in chunks of 256 (ad-hoc timing):
#: fewer, larger products beat keeping a chunk in the L2 cache.
CHUNK_VALUES = 1 << 21


def _side_supported(view, affine) -> bool:
    if isinstance(view, (CodebookPacked, SplitCodebookPacked)):
        return all(part.bits in SUPPORTED_WIDTHS and part.head_dim % part.group_size == 0
                   for part in format_parts(view))
    return isinstance(view, affine) and view.bits in BYTE_TABLE_BITS


def supported(keys, values) -> bool:
    """Whether ``decode_attention`` covers keys / values (``formats`` views; None for a side without a format)."""
    return _side_supported(keys, ChannelAffinePacked) and _side_supported(values, TokenAffinePacked)


@functools.lru_cache(maxsize=64)
def _table(levels: tuple[float, ...], bits: int) -> torch.Tensor:
    """``packing.byte_table`` of a codebook, float32 ``[256, 8 // bits]``."""
    return byte_table(torch.tensor(levels, dtype=torch.float32), bits, torch.float32)


def _code_values(codes: torch.Tensor, bits: int, levels: torch.Tensor | None = None) -> torch.Tensor:
    """``levels[code]`` (or the code itself when `levels` is None) of every code packed in uint8 `codes`
    ``[..., m]`` (``packing``'s layout: lowest bits first), float32 ``[..., m * 8 // bits]``."""
    if bits not in BYTE_TABLE_BITS:  # codes across byte boundaries: unpacked, then looked up
        return levels.float()[unpack_bits(codes, bits).long()]
    if levels is None:  # the codes themselves: shifts and masks on the bytes (no lookup)
        mask = (1 << bits) - 1
        out = torch.stack([(codes >> shift) & mask for shift in range(0, 8, bits)], dim=-1).to(torch.float32)
    else:  # one row of the byte table per byte
        out = F.embedding(codes.to(torch.int32), _table(tuple(levels.tolist()), bits))  # [..., m, 8 // bits]
    return out.reshape(*codes.shape[:-1], codes.shape[-1] * 8 // bits)


def _chunks(num_tokens: int, step: int):
    return [(start, min(start + step, num_tokens)) for start in range(0, num_tokens, step)]


def _chunk_tokens(view) -> int:
    """Packed tokens a chunk of `view` (``[B, H, N, ...]`` codes) holds: ``CHUNK_VALUES`` decoded values."""
    b, h = view.codes.shape[:2]
    return max(1, CHUNK_VALUES // (b * h * view.head_dim))


# ----------------------------------------------------------------------------------------------------------------------
# Keys: scores of the packed tokens
# ----------------------------------------------------------------------------------------------------------------------
def _codebook_scores(qg: torch.Tensor, view) -> torch.Tensor:
    """qg ``[B, Hkv, G, D]`` float32 -> ``q . x_hat`` ``[B, Hkv, G, N]`` float32 (module docstring); `view` a
    ``CodebookPacked`` or a ``SplitCodebookPacked`` (its parts' scores add up)."""
    b, h, g, d = qg.shape
    qr = qg @ view.rotation.float().T if view.rotation is not None else qg  # q @ P.T, rotated once
    out = qg.new_zeros(b, h, g, view.num_tokens)
    offset = 0
    for part in format_parts(view):
        qp = qr[..., offset:offset + part.head_dim]
        offset += part.head_dim
        groups = 1 if part.scale.dim() == 3 else part.scale.shape[-1]
        for start, end in _chunks(part.num_tokens, _chunk_tokens(part)):
            y = _code_values(part.codes[:, :, start:end], part.bits, part.levels)  # [B, H, n, Dp] levels[codes]
            if groups == 1:
                s = qp @ y.transpose(-1, -2)  # [B, H, G, n]
                scale = part.scale[:, :, start:end] if part.scale.dim() == 3 else part.scale[:, :, start:end, 0]
                out[..., start:end] += s * scale.float().unsqueeze(2)
            else:  # a score per group of coordinates, scaled, summed
                gs = part.head_dim // groups
                s = torch.einsum("bhqjs,bhnjs->bhqnj", qp.reshape(b, h, g, groups, gs),
                                 y.reshape(b, h, end - start, groups, gs))
                out[..., start:end] += (s * part.scale[:, :, None, start:end].float()).sum(-1)
    if view.mean is not None:
        out += qg @ view.mean.float().transpose(-1, -2)  # [B, H, G, 1]: q . mean
    return out


def _channel_affine_scores(qg: torch.Tensor, view: ChannelAffinePacked) -> torch.Tensor:
    """qg ``[B, Hkv, G, D]`` float32 -> ``q . x_hat`` ``[B, Hkv, G, N]`` float32: scale and zero in the query."""
    b, h, g, d = qg.shape
    gk = view.group_size
    groups = view.codes.shape[2]
    out = qg.new_empty(b, h, g, groups, gk)
    per_chunk = max(1, _chunk_tokens(view) // gk)
    for start, end in _chunks(groups, per_chunk):
        codes = _code_values(view.codes[:, :, start:end], view.bits)  # [B, H, n/Gk, Gk, D]
        qs = qg[:, :, None] * view.scale[:, :, start:end, None].float()  # [B, H, n/Gk, G, D]
        qz = qg[:, :, None] @ view.zero[:, :, start:end, :, None].float()  # [B, H, n/Gk, G, 1]
        out[:, :, :, start:end] = (qs @ codes.transpose(-1, -2) + qz).transpose(2, 3)
    return out.reshape(b, h, g, groups * gk)


def _key_scores(qg: torch.Tensor, view) -> torch.Tensor:
    if isinstance(view, (CodebookPacked, SplitCodebookPacked)):
        return _codebook_scores(qg, view)
    return _channel_affine_scores(qg, view)


# ----------------------------------------------------------------------------------------------------------------------
# Values: the weighted sum of the packed tokens
# ----------------------------------------------------------------------------------------------------------------------
def _codebook_values(p: torch.Tensor, view) -> torch.Tensor:
    """p ``[B, Hkv, G, N]`` float32 -> ``p @ x_hat`` ``[B, Hkv, G, D]`` float32, accumulated rotated (a split's
    parts each fill their slice of the coordinates)."""
    b, h, g, _ = p.shape
    acc = p.new_zeros(b, h, g, view.head_dim)
    offset = 0
    for part in format_parts(view):
        d = part.head_dim
        out = acc[..., offset:offset + d]
        offset += d
        groups = 1 if part.scale.dim() == 3 else part.scale.shape[-1]
        for start, end in _chunks(part.num_tokens, _chunk_tokens(part)):
            y = _code_values(part.codes[:, :, start:end], part.bits, part.levels)  # [B, H, n, Dp]
            if groups == 1:
                scale = part.scale[:, :, start:end] if part.scale.dim() == 3 else part.scale[:, :, start:end, 0]
                out += (p[..., start:end] * scale.float().unsqueeze(2)) @ y
            else:
                ps = p[..., start:end, None] * part.scale[:, :, None, start:end].float()  # [B, H, G, n, J]
                out += torch.einsum("bhqnj,bhnjs->bhqjs", ps, y.reshape(b, h, end - start, groups, d // groups)
                                    ).reshape(b, h, g, d)
    if view.rotation is not None:
        acc = acc @ view.rotation.float()  # rotated back once
    if view.mean is not None:
        acc += p.sum(-1, keepdim=True) * view.mean.float()
    return acc


def _token_affine_values(p: torch.Tensor, view: TokenAffinePacked) -> torch.Tensor:
    """p ``[B, Hkv, G, N]`` float32 -> ``p @ x_hat`` ``[B, Hkv, G, D]`` float32: scale and zero in the weights."""
    b, h, g, _ = p.shape
    d, gv = view.head_dim, view.group_size
    groups = d // gv
    acc = p.new_zeros(b, h, groups, g, gv)
    for start, end in _chunks(view.num_tokens, _chunk_tokens(view)):
        codes = _code_values(view.codes[:, :, start:end], view.bits)  # [B, H, n, D]
        codes = codes.reshape(b, h, end - start, groups, gv).transpose(2, 3)  # [B, H, J, n, Gv]
        ps = (p[..., start:end, None] * view.scale[:, :, None, start:end].float()).permute(0, 1, 4, 2, 3)
        pz = p[..., start:end] @ view.zero[:, :, start:end].float()  # [B, H, G, J]
        acc += ps @ codes + pz.transpose(-1, -2).unsqueeze(-1)  # [B, H, J, G, Gv]
    return acc.permute(0, 1, 3, 2, 4).reshape(b, h, g, d)


def _weighted_values(p: torch.Tensor, view) -> torch.Tensor:
    if isinstance(view, (CodebookPacked, SplitCodebookPacked)):
        return _codebook_values(p, view)
    return _token_affine_values(p, view)


# ----------------------------------------------------------------------------------------------------------------------
# One decode step
# ----------------------------------------------------------------------------------------------------------------------
def decode_attention(*, q, keys, values, window_k, window_v, key_mask, scaling: float, lengths=None):
    """One decode step over packed tokens then a full-precision window, computed in float32 (module docstring).

    Args:
        q: ``[B, Hq, Dk]`` the new token's query (model dtype, original domain). Query head h*G + g uses KV head h.
        keys, values: packed views (``formats``, ``supported``) of head_dim Dk / Dv (they may differ: MLA-style
            heads, e.g. 192 / 128); every packed token is attended (or the first ``lengths[0]``).
        window_k, window_v: ``[B, Hkv, W, Dk]`` / ``[B, Hkv, W, Dv]`` full-precision window, the new token last.
        key_mask: ``[B, N + W]`` bool (True = attend) or None.
        scaling: the score scale (usually Dk ** -0.5).
        lengths: None, or int64 ``[3]`` counts as in ``kernels.decode_attention`` (read on the host).
    Returns:
        ``[B, Hq, Dv]`` in q's dtype.
    """
    keys, values, window_k, window_v, key_mask = resolve_lengths(keys, values, window_k, window_v, key_mask,
                                                                 lengths)
    b, hq, d = q.shape
    hkv = window_k.shape[1]
    qg = q.float().reshape(b, hkv, hq // hkv, d)  # [B, Hkv, G, Dk]
    n = keys.num_tokens
    scores = torch.cat([_key_scores(qg, keys), qg @ window_k.float().transpose(-1, -2)], dim=-1) * scaling
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [B, Hkv, G, N + W]
    out = _weighted_values(probs[..., :n], values) + probs[..., n:] @ window_v.float()
    return out.reshape(b, hq, -1).to(q.dtype)
