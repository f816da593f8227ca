"""KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv 2402.02750, ICML 2024).

Asymmetric min-max quantization (docs/METHODS.md, "KIVI"): ``scale = (max - min) / (2^b - 1)`` (clamped below by
``KIVI_SCALE_EPS``), ``zero = min``, both fp16; the codes are computed against the fp16-rounded scale and zero, so
dequantization ``zero + code * scale`` uses exactly what was used to quantize.

- keys, per channel: a group is G consecutive tokens of one channel (``formats.ChannelAffinePacked``: ``codes``
  ``[B, H, N/G, G, D*b/8]``, each token's codes packed along its channels; ``scale`` / ``zero`` ``[B, H, N/G, D]``).
- values, per token: groups of G consecutive channels (``formats.TokenAffinePacked``: ``codes`` ``[B, H, N, D*b/8]``,
  ``scale`` / ``zero`` ``[B, H, N, D/G]``).

The per-channel zero point removes a key offset shared by the tokens of a group, which is why KIVI survives the key
outlier channels of Qwen2.5 where per-token key grouping (transformers' QuantizedCache) does not.

Option (off by default, the paper's quantizer otherwise): ``fit_iterations`` > 0 refits each group's scale and zero
by least squares (``fit_range``): the same format, bytes and dequantization, a smaller squared error per group.
Measured on the real model (docs/RESULTS.md, "KIVI-2 at 1K within the method"): alone it lowers attention fidelity
(it clips the sink token's outliers); with 4 exact sink tokens it raises fidelity to 99.11% but worsens KL, so it
stays off.

Departure from the paper: one window rule for keys and values (``layer``): the most recent R (= residual_length) to
R + G - 1 tokens stay in full precision and tokens are quantized G at a time. The paper's key residual fills up to R
tokens and is flushed whole; its value window is exactly R tokens.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import kernels
from ..cache import QuantizedKVCache
from ..codec import Codec
from ..constants import KIVI_SCALE_EPS, METADATA_DTYPE
from ..formats import ChannelAffinePacked, TokenAffinePacked
from ..packing import pack_bits
from ..validation import check_int
from ..window import WindowConfig

__all__ = ["KIVICache", "KIVIConfig", "KIVIKeyCodec", "KIVIValueCodec", "fit_range", "kivi_encode_keys",
           "kivi_encode_values", "minmax_quantize"]


@dataclasses.dataclass
class KIVIConfig(WindowConfig):
    """KIVI settings (the keyword arguments of ``KIVICache``).

    bits: 2 or 4 (1, 3 and 8 work too), keys and values.
    key_bits / value_bits: the width of keys / values alone (None: ``bits``), integers in 1..8.
    group_size: G, tokens per key group and channels per value group; a multiple of 8 that divides head_dim.
    residual_length: R, the fewest recent tokens kept in full precision (a multiple of group_size).
    sink_tokens: the first tokens kept exact (``window.WindowConfig``).
    fit_iterations: 0 (the paper's min-max range) or the rounds of least-squares refit of every group's scale and
        zero (``fit_range``); the format, the bytes and the dequantization are the same.
    The flush size is always group_size.
    """

    bits: int = 2
    key_bits: int | None = None
    value_bits: int | None = None
    group_size: int = 32
    residual_length: int = 128
    fit_iterations: int = 0
    flush_size: int = dataclasses.field(default=0, init=False, repr=False)

    def __post_init__(self):
        for name in ("bits", "key_bits", "value_bits"):
            value = getattr(self, name)
            if name == "bits" or value is not None:
                check_int(name, value, 1, "an integer in 1..8 (2 and 4 are KIVI's; fractional rates are "
                          "TurboQuant's)", maximum=8)
        check_int("group_size", self.group_size, 8, "a positive multiple of 8")
        if self.group_size % 8:
            raise ValueError(f"group_size must be a positive multiple of 8, got {self.group_size!r}")
        check_int("residual_length", self.residual_length, 0)
        if self.residual_length % self.group_size:
            raise ValueError(
                f"residual_length must be a multiple of group_size={self.group_size}, got {self.residual_length!r}"
            )
        check_int("fit_iterations", self.fit_iterations, 0,
                  "an integer >= 0 (0: the paper's min-max range; n: n least-squares refits of scale and zero)")
        self.flush_size = self.group_size
        super().__post_init__()

    def side_bits(self, side: str) -> int:
        """The width of `side` ("k" or "v"): ``key_bits`` / ``value_bits``, else ``bits``."""
        own = self.key_bits if side == "k" else self.value_bits
        return self.bits if own is None else own

    def token_multiple(self, side: str) -> int:
        return self.group_size if side == "k" else 1

    def check_dim(self, side: str, dim: int) -> None:
        if dim % self.group_size:
            ok = [g for g in range(8, dim + 1, 8) if dim % g == 0]
            raise ValueError(
                f"group_size must divide head_dim={dim} ({'keys' if side == 'k' else 'values'} are grouped along "
                f"head_dim), got group_size={self.group_size}; group sizes that work: {ok}"
            )

    def make_codec(self, side, dim, layer_idx, device):
        codec = KIVIKeyCodec if side == "k" else KIVIValueCodec
        return codec(self.side_bits(side), self.group_size, self.fit_iterations)

    def side_bytes(self, side: str, dim: int, num_quantized: int) -> tuple[int, int]:
        item = torch.empty((), dtype=METADATA_DTYPE).element_size()
        codes = num_quantized * dim * self.side_bits(side) // 8
        if side == "k":
            return codes, (num_quantized // self.group_size) * dim * 2 * item  # scale + zero per channel group
        return codes, num_quantized * (dim // self.group_size) * 2 * item  # scale + zero per token group


def minmax_quantize(x: torch.Tensor, bits: int, dim: int,
                    fit_iterations: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of float32 `x` along `dim`: (codes uint8, scale fp16, zero fp16), reduced on `dim`.

    Non-finite entries are left out of the min and max (they cannot spread to the other entries of their group)
    and get code 0. With `fit_iterations` > 0 the min-max scale and zero are refined by ``fit_range``; each group
    keeps the refit where its squared error, after the fp16 rounding of scale and zero, is below the min-max one's
    (so no group loses). The codes are always computed against the fp16 scale and zero.

    Args:
        x: float32, any shape; groups run along `dim`.
        bits: code width, 1..8.
        dim: the dimension reduced (the group).
        fit_iterations: least-squares refits of scale and zero (0: the paper's min-max).
    Returns:
        (codes uint8 of `x`'s shape, scale fp16 and zero fp16 of `x`'s shape without `dim`).
    """
    finite = torch.isfinite(x)
    lo = torch.where(finite, x, torch.full_like(x, float("inf"))).amin(dim, keepdim=True)
    hi = torch.where(finite, x, torch.full_like(x, float("-inf"))).amax(dim, keepdim=True)
    none = ~torch.isfinite(lo)
    lo, hi = torch.where(none, 0.0, lo), torch.where(none, 0.0, hi)
    qmax = 2**bits - 1
    zero = lo.to(METADATA_DTYPE)
    scale = ((hi - zero.float()) / qmax).clamp_min(KIVI_SCALE_EPS).to(METADATA_DTYPE)
    codes = _codes(x, finite, zero, scale, qmax)
    if fit_iterations:
        clean = torch.where(finite, x, 0.0)
        fit_zero, fit_scale = fit_range(clean, finite, lo, scale.float(), qmax, dim, fit_iterations)
        fit_zero = fit_zero.to(METADATA_DTYPE)
        fit_scale = fit_scale.clamp_min(KIVI_SCALE_EPS).to(METADATA_DTYPE)
        fit_codes = _codes(x, finite, fit_zero, fit_scale, qmax)
        # keep the fit where it is better after the fp16 rounding of its scale and zero (a group never loses)
        better = _squared_error(clean, finite, fit_codes, fit_zero, fit_scale, dim) < \
            _squared_error(clean, finite, codes, zero, scale, dim)
        zero, scale = torch.where(better, fit_zero, zero), torch.where(better, fit_scale, scale)
        codes = torch.where(better, fit_codes, codes)
    return codes, scale.squeeze(dim), zero.squeeze(dim)


def _codes(x, finite, zero, scale, qmax: int) -> torch.Tensor:
    """uint8 codes of `x` against the fp16 `zero` / `scale` (non-finite entries: 0)."""
    codes = torch.round((x - zero.float()) / scale.float()).clamp(0, qmax)
    return torch.where(finite, codes, torch.zeros_like(codes)).to(torch.uint8)


def _squared_error(x, finite, codes, zero, scale, dim: int) -> torch.Tensor:
    """Per group: the squared error of the finite entries of `x` decoded from `codes`, `zero`, `scale`."""
    err = (zero.float() + codes.float() * scale.float() - x) ** 2
    return torch.where(finite, err, torch.zeros_like(err)).sum(dim, keepdim=True)


def fit_range(x: torch.Tensor, weight: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, qmax: int, dim: int,
              iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares scale and zero of a uniform grid, per group (Lloyd's iteration restricted to uniform levels).

    Each round assigns every entry its nearest level, ``clamp(round((x - zero) / scale), 0, qmax)``, then solves
    ``min over (zero, scale) of sum(w * (x - zero - code * scale)^2)`` in closed form (a line fit of x on the codes).
    Both steps can only lower the group's squared error, so it never exceeds the min-max start's (before the fp16
    rounding of the result, which ``minmax_quantize`` checks); a group whose codes are all equal keeps its previous
    scale and zero.

    Args:
        x: float32 entries (non-finite ones replaced by 0), groups along `dim`.
        weight: bool or float, `x`'s shape: which entries count (the finite ones).
        zero / scale: float32 start (min and (max - min) / qmax), `x`'s shape with `dim` of size 1.
        qmax: the largest code, 2^bits - 1.
        dim: the group dimension.
        iterations: rounds.
    Returns:
        (zero, scale) float32, the shapes of the start.
    """
    w = weight.float()
    n, sx = w.sum(dim, keepdim=True), (w * x).sum(dim, keepdim=True)
    for _ in range(iterations):
        c = torch.round((x - zero) / scale).clamp(0, qmax) * w
        sc, scc, sxc = c.sum(dim, keepdim=True), (c * c).sum(dim, keepdim=True), (c * x).sum(dim, keepdim=True)
        det = n * scc - sc * sc
        ok = det > 0
        safe = torch.where(ok, det, torch.ones_like(det))
        new_scale = (n * sxc - sc * sx) / safe
        ok = ok & (new_scale > 0)
        new_zero = (sx - new_scale * sc) / torch.where(n > 0, n, torch.ones_like(n))
        zero, scale = torch.where(ok, new_zero, zero), torch.where(ok, new_scale, scale)
    return zero, scale


def kivi_encode_keys(x: torch.Tensor, bits: int, group_size: int, fit_iterations: int = 0):
    """Keys per channel over groups of G tokens, the reference of ``kernels.kivi_compress_keys``.

    Args:
        x: ``[B, H, T, D]``, T a multiple of G.
        bits / group_size: the code width and G.
        fit_iterations: ``minmax_quantize``'s (0: the paper's min-max; the kernels' only setting).
    Returns:
        (codes uint8 ``[B, H, T/G, G, D*b/8]`` (token-major inside a group: a token's codes are one row, as the
        decode kernels read them), scale fp16 ``[B, H, T/G, D]``, zero fp16 ``[B, H, T/G, D]``).
    """
    b, h, t, d = x.shape
    codes, scale, zero = minmax_quantize(x.float().reshape(b, h, t // group_size, group_size, d), bits, dim=3,
                                         fit_iterations=fit_iterations)
    return pack_bits(codes, bits), scale, zero


def kivi_encode_values(x: torch.Tensor, bits: int, group_size: int, fit_iterations: int = 0):
    """Values per token over groups of G channels, the reference of ``kernels.kivi_compress_values``.

    Args:
        x: ``[B, H, T, D]``.
        bits / group_size: the code width and G.
        fit_iterations: ``minmax_quantize``'s (0: the paper's min-max; the kernels' only setting).
    Returns:
        (codes uint8 ``[B, H, T, D*b/8]``, scale fp16 ``[B, H, T, D/G]``, zero fp16 ``[B, H, T, D/G]``).
    """
    b, h, t, d = x.shape
    codes, scale, zero = minmax_quantize(x.float().reshape(b, h, t, d // group_size, group_size), bits, dim=4,
                                         fit_iterations=fit_iterations)
    return pack_bits(codes.reshape(b, h, t, d), bits), scale, zero


class _KIVICodec(Codec):
    code_pieces = ("codes",)
    encoder = None  # the PyTorch encoder
    kernel = ""  # the name of the matching function in ``kernels``

    def __init__(self, bits: int, group_size: int, fit_iterations: int = 0):
        super().__init__(center=False)
        self.bits, self.group_size, self.fit_iterations = bits, group_size, fit_iterations

    def encode(self, x, pieces, use_kernels=False):
        # the compress kernels compute the paper's min-max range only; a refit range is encoded in PyTorch
        if use_kernels and not self.fit_iterations and x.is_cuda and kernels.triton_available() and \
                kernels.kivi_compress_supported(x.shape[-1], self.bits, self.group_size):
            codes, scale, zero = getattr(kernels, self.kernel)(x, self.bits, self.group_size)
        else:
            codes, scale, zero = type(self).encoder(x, self.bits, self.group_size, self.fit_iterations)
        return {"codes": codes, "scale": scale, "zero": zero}


class KIVIKeyCodec(_KIVICodec):
    """KIVI keys: per channel, groups of G tokens (a flush is a whole number of groups)."""

    encoder = staticmethod(kivi_encode_keys)
    kernel = "kivi_compress_keys"

    def __init__(self, bits: int, group_size: int, fit_iterations: int = 0):
        super().__init__(bits, group_size, fit_iterations)
        self.tokens_per_entry = group_size

    def packed(self, pieces):
        return ChannelAffinePacked(pieces["codes"], pieces["scale"], pieces["zero"], self.bits, self.group_size)


class KIVIValueCodec(_KIVICodec):
    """KIVI values: per token, groups of G channels."""

    encoder = staticmethod(kivi_encode_values)
    kernel = "kivi_compress_values"

    def packed(self, pieces):
        return TokenAffinePacked(pieces["codes"], pieces["scale"], pieces["zero"], self.bits, self.group_size)


class KIVICache(QuantizedKVCache):
    """KV cache quantized with KIVI (module docstring: the algorithm and where we depart from the paper).

    Args:
        config: ``model.config`` or None.
        **settings: ``KIVIConfig`` fields: bits (2), group_size (32), residual_length (128).

    Example::

        cache = KIVICache(model.config, bits=2, group_size=32, residual_length=128)
        model.generate(**inputs, cache=cache)      # past_key_values=cache before transformers 5.24
    """

    method = "kivi"
    config_class = KIVIConfig
