"""tq_transformers: quantized KV caches for Hugging Face transformers.

    from tq_transformers import TurboQuantCache
    cache = TurboQuantCache(model.config, bits=4)
    model.generate(**inputs, past_key_values=cache)
"""

from .base import QuantizedCacheBase, QuantizedLayer, WindowConfig
from .bonsai import BonsaiCache, BonsaiConfig, BonsaiLayer
from .generation import disable, enable
from .kivi import KIVICache, KIVIConfig, KIVILayer
from .memory import estimate_cache_bytes
from .registry import METHOD_NAMES, get_method, make_cache
from .turboquant import TurboQuantCache, TurboQuantConfig, TurboQuantLayer

__version__ = "0.1.0"

__all__ = [
    "BonsaiCache",
    "BonsaiConfig",
    "BonsaiLayer",
    "KIVICache",
    "KIVIConfig",
    "KIVILayer",
    "METHOD_NAMES",
    "QuantizedCacheBase",
    "QuantizedLayer",
    "TurboQuantCache",
    "TurboQuantConfig",
    "TurboQuantLayer",
    "WindowConfig",
    "disable",
    "enable",
    "estimate_cache_bytes",
    "get_method",
    "make_cache",
]
