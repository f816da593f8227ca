"""Lloyd-Max (MSE-optimal) scalar codebooks for the coordinates of a rotated unit vector.

After a random rotation, one coordinate y of a unit vector in R^d has the density
``f(y) ~ (1 - y^2)^((d - 3) / 2)`` on [-1, 1] (close to N(0, 1/d) for large d). TurboQuant quantizes every
coordinate with the b-bit Lloyd-Max codebook of that density. The codebooks are computed here by Lloyd iteration on
a fine grid of the exact density (no tables to trust); `gaussian_lloyd_max` computes the N(0, 1) codebook the same
way, and the tests check it against the published Lloyd-Max levels.

A uniform grid (``grid="uniform"``: 2^b levels a constant step apart, symmetric about 0, the step that minimizes the
expected squared error over the same density) is the alternative a decoder can compute with integer arithmetic
instead of a table lookup; `gaussian_uniform` is checked against Max's (1960) optimal uniform steps.
"""

from __future__ import annotations

import functools
import math

import torch

#: the codebook kinds ``codebook`` builds
GRIDS = ("lloyd_max", "uniform")
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


def _sphere_density(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid, weights) of one coordinate of a uniform unit vector in R^dim, ``(1 - y^2)^((dim - 3) / 2)``."""
    if not isinstance(dim, int) or dim < 3:
        raise ValueError(f"dim must be an integer >= 3, got {dim!r}")
    half_width = min(1.0, 12.0 / math.sqrt(dim))
    grid = torch.linspace(-half_width, half_width, 400001, dtype=torch.float64)
    # log-density for numerical range at large dim
    logw = (dim - 3) / 2 * torch.log1p(-(grid * grid).clamp(max=1 - 1e-15))
    return grid, torch.exp(logw - logw.max())


def _uniform(grid: torch.Tensor, weights: torch.Tensor, bits: int, scale: float) -> torch.Tensor:
    """The 2**bits symmetric levels a step apart whose step minimizes the weighted squared error of nearest-level
    coding (golden-section search: the error is unimodal in the step for these log-concave densities)."""
    n, w = 2**bits, weights / weights.sum()

    def mse(step: float) -> float:
        idx = torch.clamp(torch.round(grid / step + (n - 1) / 2), 0, n - 1)
        return float((w * (grid - (idx - (n - 1) / 2) * step) ** 2).sum())

    lo, hi = 1e-3 * scale, 8.0 * scale
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = mse(a), mse(b)
    for _ in range(100):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = mse(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = mse(b)
    step = (lo + hi) / 2
    return (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * step


@functools.cache
def gaussian_uniform(bits: int) -> torch.Tensor:
    """The MSE-optimal uniform levels (float64, sorted, 2**bits) of the standard normal density."""
    _check_bits(bits)
    grid = torch.linspace(-8.0, 8.0, 400001, dtype=torch.float64)
    return _uniform(grid, torch.exp(-grid * grid / 2), bits, 1.0)


@functools.cache
def sphere_lloyd_max(bits: int, dim: int, iters: int = 2000) -> torch.Tensor:
    """Lloyd-Max levels (float64, sorted, 2**bits) for one coordinate of a uniform unit vector in R^dim."""
    _check_bits(bits)
    grid, weights = _sphere_density(dim)
    return _symmetrize(_lloyd(grid, weights, bits, _symmetric_init(bits, 1.0 / math.sqrt(dim)), iters))


@functools.cache
def sphere_uniform(bits: int, dim: int) -> torch.Tensor:
    """The MSE-optimal uniform levels (float64, sorted, 2**bits) for one coordinate of a uniform unit vector in
    R^dim."""
    _check_bits(bits)
    grid, weights = _sphere_density(dim)
    return _uniform(grid, weights, bits, 1.0 / math.sqrt(dim))


def codebook(bits: int, dim: int, device=None, grid: str = "lloyd_max") -> torch.Tensor:
    """The TurboQuant codebook as float32 `[2**bits]` on `device`: the Lloyd-Max levels, or with ``grid="uniform"``
    the MSE-optimal uniform grid, of the coordinate density in R^dim. One tensor per (bits, dim, device, grid), shared
    by every caller (read-only): keys and values of the same format then share it, and the decode kernels load one
    byte table for both sides instead of two."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    return _shared_codebook(bits, dim, torch.device("cpu" if device is None else device), grid)


@functools.cache
def _shared_codebook(bits: int, dim: int, device: torch.device, grid: str) -> torch.Tensor:
    levels = sphere_lloyd_max(bits, dim) if grid == "lloyd_max" else sphere_uniform(bits, dim)
    return levels.to(device=device, dtype=torch.float32)
