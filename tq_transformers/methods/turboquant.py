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
from ..codebooks import codebook
from ..codec import Codec
from ..constants import METADATA_DTYPE, NORM_EPS, QJL_SEED_OFFSET, VALUE_SEED_OFFSET, layer_seed
from ..formats import CodebookPacked
from ..layer import WindowConfig
from ..packing import pack_bits, unpack_bits
from ..rotation import random_rotation
from ..validation import check_bool, check_int

__all__ = ["TurboQuantCache", "TurboQuantCodec", "TurboQuantConfig", "turboquant_encode"]


@dataclasses.dataclass
class TurboQuantConfig(WindowConfig):
    """TurboQuant settings (the keyword arguments of ``TurboQuantCache``).

    bits: bits per coordinate, 1 to 4 (with ``qjl=True``, 2 to 4: one of them is the QJL sign bit).
    residual_length / flush_size: full-precision window (``layer``); the default 0 / 128 keeps between 0 and 127
        recent tokens exact and costs nothing at a multiple of 128 tokens.
    seed: base seed of the rotations (layer i: ``seed + 1000 * i`` for keys, ``+ 500`` for values).
    center: subtract the per-head, per-channel mean before quantizing (strongly recommended on Qwen2.5).
    norm_correction: rescale so each reconstructed vector has its original norm.
    qjl: the inner-product variant (TurboQuant_prod).
    """

    bits: int = 4
    residual_length: int = 0
    flush_size: int = 128
    seed: int = 0
    center: bool = True
    norm_correction: bool = True
    qjl: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_int("bits", self.bits, 1, maximum=4)
        for name in ("center", "norm_correction", "qjl"):
            check_bool(name, getattr(self, name))
        if self.qjl and self.bits < 2:
            raise ValueError(f"bits must be in 2..4 with qjl=True (one bit is the QJL sign), got {self.bits!r}")
        check_int("seed", self.seed, 0)

    @property
    def mse_bits(self) -> int:
        return self.bits - 1 if self.qjl else self.bits

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % 8 != 0 or head_dim < 8:
            raise ValueError(f"head_dim must be a multiple of 8 for TurboQuant bit packing, got {head_dim}")

    def make_codecs(self, key_dim: int, value_dim: int, layer_idx: int, device):
        seed = layer_seed(self.seed, layer_idx)
        return (TurboQuantCodec(self, key_dim, seed, device),
                TurboQuantCodec(self, value_dim, seed + VALUE_SEED_OFFSET, device))

    def storage_bytes(self, head_dim: int, num_quantized: int) -> tuple[int, int]:
        item = torch.empty((), dtype=METADATA_DTYPE).element_size()
        codes = 2 * num_quantized * head_dim * self.mse_bits // 8
        meta = 2 * num_quantized * item  # norms
        if self.qjl:
            codes += 2 * num_quantized * head_dim // 8
            meta += 2 * num_quantized * item  # residual norms
        if self.center and num_quantized > 0:
            meta += 2 * head_dim * item  # means of K and V
        return codes, meta


def _rotate_and_code(x, mean, rotation, levels):
    """(gamma [B, H, T], y [B, H, T, D] unit rows rotated, idx [B, H, T, D]) of float32 `x` minus `mean`."""
    x = x.float()
    if mean is not None:
        x = x - mean.float()
    gamma = x.norm(dim=-1)
    y = (x / gamma.clamp_min(NORM_EPS).unsqueeze(-1)) @ rotation.T
    edges = (levels[1:] + levels[:-1]) / 2
    return gamma, y, torch.bucketize(y.contiguous(), edges)


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
    gamma, _, idx = _rotate_and_code(x, mean, rotation, levels)
    norms = gamma / levels[idx].norm(dim=-1).clamp_min(NORM_EPS) if norm_correction else gamma
    return pack_bits(idx, bits), norms.to(METADATA_DTYPE)


class TurboQuantCodec(Codec):
    """One side of one TurboQuant layer: its rotation, codebook (and QJL sketch)."""

    def __init__(self, cfg: TurboQuantConfig, head_dim: int, seed: int, device):
        super().__init__(cfg.center)
        self.cfg, self.d, self.bits = cfg, head_dim, cfg.mse_bits
        self.rotation = random_rotation(head_dim, seed, device)  # P [D, D]
        self.levels = codebook(self.bits, head_dim, device)  # [2^b]
        self.code_pieces = ("codes", "qjl") if cfg.qjl else ("codes",)
        if cfg.qjl:
            gen = torch.Generator().manual_seed(seed + QJL_SEED_OFFSET)
            self.sketch = torch.randn(head_dim, head_dim, generator=gen).to(device)  # S [D, D]

    def encode(self, x, pieces, use_kernels=False):
        mean = pieces.get("mean")
        if self.cfg.qjl:
            return self._encode_qjl(x, mean)
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
