"""Bonsai 1-bit KV cache: the Q1_0 format (group 128) of PrismML's 1-bit Bonsai models in llama.cpp, applied to keys
and values, with a full-precision sliding window of recent tokens (docs/METHODS.md, "Bonsai 1-bit").

Faithful Q1_0 (the default): per group of G = 128 consecutive values of one token (along head_dim), one fp16 scale
``d = mean(|x|)`` and one bit per value (``x >= 0``); dequantized to ``+d`` or ``-d``. 18 bytes per 128 values.

Options, measured against the faithful form: ``center`` subtracts the per-head, per-channel mean of the first
flushed tokens (fp16 ``[B, H, 1, D]``), ``rotate`` applies a seeded randomized Hadamard rotation before the sign step
(and undoes it after), ``scale="l2"`` uses ``||x||^2 / ||x||_1``, which keeps the slope of inner products at 1
(``mean |x|`` shrinks them by about 2/pi on Gaussian data). ``BonsaiCache.improved(...)`` turns on centering and
rotation but keeps the ``mean |x|`` scale: on the real Qwen2.5-Coder-1.5B (WikiText-2, 1024 tokens,
attention-output cosine) faithful scored 0.726, centered 0.924, centered + rotated 0.936, and centered + rotated +
"l2" only 0.816: with one bit the score noise is large, and the 2/pi shrinkage damps it (a Wiener-like effect) more
than the slope bias hurts.

Stored as ``formats.CodebookPacked`` with levels ``[-1, +1]``: ``signs`` ``[B, H, N, D/8]`` uint8 (``packing``
layout, b = 1), ``scale`` ``[B, H, N, D/G]`` fp16, ``mean`` when centered.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .. import kernels
from ..cache import QuantizedKVCache
from ..codec import Codec
from ..constants import METADATA_DTYPE, NORM_EPS, side_seed
from ..formats import CodebookPacked
from ..packing import pack_bits
from ..rotation import random_rotation
from ..validation import check_bool, check_choice, check_int
from ..window import WindowConfig

__all__ = ["BonsaiCache", "BonsaiCodec", "BonsaiConfig", "bonsai_encode", "sign_levels"]

SCALE_MODES = ("mean_abs", "l2")


@dataclasses.dataclass
class BonsaiConfig(WindowConfig):
    """Bonsai settings (the keyword arguments of ``BonsaiCache``).

    group_size: values per scale (128 in Q1_0); a multiple of 8 that divides head_dim.
    residual_length / flush_size: full-precision window (``layer``): 128 / 128 keeps 128 to 255 recent tokens.
    center, rotate, scale: the improvements (module docstring); faithful Q1_0 is False, False, "mean_abs".
    seed: base seed of the rotations.
    """

    group_size: int = 128
    residual_length: int = 128
    flush_size: int = 128
    center: bool = False
    rotate: bool = False
    scale: str = "mean_abs"
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_int("group_size", self.group_size, 8, "a positive multiple of 8")
        if self.group_size % 8:
            raise ValueError(f"group_size must be a positive multiple of 8, got {self.group_size!r}")
        check_choice("scale", self.scale, SCALE_MODES)
        check_int("seed", self.seed, 0)
        for name in ("center", "rotate"):
            check_bool(name, getattr(self, name))

    def check_dim(self, side: str, dim: int) -> None:
        if dim % self.group_size:
            ok = [g for g in range(8, dim + 1, 8) if dim % g == 0]
            raise ValueError(
                f"group_size must divide head_dim={dim} (groups run along head_dim), got "
                f"group_size={self.group_size}; group sizes that work: {ok}"
            )

    def make_codec(self, side, dim, layer_idx, device):
        return BonsaiCodec(self, dim, side_seed(self.seed, layer_idx, side), device)

    def side_bytes(self, side: str, dim: int, num_quantized: int) -> tuple[int, int]:
        item = torch.empty((), dtype=METADATA_DTYPE).element_size()
        codes = num_quantized * dim // 8
        meta = num_quantized * (dim // self.group_size) * item  # scales
        if self.center and num_quantized > 0:
            meta += dim * item  # the mean
        return codes, meta


@functools.cache
def sign_levels(device: torch.device) -> torch.Tensor:
    """The codebook of a sign bit: bit 0 -> -1, bit 1 -> +1 (float32, on `device`)."""
    return torch.tensor([-1.0, 1.0], device=device)


def bonsai_encode(x, mean, rotation, group_size: int, scale_mode: str = "mean_abs"):
    """Sign bits and per-group scales (module docstring), the reference of ``kernels.bonsai_compress``.

    Args:
        x: ``[B, H, T, D]`` any float dtype.
        mean: fp16 ``[B, H, 1, D]`` or None.
        rotation: ``[D, D]`` float32 or None.
        group_size: values per scale.
        scale_mode: "mean_abs" (Q1_0) or "l2".
    Returns:
        (signs uint8 ``[B, H, T, D/8]``, scale fp16 ``[B, H, T, D/G]``).
    """
    x = x.float()
    if mean is not None:
        x = x - mean.float()
    if rotation is not None:
        x = x @ rotation.T
    b, h, t, d = x.shape
    grouped = x.reshape(b, h, t, d // group_size, group_size)
    l1 = grouped.abs().sum(-1)
    scale = l1 / group_size if scale_mode == "mean_abs" else (grouped * grouped).sum(-1) / l1.clamp_min(NORM_EPS)
    return pack_bits((x >= 0).to(torch.uint8), 1), scale.to(METADATA_DTYPE)


class BonsaiCodec(Codec):
    """One side of one Bonsai layer (its rotation when ``rotate``)."""

    code_pieces = ("signs",)

    def __init__(self, cfg: BonsaiConfig, head_dim: int, seed: int, device):
        super().__init__(cfg.center)
        self.cfg = cfg
        self.rotation = random_rotation(head_dim, seed, device) if cfg.rotate else None
        self.levels = sign_levels(torch.device(device))

    def encode(self, x, pieces, use_kernels=False):
        mean = pieces.get("mean")
        encoder = kernels.bonsai_compress if use_kernels and x.is_cuda and kernels.triton_available() else bonsai_encode
        signs, scale = encoder(x, mean, self.rotation, self.cfg.group_size, self.cfg.scale)
        return {"signs": signs, "scale": scale}

    def packed(self, pieces):
        return CodebookPacked(pieces["signs"], pieces["scale"], self.levels, 1, self.rotation, pieces.get("mean"))


class BonsaiCache(QuantizedKVCache):
    """KV cache in Bonsai's 1-bit Q1_0 format with a full-precision sliding window (module docstring).

    Args:
        config: ``model.config`` or None.
        **settings: ``BonsaiConfig`` fields: group_size (128), residual_length (128), flush_size (128),
            center (False), rotate (False), scale ("mean_abs"), seed (0).

    Example::

        cache = BonsaiCache(model.config)                 # faithful Q1_0, group 128
        cache = BonsaiCache.improved(model.config)        # centered and rotated
    """

    method = "bonsai"
    config_class = BonsaiConfig

    @classmethod
    def improved(cls, config=None, **settings) -> BonsaiCache:
        """Centered, Hadamard-rotated 1-bit cache: the best variant measured on the real model (module docstring).

        Args:
            config: ``model.config`` or None.
            **settings: other ``BonsaiConfig`` fields (center and rotate default to True here).
        Returns:
            a new BonsaiCache.
        """
        return cls(config, **{"center": True, "rotate": True, **settings})
