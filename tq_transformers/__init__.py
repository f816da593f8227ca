"""tq_transformers: quantized KV caches for Hugging Face transformers.

    from tq_transformers import TurboQuantCache
    cache = TurboQuantCache(model.config, bits=4)
    model.generate(**inputs, cache=cache)          # past_key_values=cache before transformers 5.24
"""

from .cache import QuantizedKVCache
from .codec import Codec
from .compile import FixedCapacityLayer
from .fork import distinct_bytes
from .formats import ChannelAffinePacked, CodebookPacked, SplitCodebookPacked, TokenAffinePacked
from .generation import disable, enable
from .layer import QuantizedKVLayer
from .memory import estimate_cache_bytes, kv_heads_per_rank
from .methods.bonsai import BonsaiCache, BonsaiConfig
from .methods.kivi import KIVICache, KIVIConfig
from .methods.mixed import MixedCache, MixedConfig
from .methods.turboquant import TurboQuantCache, TurboQuantConfig
from .persistence import load_cache, save_cache
from .registry import METHOD_NAMES, get_method, make_cache
from .window import WindowConfig

__version__ = "0.1.0"

__all__ = [
    "METHOD_NAMES",
    "BonsaiCache",
    "BonsaiConfig",
    "ChannelAffinePacked",
    "Codec",
    "CodebookPacked",
    "FixedCapacityLayer",
    "KIVICache",
    "KIVIConfig",
    "MixedCache",
    "MixedConfig",
    "QuantizedKVCache",
    "QuantizedKVLayer",
    "SplitCodebookPacked",
    "TokenAffinePacked",
    "TurboQuantCache",
    "TurboQuantConfig",
    "WindowConfig",
    "disable",
    "distinct_bytes",
    "enable",
    "estimate_cache_bytes",
    "get_method",
    "kv_heads_per_rank",
    "load_cache",
    "make_cache",
    "save_cache",
]
