"""Bit packing of small integer codes into uint8 tensors.

One layout serves every width b in 1..8. Codes are packed along the last dimension in runs of 8: the 8 codes
of a run form one little-endian word of b bytes, code i of the run at bits [b*i, b*i + b) of that word. For
b = 1, 2, 4 and 8 this is the usual "low bits first" byte packing; for b = 3 eight codes fill three bytes.

Example, b = 4, codes [1, 2, 3, 4, 5, 6, 7, 8] -> bytes [0x21, 0x43, 0x65, 0x87]::

    byte 0: | code1 | code0 |  = 0x2 << 4 | 0x1 = 0x21
            7       4       0

Example, b = 3, codes [1, 2, 3, 4, 5, 6, 7, 0] -> 24-bit word 0o07654321 = 0x1F58D1 -> bytes [0xD1, 0x58, 0x1F]::

    bit   23..21 20..18 17..15 14..12 11..9 8..6 5..3 2..0
    code     0      7      6      5     4    3    2    1

Example, b = 1, codes [1, 0, 1, 1, 0, 0, 0, 1] -> byte 0b10001101 = 0x8D (code 0 is the lowest bit).

The packed last dimension is n * b / 8 bytes for n codes; n must be a multiple of 8 (head dims and group sizes
used here always are).
"""

from __future__ import annotations

import torch

SUPPORTED_WIDTHS = (1, 2, 3, 4, 5, 6, 7, 8)


def _check_width(bits: int) -> None:
    if not isinstance(bits, int) or bits not in SUPPORTED_WIDTHS:
        raise ValueError(f"bits must be an integer in {SUPPORTED_WIDTHS}, got {bits!r}")


def packed_size(n: int, bits: int) -> int:
    """Bytes used by `n` codes of `bits` bits (n a multiple of 8)."""
    _check_width(bits)
    if n % 8 != 0:
        raise ValueError(f"the number of codes to pack must be a multiple of 8, got {n}")
    return n * bits // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last dim: `[..., n]` -> uint8 `[..., n * bits // 8]`."""
    _check_width(bits)
    n = codes.shape[-1]
    packed_size(n, bits)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    # [..., n/8, 8] codes -> one word of 8 * bits <= 64 bits per run
    runs = codes.to(torch.int64).reshape(*codes.shape[:-1], n // 8, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    words = (runs << shifts).sum(dim=-1, keepdim=True)  # [..., n/8, 1]
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = (words >> byte_shifts) & 0xFF  # [..., n/8, bits]
    return out.to(torch.uint8).reshape(*codes.shape[:-1], n * bits // 8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 `[..., m]` -> uint8 codes `[..., m * 8 // bits]`."""
    _check_width(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {packed.dtype}")
    m = packed.shape[-1]
    if m % bits != 0:
        raise ValueError(f"the packed last dimension must be a multiple of bits={bits}, got {m}")
    if bits == 8:
        return packed
    # [..., m/bits, bits] bytes -> one word per run of 8 codes
    runs = packed.to(torch.int64).reshape(*packed.shape[:-1], m // bits, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (runs << byte_shifts).sum(dim=-1, keepdim=True)  # [..., m/bits, 1]
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (words >> shifts) & ((1 << bits) - 1)  # [..., m/bits, 8]
    return codes.to(torch.uint8).reshape(*packed.shape[:-1], m // bits * 8)


def byte_table(levels: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Decode table of every byte value for b in {1, 2, 4, 8}: `[256, 8 // bits]`, row v = the values of the codes
    packed in byte v, lowest bits first (this module's layout), ``levels[code]`` in `dtype`.

    Used by the GPU decode kernels: one table row per packed byte replaces unpacking and a lookup per code.
    Example, b = 4, levels l[0..15], byte 0xB2::

        byte 0xB2:  | 1011 | 0010 |   -> row 0xB2 = [l[2], l[11]]
                    7  code1  code0  0

    Example, b = 1, levels [-1, +1], byte 0x8D = 0b10001101 -> row [+1, -1, +1, +1, -1, -1, -1, +1].
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits must be one of (1, 2, 4, 8) for a byte table, got {bits!r}")
    if levels.dim() != 1 or levels.numel() != 1 << bits:
        raise ValueError(f"levels must be a 1-D tensor of {1 << bits} values for bits={bits}, got shape "
                         f"{tuple(levels.shape)}")
    v = torch.arange(256, device=levels.device)
    shifts = bits * torch.arange(8 // bits, device=levels.device)
    codes = (v[:, None] >> shifts) & ((1 << bits) - 1)  # [256, 8 // bits]
    return levels.float()[codes].to(dtype).contiguous()
