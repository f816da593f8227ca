"""TurboQuant KV cache (Zandieh et al., "TurboQuant: Online Vector Quantization with Near-optimal Distortion Rate",
arXiv 2504.19874, ICLR 2026), MSE variant by default, the QJL inner-product variant as an option.

Per key or value vector x ``[head_dim]`` of one token and one head:

1. centering (our addition, default on): subtract mu, the per-head, per-channel mean of the tokens seen at the first
   flush (fp16, ``[B, H, D]``). Qwen2.5 keys carry a shared offset holding up to 99.9% of their energy; softmax
   ignores it, but a per-vector quantizer would spend its whole error budget on it (REFERENCE.md section 6).
2. gamma = ||x - mu||, u = (x - mu) / gamma, y = P u with P the seeded randomized Hadamard rotation of this layer
   (a Haar-random orthogonal matrix when head_dim is not a power of two).
3. each coordinate of y is coded with the b-bit Lloyd-Max codebook of the exact coordinate density (``codebooks``).
4. norm correction: the stored fp16 norm is gamma / ||c[idx]||, so ``x_hat = norm * P^T c[idx] + mu`` has exactly
   the norm of x - mu.

QJL variant (``qjl=True``): (b-1)-bit codes as above without norm correction, plus one sign bit per coordinate of
S r (r = y - c[idx], S a seeded Gaussian d x d matrix) and ||r|| in fp16: ``y_hat = c[idx] + sqrt(pi/2)/d ||r|| S^T
sign(S r)``, an unbiased inner-product estimator.

Storage per token and head: ``codes`` ``[B, H, N, D*b/8]`` uint8 (``packing`` layout), ``norms`` ``[B, H, N]`` fp16,
for keys (``k_*``) and values (``v_*``); QJL adds ``*_qjl`` ``[B, H, N, D/8]`` and ``*_rnorm`` ``[B, H, N]``.

Departures from the paper: centering; a full-precision window of recent tokens; fp16 norms; the rotation is one
seeded matrix per layer (keys and values use different seeds).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .base import QuantizedCacheBase, QuantizedLayer, WindowConfig, check_int, warn_non_finite
from .codebooks import codebook
from .packing import pack_bits, unpack_bits
from .rotation import random_rotation

_EPS = 1e-8


@dataclasses.dataclass
class TurboQuantConfig(WindowConfig):
    """TurboQuant settings.

    bits: bits per coordinate, 1 to 4 (with ``qjl=True``, 2 to 4: one of them is the QJL sign bit).
    residual_length / flush_size: full-precision window (see ``base``); the default 0 / 128 keeps between 0 and 127
        recent tokens exact and costs nothing at a multiple of 128 tokens.
    seed: base seed of the rotations (layer i uses seed + i).
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
        check_int("bits", self.bits, 1, "an integer in 1..4")
        if self.bits > 4:
            raise ValueError(f"bits must be an integer in 1..4, got {self.bits!r}")
        if self.qjl and self.bits < 2:
            raise ValueError(f"bits must be in 2..4 with qjl=True (one bit is the QJL sign), got {self.bits!r}")
        check_int("seed", self.seed, 0)
        for name in ("center", "norm_correction", "qjl"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def mse_bits(self) -> int:
        return self.bits - 1 if self.qjl else self.bits

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % 8 != 0 or head_dim < 8:
            raise ValueError(f"head_dim must be a multiple of 8 for TurboQuant bit packing, got {head_dim}")

    def storage_bytes(self, head_dim: int, num_quantized: int) -> tuple[int, int]:
        """(code bytes, metadata bytes) of `num_quantized` tokens of one head and one batch row, K and V."""
        codes = 2 * num_quantized * head_dim * self.mse_bits // 8
        meta = 2 * num_quantized * 2  # fp16 norms
        if self.qjl:
            codes += 2 * num_quantized * head_dim // 8
            meta += 2 * num_quantized * 2  # fp16 residual norms
        if self.center and num_quantized > 0:
            meta += 2 * head_dim * 2  # fp16 means of K and V
        return codes, meta


class TurboQuantCodec:
    """Quantize / dequantize `[..., D]` vectors in the rotated domain (the reference the kernels are tested on)."""

    def __init__(self, cfg: TurboQuantConfig, head_dim: int, seed: int, device):
        self.cfg, self.d = cfg, head_dim
        self.rotation = random_rotation(head_dim, seed, device)  # P [D, D]
        self.levels = codebook(cfg.mse_bits, head_dim, device)  # [2^b]
        self.edges = (self.levels[1:] + self.levels[:-1]) / 2
        if cfg.qjl:
            gen = torch.Generator().manual_seed(seed + 7919)
            self.sketch = torch.randn(head_dim, head_dim, generator=gen).to(device)  # S [D, D]

    def quantize(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x `[B, H, T, D]` float32 (already centered) -> codes `[B, H, T, D*b/8]`, norms `[B, H, T]` fp16, ..."""
        gamma = x.norm(dim=-1)  # [B, H, T]
        y = (x / gamma.clamp_min(_EPS).unsqueeze(-1)) @ self.rotation.T  # [B, H, T, D], unit rows
        idx = torch.bucketize(y.contiguous(), self.edges)  # [B, H, T, D] in [0, 2^b)
        c = self.levels[idx]
        out = {"codes": pack_bits(idx, self.cfg.mse_bits)}
        if self.cfg.qjl:
            r = y - c
            signs = (r @ self.sketch.T) >= 0  # sign(S r) [B, H, T, D]
            out["qjl"] = pack_bits(signs.to(torch.uint8), 1)
            out["rnorm"] = r.norm(dim=-1).to(torch.float16)
            out["norms"] = gamma.to(torch.float16)
        elif self.cfg.norm_correction:
            out["norms"] = (gamma / c.norm(dim=-1).clamp_min(_EPS)).to(torch.float16)
        else:
            out["norms"] = gamma.to(torch.float16)
        return out

    def dequantize_rotated(self, s: dict[str, torch.Tensor]) -> torch.Tensor:
        """Stored pieces -> reconstructed vectors in the rotated domain, `[B, H, N, D]` float32 (times the norm)."""
        y = self.levels[unpack_bits(s["codes"], self.cfg.mse_bits).long()]
        if self.cfg.qjl:
            signs = unpack_bits(s["qjl"], 1).float() * 2 - 1
            coef = math.sqrt(math.pi / 2) / self.d * s["rnorm"].float().unsqueeze(-1)
            y = y + coef * (signs @ self.sketch)
        return y * s["norms"].float().unsqueeze(-1)

    def dequantize(self, s: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.dequantize_rotated(s) @ self.rotation  # back from the rotated domain: x = y P


class TurboQuantLayer(QuantizedLayer):
    """One layer of `TurboQuantCache`."""

    def __init__(self, method_config: TurboQuantConfig, layer_idx: int = 0):
        super().__init__(method_config, layer_idx)
        names = ("codes", "qjl") if method_config.qjl else ("codes",)
        self.code_storage = tuple(f"{kv}_{n}" for kv in "kv" for n in names)

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        seed = self.cfg.seed + 1000 * self.layer_idx
        self.k_codec = TurboQuantCodec(self.cfg, self.head_dim, seed, self.device)
        self.v_codec = TurboQuantCodec(self.cfg, self.head_dim, seed + 500, self.device)

    def _quantize_block(self, keys, values):
        warn_non_finite(keys, f"key_states of layer {self.layer_idx}")
        warn_non_finite(values, f"value_states of layer {self.layer_idx}")
        out = {}
        for kv, x, codec in (("k", keys, self.k_codec), ("v", values, self.v_codec)):
            for name, t in codec.quantize(self._center(x, kv)).items():
                out[f"{kv}_{name}"] = t
        return out

    def _pieces(self, kv: str) -> dict[str, torch.Tensor]:
        prefix = f"{kv}_"
        return {n[2:]: t for n, t in self.storage.items() if n.startswith(prefix) and n[2:] != "mean"}

    def _dequantize(self, dtype):
        out = []
        for kv, codec in (("k", self.k_codec), ("v", self.v_codec)):
            out.append(self._uncenter(codec.dequantize(self._pieces(kv)), kv).to(dtype))
        return out[0], out[1]


class TurboQuantCache(QuantizedCacheBase):
    """KV cache quantized with TurboQuant (see the module docstring for the algorithm and departures).

    Example::

        cache = TurboQuantCache(model.config, bits=4)
        model.generate(**inputs, past_key_values=cache)
    """

    layer_class = TurboQuantLayer
    config_class = TurboQuantConfig

    def __init__(
        self,
        config=None,
        bits: int = 4,
        residual_length: int = 0,
        flush_size: int = 128,
        seed: int = 0,
        center: bool = True,
        norm_correction: bool = True,
        qjl: bool = False,
    ):
        cfg = TurboQuantConfig(
            bits=bits,
            residual_length=residual_length,
            flush_size=flush_size,
            seed=seed,
            center=center,
            norm_correction=norm_correction,
            qjl=qjl,
        )
        super().__init__(config, cfg)
