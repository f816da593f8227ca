"""The packed data formats of the quantized caches, and the one PyTorch implementation of their dequantization.

A method (``tq_transformers.methods``) decides *how* a vector is encoded; a format says *what is stored* and how it
decodes. The decode-attention kernels (``tq_transformers.kernels``) are written per format, so two methods that store
the same format share a kernel. A method's layer hands the kernels a read-only view of the packed tokens that one
decode step attends to, as one of these dataclasses (for keys and for values separately).

Shapes: ``B`` batch rows, ``H`` KV heads, ``N`` packed tokens, ``D`` head_dim, ``b`` bits a code, ``G`` group size.
Codes are packed along their last axis with ``packing`` (8 codes of b bits = one little-endian word of b bytes).

``CodebookPacked`` (TurboQuant; Bonsai, rotated or not)::

    codes  [B, H, N, D*b/8] uint8   index into `levels` for each coordinate of the rotated vector
    scale  [B, H, N]  fp16          one scale a token (TurboQuant's norm), or
           [B, H, N, D/G] fp16      one scale per G consecutive coordinates (Bonsai's Q1_0 groups)
    levels [2^b] float32            the codebook (TurboQuant's Lloyd-Max levels; Bonsai's [-1, +1])
    rotation [D, D] float32 | None  P: stored vectors are y = P x (rows: y = x @ P.T); None = no rotation
    mean   [B, H, 1, D] fp16 | None per-head, per-channel mean subtracted before encoding (None = not centered)

    x_hat = (levels[codes] * scale) @ P + mean

``SplitCodebookPacked`` (TurboQuant at a fractional rate, e.g. 2.5 bits: a two-rate channel split after rotation)::

    parts  (CodebookPacked, ...)    each codes a consecutive slice of the rotated channels at its own width, with
                                    its own levels and the same per-token scale; no rotation or mean of its own
    rotation [D, D] float32, mean [B, H, 1, D] fp16 | None   as above, for the whole vector

    x_hat = concat(levels_i[codes_i] * scale over the parts) @ P + mean

``ChannelAffinePacked`` (KIVI keys: per channel, groups of G consecutive tokens; N a multiple of G)::

    codes [B, H, N/G, G, D*b/8] uint8   per token group, one row of packed codes a token (along its channels)
    scale, zero [B, H, N/G, D] fp16     x_hat[token g*G + i, channel c] = zero[g, c] + codes[g, c, i] * scale[g, c]

``TokenAffinePacked`` (KIVI values: per token, groups of G consecutive channels)::

    codes [B, H, N, D*b/8] uint8
    scale, zero [B, H, N, D/G] fp16     x_hat[token n, channel c] = zero[n, c // G] + codes[n, c] * scale[n, c // G]

Every view has ``num_tokens`` (N) and ``prefix(n)``, the view of its first n tokens (a multiple of G for
``ChannelAffinePacked``), and ``dequantize()`` -> float32 ``[B, H, N, D]``.
"""

from __future__ import annotations

import dataclasses

import torch

from .packing import unpack_bits

__all__ = ["ChannelAffinePacked", "CodebookPacked", "PackedFormat", "SplitCodebookPacked", "TokenAffinePacked",
           "format_parts"]


@dataclasses.dataclass(frozen=True)
class CodebookPacked:
    """Codebook-coded vectors times a per-token or per-group scale, in a rotated domain (module docstring)."""

    codes: torch.Tensor
    scale: torch.Tensor
    levels: torch.Tensor
    bits: int
    rotation: torch.Tensor | None = None
    mean: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[2]

    @property
    def head_dim(self) -> int:
        return self.codes.shape[-1] * 8 // self.bits

    @property
    def group_size(self) -> int:
        """Coordinates sharing one scale: head_dim for a per-token scale."""
        return self.head_dim if self.scale.dim() == 3 else self.head_dim // self.scale.shape[-1]

    def prefix(self, n: int) -> CodebookPacked:
        return dataclasses.replace(self, codes=self.codes[:, :, :n], scale=self.scale[:, :, :n])

    def dequantize_rotated(self) -> torch.Tensor:
        """``levels[codes] * scale`` in the rotated domain, float32 ``[B, H, N, D]``."""
        y = self.levels.float()[unpack_bits(self.codes, self.bits).long()]
        b, h, n, d = y.shape
        if self.scale.dim() == 3:
            return y * self.scale.float().unsqueeze(-1)
        g = self.group_size
        return (y.reshape(b, h, n, d // g, g) * self.scale.float().unsqueeze(-1)).reshape(b, h, n, d)

    def dequantize(self) -> torch.Tensor:
        """The reconstructed vectors, float32 ``[B, H, N, D]``: rotated back, the mean added."""
        x = self.dequantize_rotated()
        if self.rotation is not None:
            x = x @ self.rotation.float()
        return x if self.mean is None else x + self.mean.float()


@dataclasses.dataclass(frozen=True)
class SplitCodebookPacked:
    """Codebook codes of two (or more) widths on consecutive slices of the rotated channels (module docstring)."""

    parts: tuple[CodebookPacked, ...]
    rotation: torch.Tensor | None = None
    mean: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.parts[0].num_tokens

    @property
    def head_dim(self) -> int:
        return sum(part.head_dim for part in self.parts)

    @property
    def bits(self) -> float:
        """The average bits a coordinate (e.g. 2.5)."""
        return sum(part.bits * part.head_dim for part in self.parts) / self.head_dim

    def prefix(self, n: int) -> SplitCodebookPacked:
        return dataclasses.replace(self, parts=tuple(part.prefix(n) for part in self.parts))

    def dequantize_rotated(self) -> torch.Tensor:
        """The parts side by side in the rotated domain, float32 ``[B, H, N, D]``."""
        return torch.cat([part.dequantize_rotated() for part in self.parts], dim=-1)

    def dequantize(self) -> torch.Tensor:
        x = self.dequantize_rotated()
        if self.rotation is not None:
            x = x @ self.rotation.float()
        return x if self.mean is None else x + self.mean.float()


@dataclasses.dataclass(frozen=True)
class _AffinePacked:
    """What both affine layouts hold: codes, fp16 scale and zero, the code width and the group size."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int

    def _first_entries(self, entries: int):
        """The view of the first `entries` entries on dim 2 (tokens or token groups)."""
        return dataclasses.replace(self, codes=self.codes[:, :, :entries], scale=self.scale[:, :, :entries],
                                   zero=self.zero[:, :, :entries])


@dataclasses.dataclass(frozen=True)
class ChannelAffinePacked(_AffinePacked):
    """Asymmetric codes grouped per channel over G consecutive tokens (KIVI keys; module docstring)."""

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[2] * self.group_size

    @property
    def head_dim(self) -> int:
        return self.codes.shape[-1] * 8 // self.bits

    def prefix(self, n: int) -> ChannelAffinePacked:
        if n % self.group_size:
            raise ValueError(f"n must be a multiple of group_size={self.group_size}, got {n}")
        return self._first_entries(n // self.group_size)

    def dequantize(self) -> torch.Tensor:
        codes = unpack_bits(self.codes, self.bits).float()  # [B, H, N/G, G, D]
        x = codes * self.scale.float().unsqueeze(-2) + self.zero.float().unsqueeze(-2)
        b, h, ng, g, d = x.shape
        return x.reshape(b, h, ng * g, d)


@dataclasses.dataclass(frozen=True)
class TokenAffinePacked(_AffinePacked):
    """Asymmetric codes grouped per token over G consecutive channels (KIVI values; module docstring)."""

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[2]

    @property
    def head_dim(self) -> int:
        return self.codes.shape[-1] * 8 // self.bits

    def prefix(self, n: int) -> TokenAffinePacked:
        return self._first_entries(n)

    def dequantize(self) -> torch.Tensor:
        b, h, n = self.codes.shape[:3]
        d, g = self.head_dim, self.group_size
        codes = unpack_bits(self.codes, self.bits).float().reshape(b, h, n, d // g, g)
        x = codes * self.scale.float().unsqueeze(-1) + self.zero.float().unsqueeze(-1)
        return x.reshape(b, h, n, d)


PackedFormat = CodebookPacked | SplitCodebookPacked | ChannelAffinePacked | TokenAffinePacked


def format_parts(view: PackedFormat) -> tuple:
    """The single-width views a view is made of: a ``SplitCodebookPacked``'s parts, else ``(view,)``."""
    return view.parts if isinstance(view, SplitCodebookPacked) else (view,)
