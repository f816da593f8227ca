"""Lloyd-Max (MSE-optimal) scalar codebooks for the coordinates of a rotated unit vector.

After a random rotation, one coordinate y of a unit vector in R^d has the density
``f(y) ~ (1 - y^2)^((d - 3) / 2)`` on [-1, 1] (close to N(0, 1/d) for large d). TurboQuant quantizes every
coordinate with the b-bit Lloyd-Max codebook of that density. The codebooks are computed here by Lloyd iteration on
a fine grid of the exact density (no tables to trust); `gaussian_lloyd_max` computes the N(0, 1) codebook the same
way, and the tests check it against the published Lloyd-Max levels.
"""

from __future__ import annotations

import functools
import math

import torch

# Published Lloyd-Max levels of N(0, 1), positive half (Max 1960), used as the starting point and in tests.
GAUSSIAN_LEVELS = {
    1: (0.7979,),
    2: (0.4528, 1.5104),
    3: (0.2451, 0.7560, 1.3439, 2.1519),
    4: (0.1284, 0.3880, 0.6568, 0.9423, 1.2562, 1.6180, 2.0690, 2.7326),
}


def _lloyd(grid: torch.Tensor, weights: torch.Tensor, bits: int, init: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd iteration for a 1-D density given as weights on a sorted grid. Returns 2**bits sorted levels."""
    w = weights / weights.sum()
    cw = torch.cumsum(w, 0)
    cwy = torch.cumsum(w * grid, 0)
    levels = init.clone()
    for _ in range(iters):
        edges = (levels[1:] + levels[:-1]) / 2
        idx = torch.searchsorted(grid, edges)  # first grid point of each cell after the first
        starts = torch.cat([idx.new_zeros(1), idx])
        ends = torch.cat([idx, idx.new_full((1,), grid.numel())])
        mass = _range_sum(cw, starts, ends)
        first = _range_sum(cwy, starts, ends)
        new = torch.where(mass > 0, first / mass.clamp_min(1e-300), levels)
        if torch.max(torch.abs(new - levels)) < 1e-12:
            levels = new
            break
        levels = new
    return levels


def _range_sum(csum: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    hi = csum[(ends - 1).clamp_min(0)]
    lo = torch.where(starts > 0, csum[(starts - 1).clamp_min(0)], torch.zeros_like(hi))
    return torch.where(ends > starts, hi - lo, torch.zeros_like(hi))


def _symmetrize(levels: torch.Tensor) -> torch.Tensor:
    """Both densities are even: average out the grid's tiny asymmetry so that c[-i] = -c[i] exactly."""
    return (levels - levels.flip(0)) / 2


def _symmetric_init(bits: int, scale: float) -> torch.Tensor:
    half = torch.tensor(GAUSSIAN_LEVELS.get(bits, ()), dtype=torch.float64)
    if half.numel() == 0:  # no published table: uniform start
        n = 2**bits
        return (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) / (n / 4) * scale
    return torch.cat([-half.flip(0), half]) * scale


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


@functools.cache
def gaussian_lloyd_max(bits: int, iters: int = 2000) -> torch.Tensor:
    """Lloyd-Max levels (float64, sorted, 2**bits) of the standard normal density."""
    _check_bits(bits)
    grid = torch.linspace(-8.0, 8.0, 400001, dtype=torch.float64)
    weights = torch.exp(-grid * grid / 2)
    return _symmetrize(_lloyd(grid, weights, bits, _symmetric_init(bits, 1.0), iters))


@functools.cache
def sphere_lloyd_max(bits: int, dim: int, iters: int = 2000) -> torch.Tensor:
    """Lloyd-Max levels (float64, sorted, 2**bits) for one coordinate of a uniform unit vector in R^dim."""
    _check_bits(bits)
    if not isinstance(dim, int) or dim < 3:
        raise ValueError(f"dim must be an integer >= 3, got {dim!r}")
    half_width = min(1.0, 12.0 / math.sqrt(dim))
    grid = torch.linspace(-half_width, half_width, 400001, dtype=torch.float64)
    # log-density for numerical range at large dim
    logw = (dim - 3) / 2 * torch.log1p(-(grid * grid).clamp(max=1 - 1e-15))
    weights = torch.exp(logw - logw.max())
    return _symmetrize(_lloyd(grid, weights, bits, _symmetric_init(bits, 1.0 / math.sqrt(dim)), iters))


def codebook(bits: int, dim: int, device=None) -> torch.Tensor:
    """The TurboQuant codebook as float32 `[2**bits]` on `device`."""
    return sphere_lloyd_max(bits, dim).to(device=device, dtype=torch.float32)
