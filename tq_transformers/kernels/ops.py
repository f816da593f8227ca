"""The kernels as PyTorch custom operators (``torch.library.custom_op``), so that ``torch.compile`` traces through them.

Dynamo cannot look inside a Triton launch from Python wrappers, nor hand a ``formats`` dataclass to an operator. Each
kernel entry point is therefore one custom operator in the ``tq_transformers`` namespace that takes tensors and plain
scalars, with a fake (meta) implementation giving the output's shape and dtype, and a real one that calls the existing
function (no second copy of the math):

- ``tq_transformers::decode_attention``: one decode step over packed keys / values, each flattened by ``flatten``
  into its tensors plus static attributes (format kind, bits, group size) and rebuilt inside (``unflatten``). Real
  implementation: ``kernels.decode_attention`` (Triton / CUDA split kernels) on CUDA where ``decode_supported``
  covers the pair, ``cpu_attention.decode_attention`` on the CPU where it covers it, the PyTorch reference otherwise;
  the device-side ``lengths`` are honoured by all three.
- ``tq_transformers::turboquant_compress``, ``bonsai_compress``, ``kivi_compress_keys``, ``kivi_compress_values``:
  the Triton compress-on-write kernels (``kernels.triton_compress``), CUDA only (and CPU tensors under Triton's
  interpreter, ``COMPRESS_DEVICES``); ``kernels.turboquant_compress`` etc. call them, so a method's codec
  (``use_kernels``) compiles unchanged.

``decode_attention`` here has the signature of ``kernels.decode_attention`` (without ``impl``: the operator chooses).
(No ``from __future__ import annotations`` here: ``custom_op`` reads the annotations as types.)
"""

import importlib
import os

import torch

from ..constants import METADATA_DTYPE
from ..formats import ChannelAffinePacked, CodebookPacked, TokenAffinePacked

__all__ = ["FORMAT_KINDS", "decode_attention", "flatten", "unflatten"]

NAMESPACE = "tq_transformers"

#: the formats an operator can carry, by the static tag that names them in its arguments
FORMAT_KINDS = {"codebook": CodebookPacked, "channel_affine": ChannelAffinePacked, "token_affine": TokenAffinePacked}
_KIND_OF = {cls: kind for kind, cls in FORMAT_KINDS.items()}


def flatten(view) -> tuple:
    """A packed view as operator arguments: (kind, bits, group_size, codes, scale, aux, rotation, mean).

    Args:
        view: a ``CodebookPacked`` (aux = levels), ``ChannelAffinePacked`` or ``TokenAffinePacked`` (aux = zero;
            rotation and mean None).
    Returns:
        the 8-tuple above (group_size 0 for a codebook view: its scale's shape says it).
    """
    kind = _KIND_OF.get(type(view))
    if kind is None:
        raise TypeError(f"view must be one of {sorted(c.__name__ for c in _KIND_OF)}, got {type(view).__name__}")
    if isinstance(view, CodebookPacked):
        return kind, view.bits, 0, view.codes, view.scale, view.levels, view.rotation, view.mean
    return kind, view.bits, view.group_size, view.codes, view.scale, view.zero, None, None


def unflatten(kind: str, bits: int, group_size: int, codes, scale, aux, rotation, mean):
    """The view ``flatten`` took apart."""
    cls = FORMAT_KINDS[kind]
    if cls is CodebookPacked:
        return CodebookPacked(codes, scale, aux, bits, rotation, mean)
    return cls(codes, scale, aux, bits, group_size)


def _kernels():
    return importlib.import_module("..", __name__)


@torch.library.custom_op(f"{NAMESPACE}::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor,
    key_kind: str, key_bits: int, key_group: int, key_codes: torch.Tensor, key_scale: torch.Tensor,
    key_aux: torch.Tensor, key_rotation: torch.Tensor | None, key_mean: torch.Tensor | None,
    value_kind: str, value_bits: int, value_group: int, value_codes: torch.Tensor, value_scale: torch.Tensor,
    value_aux: torch.Tensor, value_rotation: torch.Tensor | None, value_mean: torch.Tensor | None,
    window_k: torch.Tensor, window_v: torch.Tensor, key_mask: torch.Tensor | None, lengths: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    from .. import cpu_attention

    kernels = _kernels()
    keys = unflatten(key_kind, key_bits, key_group, key_codes, key_scale, key_aux, key_rotation, key_mean)
    values = unflatten(value_kind, value_bits, value_group, value_codes, value_scale, value_aux, value_rotation,
                       value_mean)
    args = dict(q=q, keys=keys, values=values, window_k=window_k, window_v=window_v, key_mask=key_mask,
                scaling=scaling, lengths=lengths)
    if q.is_cuda and kernels.triton_available() and kernels.decode_supported(keys, values, q.dtype):
        from .triton_common import fresh_derived

        with fresh_derived():  # may run in CUDA-graph warm-up or capture: keep no tensor (triton_common)
            return kernels.decode_attention(**args)
    if not q.is_cuda and cpu_attention.supported(keys, values):
        return cpu_attention.decode_attention(**args)
    return kernels.reference.decode_attention(**args)


@_decode_attention_op.register_fake
def _(q, key_kind, key_bits, key_group, key_codes, key_scale, key_aux, key_rotation, key_mean, value_kind,
      value_bits, value_group, value_codes, value_scale, value_aux, value_rotation, value_mean, window_k, window_v,
      key_mask, lengths, scaling):
    return q.new_empty((q.shape[0], q.shape[1], window_v.shape[-1]))


def decode_attention(*, q, keys, values, window_k, window_v, key_mask, scaling: float, lengths=None):
    """``kernels.decode_attention`` through the custom operator (traceable by ``torch.compile``).

    Args:
        q: ``[B, Hq, Dk]``; keys / values: packed views (``FORMAT_KINDS``) of head_dim Dk / Dv (they may differ);
            window_k ``[B, Hkv, W, Dk]``, window_v ``[B, Hkv, W, Dv]``; key_mask ``[B, n + W]`` bool (or longer with
            `lengths`) or None; scaling: the score scale; lengths: None or int64 ``[3]`` device counts
            (``kernels.decode_attention``).
    Returns:
        ``[B, Hq, Dv]`` in q's dtype.
    """
    return _decode_attention_op(q, *flatten(keys), *flatten(values), window_k, window_v, key_mask, lengths,
                                float(scaling))


# ----------------------------------------------------------------------------------------------------------------------
# Compress-on-write (CUDA: the Triton kernels)
# ----------------------------------------------------------------------------------------------------------------------
#: the devices of the compress operators: CUDA; also the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, read
#: at import, as Triton does), which runs the kernels on CPU tensors for the kernel tests without a GPU
COMPRESS_DEVICES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def _triton_compress():
    return importlib.import_module("..triton_compress", __name__)


@torch.library.custom_op(f"{NAMESPACE}::turboquant_compress", mutates_args=(), device_types=COMPRESS_DEVICES)
def turboquant_compress(x: torch.Tensor, mean: torch.Tensor | None, rotation: torch.Tensor, levels: torch.Tensor,
                        bits: int, norm_correction: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``triton_compress.turboquant_compress``: x ``[B, H, T, D]`` -> (codes uint8 ``[B, H, T, D*b/8]``, norms
    ``[B, H, T]``)."""
    return _triton_compress().turboquant_compress(x, mean, rotation, levels, bits, norm_correction)


@turboquant_compress.register_fake
def _(x, mean, rotation, levels, bits, norm_correction):
    b, h, t, d = x.shape
    return x.new_empty((b, h, t, d * bits // 8), dtype=torch.uint8), x.new_empty((b, h, t), dtype=METADATA_DTYPE)


@torch.library.custom_op(f"{NAMESPACE}::bonsai_compress", mutates_args=(), device_types=COMPRESS_DEVICES)
def bonsai_compress(x: torch.Tensor, mean: torch.Tensor | None, rotation: torch.Tensor | None, group_size: int,
                    scale_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``triton_compress.bonsai_compress``: x ``[B, H, T, D]`` -> (signs uint8 ``[B, H, T, D/8]``, scale
    ``[B, H, T, D/G]``)."""
    return _triton_compress().bonsai_compress(x, mean, rotation, group_size, scale_mode)


@bonsai_compress.register_fake
def _(x, mean, rotation, group_size, scale_mode):
    b, h, t, d = x.shape
    return (x.new_empty((b, h, t, d // 8), dtype=torch.uint8),
            x.new_empty((b, h, t, d // group_size), dtype=METADATA_DTYPE))


@torch.library.custom_op(f"{NAMESPACE}::kivi_compress_keys", mutates_args=(), device_types=COMPRESS_DEVICES)
def kivi_compress_keys(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``triton_compress.kivi_compress_keys``: x ``[B, H, T, D]`` -> (codes ``[B, H, T/G, G, D*b/8]``, scale, zero
    ``[B, H, T/G, D]``)."""
    return _triton_compress().kivi_compress_keys(x, bits, group_size)


@kivi_compress_keys.register_fake
def _(x, bits, group_size):
    b, h, t, d = x.shape
    meta = x.new_empty((b, h, t // group_size, d), dtype=METADATA_DTYPE)
    return (x.new_empty((b, h, t // group_size, group_size, d * bits // 8), dtype=torch.uint8), meta,
            torch.empty_like(meta))


@torch.library.custom_op(f"{NAMESPACE}::kivi_compress_values", mutates_args=(), device_types=COMPRESS_DEVICES)
def kivi_compress_values(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """``triton_compress.kivi_compress_values``: x ``[B, H, T, D]`` -> (codes ``[B, H, T, D*b/8]``, scale, zero
    ``[B, H, T, D/G]``)."""
    return _triton_compress().kivi_compress_values(x, bits, group_size)


@kivi_compress_values.register_fake
def _(x, bits, group_size):
    b, h, t, d = x.shape
    meta = x.new_empty((b, h, t, d // group_size), dtype=METADATA_DTYPE)
    return x.new_empty((b, h, t, d * bits // 8), dtype=torch.uint8), meta, torch.empty_like(meta)
