"""Constants shared by the methods, named once. Each says where it comes from.

- ``METADATA_DTYPE``: every norm, scale, zero point and centering mean is stored in float16 (the papers' choice:
  TurboQuant's fp16 norm, KIVI's fp16 scale and zero, Q1_0's fp16 scale). The full-precision window keeps the
  model's dtype.
- ``NORM_EPS``: the smallest norm (TurboQuant) or L1 mass (Bonsai's "l2" scale) divided by; a zero vector encodes
  to norm 0 and decodes to the mean.
- ``KIVI_SCALE_EPS``: KIVI's lower clamp of ``(max - min) / (2^b - 1)`` (the paper's code clamps the scale with an
  epsilon; 1e-5 is representable in fp16 (a subnormal), so the fp16 scale is never 0).
- Seeds of the per-layer rotations (docs/METHODS.md, "TurboQuant"): layer ``i`` rotates keys with seed
  ``seed + LAYER_SEED_STRIDE * i`` and values with that ``+ VALUE_SEED_OFFSET``; TurboQuant's QJL sketch uses the
  rotation's seed ``+ QJL_SEED_OFFSET``. The offsets only need to give distinct, reproducible streams.
- ``BITS_STEP``: the rates a TurboQuant side may take between whole bits: multiples of 1/8 (a two-rate channel split
  of a multiple of 8 channels, whole bytes of codes, at every head dim that is a multiple of 64).
- ``CHUNK_TOKENS``: tokens averaged per pass (the centering mean), bounding the float32 temporaries of a long
  prefill's first flush (at 8 x 32K a float32 copy of one layer's keys would be 1 GiB).
- ``FLUSH_CHUNK_VALUES``: values (batch rows x heads x tokens x head dim) quantized per pass of a flush: 2^25, the
  float32 temporaries of 4,096 tokens at 8 x 8 heads x 128 (128 MiB, CHUNK_TOKENS' bound at 8 x 32K), so a batch-1 32K
  prefill of 8 KV heads is one pass per side and layer instead of eight: on a GPU each pass is a compress launch plus
  its host-side Python, and at batch 1 the host was the bottleneck of TurboQuant-4's prefill (its GPU time equals
  DynamicCache's; docs/RESULTS.md, twelfth pass).
"""

from __future__ import annotations

import torch

METADATA_DTYPE = torch.float16
NORM_EPS = 1e-8
KIVI_SCALE_EPS = 1e-5
LAYER_SEED_STRIDE = 1000
VALUE_SEED_OFFSET = 500
QJL_SEED_OFFSET = 7919
CHUNK_TOKENS = 4096
FLUSH_CHUNK_VALUES = 1 << 25
BITS_STEP = 8  # fractional TurboQuant rates are multiples of 1 / BITS_STEP


def layer_seed(seed: int, layer_idx: int) -> int:
    """The seed of layer `layer_idx`'s key rotation (its value rotation adds ``VALUE_SEED_OFFSET``)."""
    return seed + LAYER_SEED_STRIDE * layer_idx


def side_seed(seed: int, layer_idx: int, side: str) -> int:
    """The rotation seed of `side` ("k" or "v") of layer `layer_idx` (``layer_seed``, values + VALUE_SEED_OFFSET)."""
    return layer_seed(seed, layer_idx) + (VALUE_SEED_OFFSET if side == "v" else 0)
