"""GPU kernels of the quantized caches, and their PyTorch references.

The kernels read the packed formats of ``tq_transformers.formats`` (what is stored), not the methods (how it was
encoded), so two methods storing one format share a kernel, and keys and values may come in different formats.

Decode attention (one decode step):

- ``decode_attention(*, q, keys, values, window_k, window_v, key_mask, scaling, lengths=None, impl="triton")``;
- ``decode_supported(keys, values, dtype)``: whether the GPU kernels cover this pair of packed views and model dtype
  (the caller falls back to ``impl="reference"`` otherwise);
- ``impl``: ``"triton"`` (the GPU path: the CUDA C++ split kernel of ``cuda_split`` where it covers the pair and
  compiles and the views hold enough tokens, else the Triton split kernel; then the Triton reduce), ``"triton_only"``
  (the Triton split kernel always), ``"cuda"`` (the CUDA split kernel at any length; a ValueError where it does not
  cover the pair), ``"reference"`` (``reference.decode_attention``: formats' ``dequantize()`` + float32 softmax
  attention).

Compress-on-write, the signatures of the methods' encoders (``methods.turboquant.turboquant_encode`` etc.):
``turboquant_compress``, ``bonsai_compress``, ``kivi_compress_keys``, ``kivi_compress_values``;
``compress_supported(kind, head_dim=..., bits=..., group_size=...)`` says which configurations they cover.

Grouped skinny GEMM of a decode step (the attention's input projections, ``tq_transformers.projections``):
``linear_group(x, weights, biases=None)`` -> one ``x @ W_i.T (+ b_i)`` per weight in one launch (``triton_gemv``);
``linear_group_supported(x)`` says where the kernel runs (elsewhere ``linear_group`` is its reference,
``torch.nn.functional.linear`` per weight).

Modules: ``reference`` (PyTorch), ``triton_common`` (shared building blocks), ``triton_codebook`` / ``triton_affine``
(tile decoders per format), ``triton_split`` (the split kernel), ``triton_reduce`` (merge + window),
``triton_decode`` (the decode step: query rotation, split, reduce), ``triton_compress`` (compress kernels),
``triton_gemv`` (the grouped skinny GEMM),
``cuda_split`` / ``cuda_prelude`` / ``cuda_source`` / ``cuda_affine_source`` (the CUDA C++ split kernels for codebook
and affine pairs and their sources, compiled at first use with NVRTC), ``constants`` (eps values and the metadata
dtype, from ``tq_transformers.constants``). Importing this package never imports Triton.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from .. import packing
from ..formats import ChannelAffinePacked, CodebookPacked, SplitCodebookPacked, TokenAffinePacked, format_parts
from . import ops, reference

__all__ = [
    "bonsai_compress",
    "compress_supported",
    "decode_attention",
    "decode_supported",
    "keep_decode_constants",
    "kivi_compress_keys",
    "kivi_compress_supported",
    "kivi_compress_values",
    "linear_group",
    "linear_group_supported",
    "ops",
    "reference",
    "triton_available",
    "turboquant_compress",
]

IMPLS = ("triton", "triton_only", "cuda", "reference")
MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CODEBOOK_BITS = packing.SUPPORTED_WIDTHS  # 1, 2, 4 decoded a byte at a time, the others a coordinate at a time
AFFINE_BITS = (1, 2, 4, 8)


# Read once at import: torch.compile cannot trace importlib's find_spec (a graph break inside the cache update
# under transformers' auto-compile, measured on the H200), but it folds a module-level bool into the graph.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def triton_available() -> bool:
    """True when Triton is installed and a CUDA device is present (read at import; a constant to ``torch.compile``)."""
    return _TRITON_AVAILABLE


def _module(name: str):
    return importlib.import_module(f".{name}", __name__)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _side_supported(view, head_dim: int, keys: bool) -> bool:
    """One side's view fits the Triton split kernel. Head dims need not be powers of two (192 keys of DeepSeek-V3's
    qk_nope + qk_rope): the kernel's tiles are padded to the next power of two and masked (``triton_split``)."""
    if isinstance(view, SplitCodebookPacked):  # a fractional rate: two parts, one per-token scale
        return (len(view.parts) == 2 and view.parts[0].scale.dim() == 3
                and all(_side_supported(part, part.head_dim, keys) for part in view.parts))
    if view.codes.stride(-1) != 1 or head_dim % 8:
        return False
    if isinstance(view, CodebookPacked):
        groups = 1 if view.scale.dim() == 3 else view.scale.shape[-1]
        return (view.bits in CODEBOOK_BITS and head_dim % groups == 0
                and (groups == 1 or view.scale.stride(-1) == 1))
    affine = ChannelAffinePacked if keys else TokenAffinePacked
    if not isinstance(view, affine) or view.bits not in AFFINE_BITS:
        return False
    g = view.group_size
    if keys:  # g tokens a group (whole groups a tile), their rows back to back
        return _pow2(g) and view.codes.stride(-2) == view.codes.shape[-1]
    # g channels a group: a power of two, so that the padded tile holds whole groups
    return _pow2(g) and head_dim % g == 0 and view.scale.stride(-1) == 1


def decode_supported(keys, values, dtype: torch.dtype) -> bool:
    """Whether the GPU decode kernels cover keys / values in a model of `dtype`.

    Args:
        keys: the packed keys (``formats`` view) of head_dim Dk: codebook (one part or a two-rate split) or
            per-channel affine.
        values: the packed values of head_dim Dv (Dv may differ from Dk, e.g. 128 against 192): codebook or per-token
            affine.
        dtype: the model dtype (float32, float16 or bfloat16).
    Returns:
        True where the Triton split kernel takes the pair (the CUDA C++ split kernel takes a subset: equal head dims
        among others, ``cuda_split.supported``); False sends the caller to the reference path.
    """
    codebooks = (CodebookPacked, SplitCodebookPacked)
    if dtype not in MODEL_DTYPES or not isinstance(keys, (*codebooks, ChannelAffinePacked)):
        return False
    if not isinstance(values, (*codebooks, TokenAffinePacked)):
        return False
    if format_parts(keys)[0].codes.shape[:2] != format_parts(values)[0].codes.shape[:2]:
        return False  # not one batch and one set of KV heads
    return _side_supported(keys, keys.head_dim, True) and _side_supported(values, values.head_dim, False)


def _check_decode_args(q, keys, values, window_k, window_v, key_mask):
    """ValueErrors / TypeErrors naming the first argument whose type or shape does not fit the others: q
    ``[B, Hq, Dk]``, keys / values views of head_dim Dk / Dv and Hkv heads, window_k ``[B, Hkv, W, Dk]``, window_v
    ``[B, Hkv, W, Dv]`` (one W), key_mask ``[B, >= n + W]`` bool."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a [B, Hq, Dk] tensor, got {getattr(q, 'shape', type(q))}")
    for name, view in (("keys", keys), ("values", values)):
        if not isinstance(view, (CodebookPacked, SplitCodebookPacked, ChannelAffinePacked, TokenAffinePacked)):
            raise TypeError(f"{name} must be a tq_transformers.formats view, got {type(view).__name__}")
    b, hq, dk = q.shape
    dv = values.head_dim
    hkv = format_parts(keys)[0].codes.shape[1]
    if hq % hkv or keys.head_dim != dk:
        raise ValueError(f"q [B, Hq, Dk] = {tuple(q.shape)} does not fit keys of {hkv} heads and head_dim "
                         f"{keys.head_dim} (Hq a multiple of the KV heads, Dk the keys' head_dim)")
    if format_parts(values)[0].codes.shape[1] != hkv:
        raise ValueError(f"values have {format_parts(values)[0].codes.shape[1]} KV heads, keys {hkv}")
    for name, w, d, dim in (("window_k", window_k, dk, "Dk"), ("window_v", window_v, dv, "Dv")):
        if not isinstance(w, torch.Tensor) or w.dim() != 4 or w.shape[0] != b or w.shape[1] != hkv or w.shape[3] != d:
            raise ValueError(f"{name} must be [B, Hkv, W, {dim}] = [{b}, {hkv}, W, {d}], got "
                             f"{tuple(getattr(w, 'shape', ()))}")
    if window_v.shape[2] != window_k.shape[2]:
        raise ValueError(f"window_k and window_v must hold the same W tokens, got {window_k.shape[2]} and "
                         f"{window_v.shape[2]}")
    if key_mask is not None and (key_mask.dim() != 2 or key_mask.shape[0] != b or key_mask.dtype != torch.bool):
        raise ValueError(f"key_mask must be a bool [B, n + W] tensor, got {key_mask.dtype} {tuple(key_mask.shape)}")


def decode_attention(*, q, keys, values, window_k, window_v, key_mask, scaling: float, lengths=None,
                     impl: str = "triton"):
    """One decode step of attention over packed tokens then a full-precision window: q ``[B, Hq, Dk]`` ->
    ``[B, Hq, Dv]`` (Dk, Dv the key and value head dims: equal in most models, e.g. 192 / 128 in DeepSeek-V3-style
    attention).

    Args:
        q: ``[B, Hq, Dk]`` the new token's query, model dtype, original (unrotated) domain. Query head h*G + g uses KV
            head h.
        keys, values: packed views (``formats``) of head_dim Dk / Dv. Without `lengths` every packed token is
            attended.
        window_k: ``[B, Hkv, W, Dk]``, window_v: ``[B, Hkv, W, Dv]``: the full-precision window, the new token last.
        key_mask: ``[B, n + W]`` bool (True = attend) or None.
        scaling: the score scale (usually Dk ** -0.5).
        lengths: None, or int64 ``[3]`` on the device: [packed tokens attended n, window tokens W, slot (ignored)].
            The views are then capacity buffers (the grid is sized by their num_tokens), the windows buffers of at
            least W tokens, and key_mask may be longer than n + W; nothing is read on the host (CUDA graphs).
        impl: see the module docstring. The CUDA C++ split kernel needs Dk == Dv: ``"triton"`` then runs the Triton
            split kernel, ``"cuda"`` raises a ValueError.
    Returns:
        ``[B, Hq, Dv]`` in q's dtype.
    """
    _check_decode_args(q, keys, values, window_k, window_v, key_mask)
    if impl == "reference":
        return reference.decode_attention(q=q, keys=keys, values=values, window_k=window_k, window_v=window_v,
                                          key_mask=key_mask, scaling=scaling, lengths=lengths)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not decode_supported(keys, values, q.dtype):
        raise ValueError("the GPU decode kernels do not cover these keys / values (see decode_supported); "
                         "use impl='reference'")
    use_cuda = impl == "triton" and q.is_cuda and _module("cuda_split").supported(q, keys, values)
    if impl == "cuda":
        if keys.head_dim != values.head_dim:
            raise ValueError(f"the CUDA split kernel needs keys and values of one head dim, got Dk={keys.head_dim} "
                             f"and Dv={values.head_dim}; use impl='triton' (the Triton split kernel covers them)")
        if not (q.is_cuda and _module("cuda_split").supported(q, keys, values, min_tokens=0)):
            raise ValueError("the CUDA split kernel does not cover these keys / values (cuda_split.supported)")
        use_cuda = True
    return _module("triton_decode").decode_attention(q=q, keys=keys, values=values, window_k=window_k,
                                                     window_v=window_v, key_mask=key_mask, scaling=scaling,
                                                     lengths=lengths, cuda_split=use_cuda)


def keep_decode_constants(keys, values, dtype: torch.dtype) -> None:
    """Compute and keep, outside any graph, what the decode kernels derive from the views' constant tensors (byte
    tables, rotations). The custom operator (``ops.decode_attention``) keeps nothing new while it runs (it may run in
    CUDA-graph warm-up or capture): a fixed-capacity cache calls this when it enters its buffers.

    Args:
        keys, values: packed views that ``decode_supported(keys, values, dtype)`` accepts; dtype: the model dtype.
    """
    if not (triton_available() and format_parts(keys)[0].codes.is_cuda):
        return
    split = _module("triton_split")
    split.keep_constants(keys, dtype, keys=True)
    split.keep_constants(values, dtype, keys=False)
    _module("cuda_split").keep_constants(keys, values, dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Compress-on-write
# ----------------------------------------------------------------------------------------------------------------------
def compress_supported(kind: str, *, head_dim: int, bits: int | None = None, group_size: int | None = None) -> bool:
    """Whether the Triton compress kernel of `kind` covers a configuration.

    kind: "turboquant" (bits 1..8, head_dim a multiple of 8), "bonsai" (group_size a multiple of 8 dividing
    head_dim), "kivi_keys" / "kivi_values" (bits 1, 2, 4 or 8; head_dim and group_size powers of two, group_size at
    least 8, and for values at most head_dim)."""
    if kind == "turboquant":
        return head_dim % 8 == 0 and bits in range(1, 9)
    if kind == "bonsai":
        return group_size is not None and group_size % 8 == 0 and head_dim % group_size == 0
    if kind in ("kivi_keys", "kivi_values"):
        ok = bits in AFFINE_BITS and _pow2(head_dim) and group_size is not None and _pow2(group_size)
        return ok and group_size >= 8 and (kind == "kivi_keys" or group_size <= head_dim)
    raise ValueError(f"kind must be one of ('turboquant', 'bonsai', 'kivi_keys', 'kivi_values'), got {kind!r}")


def kivi_compress_supported(head_dim: int, bits: int, group_size: int) -> bool:
    """Both KIVI compress kernels cover (head_dim, bits, group_size)."""
    return all(compress_supported(k, head_dim=head_dim, bits=bits, group_size=group_size)
               for k in ("kivi_keys", "kivi_values"))


def turboquant_compress(x, mean, rotation, levels, bits: int, norm_correction: bool = True):
    """Triton ``methods.turboquant.turboquant_encode``: x ``[B, H, T, D]`` -> (codes, norms)."""
    return ops.turboquant_compress(x, mean, rotation, levels, bits, norm_correction)


def bonsai_compress(x, mean, rotation, group_size: int, scale_mode: str = "mean_abs"):
    """Triton ``methods.bonsai.bonsai_encode``: x ``[B, H, T, D]`` -> (signs, scale)."""
    return ops.bonsai_compress(x, mean, rotation, group_size, scale_mode)


def kivi_compress_keys(x, bits: int, group_size: int):
    """Triton ``methods.kivi.kivi_encode_keys``: x ``[B, H, T, D]`` -> (codes, scale, zero)."""
    return ops.kivi_compress_keys(x, bits, group_size)


def kivi_compress_values(x, bits: int, group_size: int):
    """Triton ``methods.kivi.kivi_encode_values``: x ``[B, H, T, D]`` -> (codes, scale, zero)."""
    return ops.kivi_compress_values(x, bits, group_size)


GEMV_DTYPES = (torch.float16, torch.bfloat16)  # the grouped GEMM's operand types (tensor-core tiles)
GEMV_K_MULTIPLE = 8  # its input width: a multiple of 8 16-bit elements, so that rows load as 16-byte vectors


def linear_group_supported(x: torch.Tensor) -> bool:
    """Whether `linear_group` runs the Triton kernel for an input like `x` (a 16-bit CUDA tensor of at most
    ``triton_gemv.MAX_ROWS`` rows, with Triton installed; under Triton's interpreter, CPU tensors too)."""
    on_device = x.is_cuda or (x.device.type == "cpu" and ops.COMPRESS_DEVICES != "cuda")
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    return (_TRITON_AVAILABLE or ops.COMPRESS_DEVICES != "cuda") and on_device and x.dtype in GEMV_DTYPES and \
        1 <= rows <= reference.GEMV_MAX_ROWS and x.shape[-1] % GEMV_K_MULTIPLE == 0


def linear_group(x: torch.Tensor, weights, biases=None) -> tuple[torch.Tensor, ...]:
    """``tuple(F.linear(x, W_i, b_i))`` for weights that read the same x, in one kernel launch where
    `linear_group_supported(x)` (``triton_gemv.linear_group``), else through its reference.

    Args:
        x: ``[M, K]``.
        weights: 1 to 4 tensors ``[N_i, K]`` in x's dtype and on x's device.
        biases: None, or one ``[N_i]`` tensor per weight.
    Returns:
        one ``[M, N_i]`` tensor per weight.
    """
    if linear_group_supported(x):
        return _module("triton_gemv").linear_group(x, weights, biases)
    return reference.linear_group(x, weights, biases)
