"""TurboQuant (Zandieh et al., "TurboQuant: Online Vector Quantization with Near-optimal Distortion Rate",
arXiv 2504.19874, ICLR 2026), MSE variant by default, the QJL inner-product variant as an option.

Per key or value vector x ``[head_dim]`` of one token and one head (docs/METHODS.md, "TurboQuant"):

1. centering (our addition, default on): subtract mu, the per-head, per-channel mean of the tokens seen at the first
   flush (fp16 ``[B, H, 1, D]``). Qwen2.5 keys carry a shared offset holding up to 99.9% of their energy; softmax
   ignores it, but a per-vector quantizer would spend its whole error budget on it (docs/METHODS.md, "Key offsets
   and centering").
2. gamma = ||x - mu||, u = (x - mu) / gamma, y = P u with P the seeded randomized Hadamard rotation of this layer
   (a Haar-random orthogonal matrix when head_dim is not a power of two).
3. each coordinate of y is coded with the b-bit Lloyd-Max codebook of the exact coordinate density (``codebooks``).
4. norm correction: the stored fp16 norm is gamma / ||c[idx]||, so ``x_hat = norm * P^T c[idx] + mu`` has exactly
   the norm of x - mu.

Stored as ``formats.CodebookPacked``: ``codes`` ``[B, H, N, D*b/8]`` uint8, ``norms`` ``[B, H, N]`` fp16, ``mean``.
Keys and values may take different rates (``key_bits`` / ``value_bits``). A fractional rate b + f (a multiple of
1/8, e.g. 2.5 or 3.5) is the paper's two-rate channel split after rotation (``rate_split``): the first f * D rotated
channels at b + 1 bits, the rest at b, each part with its own Lloyd-Max codebook, one norm (norm correction over the
whole vector); stored as ``formats.SplitCodebookPacked`` (pieces ``codes`` and ``codes_low``).
QJL variant (``qjl=True``): (b-1)-bit codes as above without norm correction, plus one sign bit per coordinate of
S r (r = y - c[idx], S a seeded Gaussian d x d matrix) in ``qjl`` ``[B, H, N, D/8]`` and ||r|| in ``rnorm``
``[B, H, N]``: ``y_hat = c[idx] + sqrt(pi/2)/d ||r|| S^T sign(S r)``, an unbiased inner-product estimator (no kernel
format: the reference path decodes it).

Departures from the paper: centering; a full-precision window of recent tokens; fp16 norms; one seeded rotation per
layer and side (``constants.layer_seed``; values add ``VALUE_SEED_OFFSET``).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .. import kernels
from ..cache import QuantizedKVCache
from ..codebooks import GRIDS, codebook
from ..codec import Codec
from ..constants import BITS_STEP, METADATA_DTYPE, NORM_EPS, QJL_SEED_OFFSET, side_seed
from ..formats import CodebookPacked, SplitCodebookPacked
from ..packing import pack_bits, packed_size, unpack_bits
from ..rotation import random_rotation
from ..validation import check_bool, check_choice, check_int, check_rate
from ..window import WindowConfig

__all__ = ["TurboQuantCache", "TurboQuantCodec", "TurboQuantConfig", "rate_split", "turboquant_encode",
           "turboquant_encode_split"]

#: piece names of the code parts of a split rate (the first: the high-rate channels)
CODE_PIECES = ("codes", "codes_low")


@dataclasses.dataclass
class TurboQuantConfig(WindowConfig):
    """TurboQuant settings (the keyword arguments of ``TurboQuantCache``).

    bits: bits per coordinate of keys and values: 1 to 4, or a fractional rate between (a multiple of 1/8, e.g. 2.5
        or 3.5: the two-rate channel split, module docstring); with ``qjl=True``, whole bits 2 to 4 (one of them is
        the QJL sign bit).
    key_bits / value_bits: the rate of keys / values alone (None: ``bits``), the same values as ``bits``.
    residual_length / flush_size / sink_tokens: the window (``layer``); the default 0 / 128 keeps between 0 and 127
        recent tokens exact and costs nothing at a multiple of 128 tokens.
    seed: base seed of the rotations (layer i: ``seed + 1000 * i`` for keys, ``+ 500`` for values).
    center: subtract the per-head, per-channel mean before quantizing (strongly recommended on Qwen2.5).
    norm_correction: rescale so each reconstructed vector has its original norm.
    qjl: the inner-product variant (TurboQuant_prod).
    grid: the scalar codebook of keys and values: "lloyd_max" (the paper's, MSE-optimal for the coordinate density)
        or "uniform" (2^b levels a constant step apart, the MSE-optimal step: a departure from the paper, for
        decoders that compute levels instead of looking them up; ``codebooks``).
    key_grid / value_grid: the grid of keys / values alone (None: ``grid``).
    """

    bits: float = 4
    key_bits: float | None = None
    value_bits: float | None = None
    residual_length: int = 0
    flush_size: int = 128
    seed: int = 0
    center: bool = True
    norm_correction: bool = True
    qjl: bool = False
    grid: str = "lloyd_max"
    key_grid: str | None = None
    value_grid: str | None = None

    def __post_init__(self):
        super().__post_init__()
        for name in ("center", "norm_correction", "qjl"):
            check_bool(name, getattr(self, name))
        for name in ("grid", "key_grid", "value_grid"):
            value = getattr(self, name)
            if name == "grid" or value is not None:
                check_choice(name, value, GRIDS, kind=str)
        for name in ("bits", "key_bits", "value_bits"):
            value = getattr(self, name)
            if name == "bits" or value is not None:
                check_rate(name, value, 1, MAX_BITS, BITS_STEP, RATES)
                if self.qjl and (value != int(value) or value < 2):
                    raise ValueError(f"{name} must be a whole number of bits in 2..{MAX_BITS} with qjl=True (one bit "
                                     f"is the QJL sign, and no channel split is implemented for it), got {value!r}")
        check_int("seed", self.seed, 0)

    def side_bits(self, side: str) -> float:
        """The rate of `side` ("k" or "v"): ``key_bits`` / ``value_bits``, else ``bits``."""
        own = self.key_bits if side == "k" else self.value_bits
        return self.bits if own is None else own

    def side_grid(self, side: str) -> str:
        """The codebook grid of `side` ("k" or "v"): ``key_grid`` / ``value_grid``, else ``grid``."""
        own = self.key_grid if side == "k" else self.value_grid
        return self.grid if own is None else own

    def check_dim(self, side: str, dim: int) -> None:
        if dim % 8 != 0 or dim < 8:
            raise ValueError(f"head_dim must be a multiple of 8 for TurboQuant bit packing, got {dim}")
        rate_split(self.side_bits(side) - (1 if self.qjl else 0), dim)

    def check_head_dim(self, head_dim: int) -> None:
        for side in ("k", "v"):
            self.check_dim(side, head_dim)

    def make_codec(self, side, dim, layer_idx, device):
        return TurboQuantCodec(self, dim, side_seed(self.seed, layer_idx, side), device, self.side_bits(side),
                               self.side_grid(side))

    def side_bytes(self, side: str, dim: int, num_quantized: int) -> tuple[int, int]:
        item = torch.empty((), dtype=METADATA_DTYPE).element_size()
        mse_bits = self.side_bits(side) - (1 if self.qjl else 0)
        codes = sum(num_quantized * packed_size(width, b) for b, width in rate_split(mse_bits, dim))
        meta = num_quantized * item  # norms
        if self.qjl:
            codes += num_quantized * dim // 8
            meta += num_quantized * item  # residual norms
        if self.center and num_quantized > 0:
            meta += dim * item  # the mean
        return codes, meta


#: what ``bits`` / ``key_bits`` / ``value_bits`` accept, in words
MAX_BITS = 4
RATES = f"a rate in 1..{MAX_BITS} bits, whole or a multiple of 1/{BITS_STEP} (e.g. 2.5, 3.5)"


def rate_split(bits: float, dim: int) -> tuple[tuple[int, int], ...]:
    """The channel split of a rate: ((bits, channels), ...) of the rotated coordinates, in order.

    A whole rate codes every channel at `bits`. A fractional rate b + f (0 < f < 1) codes the first f * dim rotated
    channels at b + 1 bits and the rest at b (the paper's two-rate split; after the random rotation every coordinate
    has the same distribution, so a fixed subset is as good as any: docs/METHODS.md, "Fractional rates").

    Args:
        bits: the rate a coordinate (without the QJL bit).
        dim: the head dim.
    Returns:
        ((b + 1, f * dim), (b, dim - f * dim)) or ((bits, dim),).
    """
    low = math.floor(bits)
    if bits == low:
        return ((int(bits), dim),)
    high = (bits - low) * dim
    if high != int(high) or int(high) % 8:
        ok = [k / BITS_STEP for k in range(BITS_STEP * low + 1, BITS_STEP * (low + 1))
              if (k / BITS_STEP - low) * dim % 8 == 0]
        raise ValueError(
            f"a rate of {bits} bits at head_dim {dim} splits {(bits - low) * dim:g} channels to {low + 1} bits, which "
            f"must be a whole multiple of 8 (bit packing); rates between {low} and {low + 1} that work at head_dim "
            f"{dim}: {ok or 'none'} (or a whole number of bits)"
        )
    return (low + 1, int(high)), (low, dim - int(high))


def _rotate(x, mean, rotation):
    """(gamma [B, H, T], y [B, H, T, D] unit rows rotated) of float32 `x` minus `mean`."""
    x = x.float()
    if mean is not None:
        x = x - mean.float()
    gamma = x.norm(dim=-1)
    return gamma, (x / gamma.clamp_min(NORM_EPS).unsqueeze(-1)) @ rotation.T


def _code(y, levels):
    """The nearest level of each coordinate of `y` (indices, int64)."""
    edges = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(y.contiguous(), edges)


def _rotate_and_code(x, mean, rotation, levels):
    """(gamma [B, H, T], y [B, H, T, D] unit rows rotated, idx [B, H, T, D]) of float32 `x` minus `mean`."""
    gamma, y = _rotate(x, mean, rotation)
    return gamma, y, _code(y, levels)


def turboquant_encode(x, mean, rotation, levels, bits: int, norm_correction: bool = True):
    """The MSE encoder (module docstring), the reference of ``kernels.turboquant_compress``.

    Args:
        x: ``[B, H, T, D]`` any float dtype.
        mean: fp16 ``[B, H, 1, D]`` or None.
        rotation: P ``[D, D]`` float32.
        levels: the codebook ``[2^bits]`` float32.
        bits: code width.
        norm_correction: store gamma / ||c[idx]|| instead of gamma.
    Returns:
        (codes uint8 ``[B, H, T, D*bits/8]``, norms fp16 ``[B, H, T]``).
    """
    (codes,), norms = turboquant_encode_split(x, mean, rotation, (levels,), ((bits, x.shape[-1]),), norm_correction)
    return codes, norms


def turboquant_encode_split(x, mean, rotation, levels, split, norm_correction: bool = True):
    """The MSE encoder at a split rate (``rate_split``): each slice of the rotated channels coded with its codebook.

    Args:
        x: ``[B, H, T, D]`` any float dtype.
        mean: fp16 ``[B, H, 1, D]`` or None.
        rotation: P ``[D, D]`` float32.
        levels: one codebook a part, ``[2^b_i]`` float32.
        split: ((b_i, channels_i), ...), channels summing to D.
        norm_correction: store gamma / ||c[idx]|| (over the whole vector) instead of gamma.
    Returns:
        (codes: one uint8 ``[B, H, T, channels_i*b_i/8]`` a part, norms fp16 ``[B, H, T]``).
    """
    gamma, y = _rotate(x, mean, rotation)
    codes, recon, start = [], [], 0
    for part_levels, (b, width) in zip(levels, split):
        idx = _code(y[..., start:start + width], part_levels)
        codes.append(pack_bits(idx, b))
        recon.append(part_levels[idx])
        start += width
    recon = recon[0] if len(recon) == 1 else torch.cat(recon, dim=-1)
    norms = gamma / recon.norm(dim=-1).clamp_min(NORM_EPS) if norm_correction else gamma
    return tuple(codes), norms.to(METADATA_DTYPE)


class TurboQuantCodec(Codec):
    """One side of one TurboQuant layer: its rotation, codebook(s) (and QJL sketch).

    Args:
        cfg: the config (center, norm correction, QJL).
        head_dim: D of this side.
        seed: the rotation's seed.
        device: where the rotation and codebooks live.
        bits: this side's rate (``cfg.side_bits(side)``).
        grid: this side's codebook grid (``cfg.side_grid(side)``).
    """

    def __init__(self, cfg: TurboQuantConfig, head_dim: int, seed: int, device, bits: float | None = None,
                 grid: str = "lloyd_max"):
        super().__init__(cfg.center)
        bits = cfg.bits if bits is None else bits
        self.cfg, self.d = cfg, head_dim
        self.split = rate_split(bits - (1 if cfg.qjl else 0), head_dim)  # ((bits, channels), ...)
        self.bits = self.split[0][0]  # the width of the (first) part
        self.rotation = random_rotation(head_dim, seed, device)  # P [D, D]
        self.part_levels = tuple(codebook(b, head_dim, device, grid) for b, _ in self.split)  # the density is D's
        self.levels = self.part_levels[0]  # [2^b]
        self.code_pieces = ("codes", "qjl") if cfg.qjl else CODE_PIECES[: len(self.split)]
        if cfg.qjl:
            gen = torch.Generator().manual_seed(seed + QJL_SEED_OFFSET)
            self.sketch = torch.randn(head_dim, head_dim, generator=gen).to(device)  # S [D, D]

    def encode(self, x, pieces, use_kernels=False):
        mean = pieces.get("mean")
        if self.cfg.qjl:
            return self._encode_qjl(x, mean)
        if len(self.split) > 1:  # the compress kernel codes one width: the PyTorch encoder
            codes, norms = turboquant_encode_split(x, mean, self.rotation, self.part_levels, self.split,
                                                   self.cfg.norm_correction)
            return {**dict(zip(self.code_pieces, codes)), "norms": norms}
        if use_kernels and x.is_cuda and kernels.triton_available():
            codes, norms = kernels.turboquant_compress(x, mean, self.rotation, self.levels, self.bits,
                                                       self.cfg.norm_correction)
        else:
            codes, norms = turboquant_encode(x, mean, self.rotation, self.levels, self.bits, self.cfg.norm_correction)
        return {"codes": codes, "norms": norms}

    def _encode_qjl(self, x, mean):
        gamma, y, idx = _rotate_and_code(x, mean, self.rotation, self.levels)
        r = y - self.levels[idx]
        signs = (r @ self.sketch.T) >= 0  # sign(S r)
        return {"codes": pack_bits(idx, self.bits), "norms": gamma.to(METADATA_DTYPE),
                "qjl": pack_bits(signs.to(torch.uint8), 1), "rnorm": r.norm(dim=-1).to(METADATA_DTYPE)}

    def packed(self, pieces):
        if self.cfg.qjl:
            return None
        if len(self.split) > 1:
            parts = tuple(CodebookPacked(pieces[name], pieces["norms"], levels, b)
                          for name, levels, (b, _) in zip(self.code_pieces, self.part_levels, self.split))
            return SplitCodebookPacked(parts, self.rotation, pieces.get("mean"))
        return CodebookPacked(pieces["codes"], pieces["norms"], self.levels, self.bits, self.rotation,
                              pieces.get("mean"))

    def decode(self, pieces):
        if not self.cfg.qjl:
            return super().decode(pieces)
        base = CodebookPacked(pieces["codes"], torch.ones_like(pieces["norms"]), self.levels, self.bits)
        y = base.dequantize_rotated()
        signs = unpack_bits(pieces["qjl"], 1).float() * 2 - 1
        coef = math.sqrt(math.pi / 2) / self.d * pieces["rnorm"].float().unsqueeze(-1)
        x = ((y + coef * (signs @ self.sketch)) * pieces["norms"].float().unsqueeze(-1)) @ self.rotation
        return x + pieces["mean"].float() if self.center else x


class TurboQuantCache(QuantizedKVCache):
    """KV cache quantized with TurboQuant (module docstring: the algorithm and where we depart from the paper).

    Args:
        config: ``model.config`` or None.
        **settings: ``TurboQuantConfig`` fields: bits (4), residual_length (0), flush_size (128), seed (0),
            center (True), norm_correction (True), qjl (False).

    Example::

        cache = TurboQuantCache(model.config, bits=4)
        model.generate(**inputs, cache=cache)      # past_key_values=cache before transformers 5.24
    """

    method = "turboquant"
    config_class = TurboQuantConfig
