"""`Codec`: how one side (the keys or the values) of one layer is encoded into packed pieces and decoded back.

A method module (``tq_transformers.methods``) defines one codec class per side it supports and builds them in its
config's ``make_codecs``; the layer (``tq_transformers.layer``) stores what they return. The pieces of one side are a
dict of tensors with the batch on dim 0 and the token axis (or the token-group axis) on dim 2, e.g. TurboQuant's
``{"codes": [B, H, N, D*b/8], "norms": [B, H, N], "mean": [B, H, 1, D]}``. The layer keeps both sides in one dict,
prefixed ``k_`` and ``v_`` (``layer.storage``).

Centering (docs/METHODS.md, "Key offsets and centering"): a codec built with ``center=True`` stores the per-head,
per-channel mean of the first tokens it quantizes (``prepare``, fp16 ``[B, H, 1, D]``, piece ``"mean"``), subtracts
it before encoding and adds it back when decoding.
"""

from __future__ import annotations

import warnings

import torch

from .constants import CHUNK_TOKENS, METADATA_DTYPE
from .formats import PackedFormat

__all__ = ["Codec", "NonFiniteWatch", "finite_mean", "warn_non_finite"]


def finite_mean(x: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """float32 mean over `dim` (kept, size 1) of the finite entries only (0 where none is finite): one bad token
    cannot shift the mean. Accumulated in chunks of CHUNK_TOKENS along `dim`, never a whole float32 copy of `x`."""
    shape = list(x.shape)
    shape[dim] = 1
    total = torch.zeros(shape, dtype=torch.float32, device=x.device)
    count = torch.zeros(shape, dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[dim], CHUNK_TOKENS):
        part = x.narrow(dim, start, min(CHUNK_TOKENS, x.shape[dim] - start)).float()
        finite = torch.isfinite(part)
        total += torch.where(finite, part, torch.zeros_like(part)).sum(dim, keepdim=True)
        count += finite.sum(dim, keepdim=True)
    return total / count.clamp_min(1)


def _warn_non_finite_found(what: str) -> None:
    warnings.warn(
        f"non-finite values in {what}: they are quantized on their own (per token), and do not change the scales "
        "of other tokens, but the affected entries are not recoverable",
        RuntimeWarning,
        stacklevel=5,
    )


def warn_non_finite(x: torch.Tensor, what: str) -> None:
    """A RuntimeWarning when `x` holds NaN or Inf (each codec keeps them from spreading to other tokens)."""
    if not bool(torch.isfinite(x).all()):
        _warn_non_finite_found(what)


class NonFiniteWatch:
    """``warn_non_finite`` without stalling the GPU: on CUDA the check runs on the device, its one-byte answer is
    copied to pinned host memory asynchronously, and the warning is raised at a later call once the copy has landed
    (``poll``). A host sync per flush would drain the launch queue: it cost TurboQuant-4's 32K prefill about 19% over
    DynamicCache's (docs/RESULTS.md, "Speed (GPU), fourth pass")."""

    def __init__(self):
        self.pending: list[tuple[torch.cuda.Event, torch.Tensor, str]] = []

    def check(self, x: torch.Tensor, what: str) -> None:
        """Check `x` for NaN / Inf (on the CPU at once; on CUDA asynchronously)."""
        self.poll()
        if not x.is_cuda:
            warn_non_finite(x, what)
            return
        self.report((~torch.isfinite(x)).any().reshape(1), what)

    def report(self, found: torch.Tensor, what: str) -> None:
        """Watch an answer computed on the device (bool ``[1]``, True = non-finite values were found; e.g. inside a
        CUDA graph, which cannot record the host copy's event itself). On the CPU it is read at once."""
        if not found.is_cuda:
            if bool(found):
                _warn_non_finite_found(what)
            return
        bad = torch.empty(1, dtype=torch.bool, pin_memory=True)
        bad.copy_(found, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((event, bad, what))

    def __getstate__(self):
        """Copies and pickles (``copy.deepcopy(cache)``, ``torch.save``) carry no CUDA events: the pending checks
        are answered first."""
        for event, _, _ in self.pending:
            event.synchronize()
        self.poll()
        return {"pending": []}

    def poll(self) -> None:
        """Raise the warnings of the checks whose answers have arrived."""
        while self.pending and self.pending[0][0].query():
            _, bad, what = self.pending.pop(0)
            if bool(bad):
                _warn_non_finite_found(what)


class Codec:
    """One side of one layer (abstract). Subclasses set ``code_pieces`` and implement ``encode`` and ``packed``.

    Args:
        center: subtract (and add back) the mean of the first quantized tokens.
    """

    #: piece names that are codes (the rest is metadata), for ``memory_footprint``
    code_pieces: tuple[str, ...] = ()
    #: piece names that do not grow with tokens
    static_pieces: tuple[str, ...] = ("mean",)
    #: packed tokens per entry on dim 2 of the growing pieces (KIVI's key groups: group_size)
    tokens_per_entry: int = 1

    def __init__(self, center: bool = False):
        self.center = center

    # -- to implement ------------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, pieces: dict[str, torch.Tensor], use_kernels: bool = False) -> dict:
        """Encode `x` ``[B, H, T, D]`` (model dtype; T a multiple of ``tokens_per_entry``).

        Args:
            x: the tokens leaving the window.
            pieces: this side's pieces held so far (the mean, once prepared).
            use_kernels: use the Triton compress kernel when `x` is on CUDA and the kernel covers this codec.
        Returns:
            the new pieces to append on dim 2 (growing pieces only).
        """
        raise NotImplementedError

    def packed(self, pieces: dict[str, torch.Tensor]) -> PackedFormat | None:
        """A ``formats`` view of the packed tokens in `pieces`, or None when no kernel format describes them."""
        raise NotImplementedError

    # -- provided ----------------------------------------------------------------------------------------------------
    def prepare(self, first: torch.Tensor) -> dict[str, torch.Tensor]:
        """Static pieces from the first tokens to quantize ``[B, H, T, D]``: the mean when centering."""
        return {"mean": finite_mean(first, 2).to(METADATA_DTYPE)} if self.center else {}

    def centered(self, x: torch.Tensor, pieces: dict[str, torch.Tensor]) -> torch.Tensor:
        """`x` in float32 minus the stored mean (when centering)."""
        x = x.float()
        return x - pieces["mean"].float() if self.center else x

    def decode(self, pieces: dict[str, torch.Tensor]) -> torch.Tensor:
        """All packed tokens of `pieces` as float32 ``[B, H, N, D]`` (the mean added back)."""
        return self.packed(pieces).dequantize()

    def prefix(self, pieces: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        """Views of `pieces` as they were when they held their first `n` packed tokens (flushes only append)."""
        entries = n // self.tokens_per_entry
        return {name: t if name in self.static_pieces else t[:, :, :entries] for name, t in pieces.items()}

    def whole_entries(self, n: int) -> int:
        """The largest token count <= n this codec can hold (a whole number of entries)."""
        return n // self.tokens_per_entry * self.tokens_per_entry
