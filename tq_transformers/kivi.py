"""KIVI KV cache (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv 2402.02750,
ICML 2024).

Asymmetric min-max quantization, ``scale = (max - min) / (2^b - 1)`` (clamped below by an epsilon), ``zero = min``,
both stored in fp16; the codes are computed against the fp16-rounded scale and zero, so dequantization
``zero + code * scale`` uses exactly what was used to quantize.

- keys, per channel: a group is G consecutive tokens of one channel. Storage ``k_codes`` ``[B, H, N/G, D, G*b/8]``
  (each channel's G codes packed together), ``k_scale`` / ``k_zero`` ``[B, H, N/G, D]``.
- values, per token: groups of G consecutive channels. ``v_codes`` ``[B, H, N, D*b/8]``, ``v_scale`` / ``v_zero``
  ``[B, H, N, D/G]``.

The per-channel zero point removes a key offset shared by the tokens of a group, which is why KIVI survives the key
outlier channels of Qwen2.5 where per-token key grouping (transformers' QuantizedCache) does not.

Departure from the paper: one window rule for keys and values (``base``): the most recent R (= residual_length)
to R + G - 1 tokens stay in full precision and tokens are quantized G at a time. The paper's key residual fills up to
R tokens and is flushed whole; its value window is exactly R tokens.
"""

from __future__ import annotations

import dataclasses

import torch

from .base import QuantizedCacheBase, QuantizedLayer, WindowConfig, check_int, compact, warn_non_finite
from .packing import pack_bits, unpack_bits

_SCALE_EPS = 1e-5


@dataclasses.dataclass
class KIVIConfig(WindowConfig):
    """KIVI settings.

    bits: 2 or 4 (1, 3 and 8 work too).
    group_size: G, tokens per key group and channels per value group; a multiple of 8 that divides head_dim.
    residual_length: R, the minimum number of recent tokens kept in full precision (a multiple of group_size).
    """

    bits: int = 2
    group_size: int = 32
    residual_length: int = 128
    flush_size: int = dataclasses.field(default=0, repr=False)  # always group_size

    def __post_init__(self):
        check_int("bits", self.bits, 1, "an integer in 1..8 (2 and 4 are KIVI's)")
        if self.bits > 8:
            raise ValueError(f"bits must be an integer in 1..8 (2 and 4 are KIVI's), got {self.bits!r}")
        check_int("group_size", self.group_size, 8, "a positive multiple of 8")
        if self.group_size % 8:
            raise ValueError(f"group_size must be a positive multiple of 8, got {self.group_size!r}")
        check_int("residual_length", self.residual_length, 0)
        if self.residual_length % self.group_size:
            raise ValueError(
                f"residual_length must be a multiple of group_size={self.group_size}, got {self.residual_length!r}"
            )
        self.flush_size = self.group_size
        super().__post_init__()

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % self.group_size:
            raise ValueError(
                f"group_size must divide head_dim={head_dim} (values are grouped along head_dim), "
                f"got group_size={self.group_size}"
            )

    def storage_bytes(self, head_dim: int, num_quantized: int) -> tuple[int, int]:
        """(code bytes, metadata bytes) of `num_quantized` tokens (a multiple of group_size), one head and row."""
        codes = 2 * num_quantized * head_dim * self.bits // 8
        key_meta = (num_quantized // self.group_size) * head_dim * 2 * 2  # fp16 scale + zero per channel group
        value_meta = num_quantized * (head_dim // self.group_size) * 2 * 2  # fp16 scale + zero per token group
        return codes, key_meta + value_meta


def minmax_quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of float32 `x` along `dim`: (codes uint8, scale fp16, zero fp16), reduced on `dim`.

    Non-finite entries are left out of the min and max (they cannot spread to the other entries of their group)
    and get code 0.
    """
    finite = torch.isfinite(x)
    lo = torch.where(finite, x, torch.full_like(x, float("inf"))).amin(dim, keepdim=True)
    hi = torch.where(finite, x, torch.full_like(x, float("-inf"))).amax(dim, keepdim=True)
    none = ~torch.isfinite(lo)
    lo, hi = torch.where(none, 0.0, lo), torch.where(none, 0.0, hi)
    qmax = 2**bits - 1
    zero = lo.to(torch.float16)
    scale = ((hi - zero.float()) / qmax).clamp_min(_SCALE_EPS).to(torch.float16)
    codes = torch.round((x - zero.float()) / scale.float()).clamp(0, qmax)
    codes = torch.where(finite, codes, torch.zeros_like(codes)).to(torch.uint8)
    return codes, scale.squeeze(dim), zero.squeeze(dim)


class KIVILayer(QuantizedLayer):
    """One layer of `KIVICache`."""

    code_storage = ("k_codes", "v_codes")

    def _quantize_block(self, keys, values):
        warn_non_finite(keys, f"key_states of layer {self.layer_idx}")
        warn_non_finite(values, f"value_states of layer {self.layer_idx}")
        bits, g = self.cfg.bits, self.cfg.group_size
        b, h, t, d = keys.shape
        # keys: [B, H, T/G, G, D] -> min/max over the G tokens of each channel
        kc, ks, kz = minmax_quantize(keys.float().reshape(b, h, t // g, g, d), bits, dim=3)
        k_codes = pack_bits(kc.transpose(-1, -2), bits)  # [B, H, T/G, D, G*b/8]
        # values: [B, H, T, D/G, G] -> min/max over G channels of each token
        vc, vs, vz = minmax_quantize(values.float().reshape(b, h, t, d // g, g), bits, dim=4)
        v_codes = pack_bits(vc.reshape(b, h, t, d), bits)  # [B, H, T, D*b/8]
        return {"k_codes": k_codes, "k_scale": ks, "k_zero": kz, "v_codes": v_codes, "v_scale": vs, "v_zero": vz}

    def _dequantize_keys(self, codes, scale, zero) -> torch.Tensor:
        g = self.cfg.group_size
        kc = unpack_bits(codes, self.cfg.bits).float()  # [B, H, Ng, D, G]
        k = kc * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
        b, h, ng, d, _ = k.shape
        return k.transpose(-1, -2).reshape(b, h, ng * g, d)

    def _dequantize(self, dtype):
        s = self.storage
        k = self._dequantize_keys(s["k_codes"], s["k_scale"], s["k_zero"])
        b, h, n, d = k.shape
        g = self.cfg.group_size
        vc = unpack_bits(s["v_codes"], self.cfg.bits).float().reshape(b, h, n, d // g, g)
        v = vc * s["v_scale"].float().unsqueeze(-1) + s["v_zero"].float().unsqueeze(-1)
        return k.to(dtype), v.reshape(b, h, n, d).to(dtype)

    def _storage_prefix(self, count):
        """Keys are stored per group of G tokens on dim 2 (`count` a multiple of G), values per token."""
        g = self.cfg.group_size
        return {name: t[:, :, : count // g] if name.startswith("k_") else t[:, :, :count]
                for name, t in self.storage.items()}

    def _truncate_quantized(self, keep):
        """Keep `keep` tokens: whole key groups stay packed, a partly kept group comes back into the window."""
        full = keep // self.cfg.group_size * self.cfg.group_size
        k_all, v_all = self._dequantize(self.dtype)
        back_k = compact(k_all[..., full:keep, :])
        back_v = compact(v_all[..., full:keep, :])
        self.storage = {name: compact(t) for name, t in self._storage_prefix(full).items()}
        self.num_quantized = full
        return back_k, back_v


class KIVICache(QuantizedCacheBase):
    """KV cache quantized with KIVI (see the module docstring).

    Example::

        cache = KIVICache(model.config, bits=2, group_size=32, residual_length=128)
        model.generate(**inputs, past_key_values=cache)
    """

    layer_class = KIVILayer
    config_class = KIVIConfig

    def __init__(self, config=None, bits: int = 2, group_size: int = 32, residual_length: int = 128):
        super().__init__(config, KIVIConfig(bits=bits, group_size=group_size, residual_length=residual_length))
