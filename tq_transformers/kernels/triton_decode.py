"""Triton decode attention on packed views: rotate the query, the split kernel, the reduce kernel."""

from __future__ import annotations

from .constants import LOG2E
from .triton_reduce import reduce_window
from .triton_split import rotate_query, split_partials


def decode_attention(*, q, keys, values, window_k, window_v, key_mask, scaling: float, lengths=None,
                     cuda_split: bool = False):
    """One decode step (``kernels.decode_attention``'s contract): the split kernel (``cuda_split`` or Triton's), then
    the Triton reduce.

    Args:
        q: ``[B, Hq, Dk]``; keys, values: packed views of head_dim Dk / Dv; window_k ``[B, Hkv, W, Dk]``, window_v
            ``[B, Hkv, W, Dv]``; key_mask, scaling, lengths: as in ``kernels.decode_attention``.
        cuda_split: run the CUDA C++ split kernel (the caller checked ``cuda_split.supported``: Dk == Dv among
            others), else the Triton one.
    Returns:
        ``[B, Hq, Dv]`` in q's dtype.
    """
    q = q.contiguous()
    q_k, factor = rotate_query(q, getattr(keys, "rotation", None))  # q . k = (P q) . (P k)
    bound = keys.num_tokens
    if cuda_split:
        from .cuda_split import split_partials as cuda_partials

        m, l_, acc = cuda_partials(q_k, keys, values, key_mask, scaling * factor * LOG2E, lengths, bound)
    else:
        m, l_, acc = split_partials(q_k, keys, values, key_mask, scaling * factor * LOG2E, lengths, bound)
    return reduce_window(q, values, window_k, window_v, m, l_, acc, bound, key_mask, scaling * LOG2E, lengths)
