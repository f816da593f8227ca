"""Random orthogonal rotations used before quantization.

For a power-of-two dimension d the rotation is the randomized Walsh-Hadamard transform
``P = H D / sqrt(d)``: D a diagonal of seeded random +-1 signs, H the (Sylvester) Hadamard matrix. For any other d
(80, 96, 112, ...) a Hadamard matrix of that order may not exist, so P is a seeded random orthogonal matrix (the QR
factor of a Gaussian matrix, signs fixed so the distribution is Haar), which is what the TurboQuant paper assumes
in the first place. Either way P is returned as an explicit ``[d, d]`` float32 matrix: at head dims up to 256 a
matrix product is as fast as a butterfly on both CPU and GPU, and it is exactly invertible (``P^-1 = P^T``).

Vectors are rows: ``y = x @ P.T`` rotates, ``x = y @ P`` rotates back.
"""

from __future__ import annotations

import functools

import torch


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def hadamard_matrix(d: int) -> torch.Tensor:
    """Unnormalized Sylvester Hadamard matrix `[d, d]` of +-1 (d a power of two)."""
    if not is_power_of_two(d):
        raise ValueError(f"d must be a power of two for a Hadamard matrix, got {d}")
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


@functools.lru_cache(maxsize=256)
def _rotation_cpu(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if is_power_of_two(d):
        signs = torch.randint(0, 2, (d,), generator=gen).float() * 2 - 1
        return hadamard_matrix(d) * signs / d**0.5  # H @ diag(signs) / sqrt(d)
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.float()


def random_rotation(d: int, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Seeded orthogonal matrix `[d, d]` (float32): randomized Hadamard for powers of two, Haar-random otherwise."""
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be a positive integer, got {d!r}")
    return _rotation_cpu(d, int(seed)).to(device)
