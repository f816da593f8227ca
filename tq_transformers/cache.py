"""`QuantizedKVCache`: a thin transformers ``Cache`` over quantized layers, and the method registry it feeds.

A method's cache is a subclass that names three things, and nothing else::

    class TurboQuantCache(QuantizedKVCache):
        method = "turboquant"              # the registry name (enable, make_cache, estimate_cache_bytes, tq-eval)
        config_class = TurboQuantConfig    # the single source of its settings: keyword arguments of the cache

Layers come from ``DynamicCache(config=config)`` (the public way to learn each layer's type on every transformers
version): plain full-attention ``DynamicLayer``s are replaced by ``QuantizedKVLayer``s, sliding-window and other
layers keep their normal class. Without a config, every layer is created lazily, quantized, on its first update.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import ClassVar

import torch
from transformers import Cache, DynamicCache, DynamicLayer, PreTrainedConfig

from .layer import QuantizedKVLayer
from .static_layout import StaticLayout
from .validation import short_repr

__all__ = ["IDENTITY_FIELDS", "QuantizedKVCache", "head_dim_of", "model_identity", "registered_methods"]

_REGISTRY: dict[str, type[QuantizedKVCache]] = {}


def registered_methods() -> dict[str, type[QuantizedKVCache]]:
    """Method name -> cache class, for every subclass that set ``method`` (see ``registry``)."""
    return dict(_REGISTRY)


def head_dim_of(config) -> int | None:
    """The head dim a config declares (``head_dim``, else hidden_size / num_attention_heads), or None."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None)
    if head_dim is None and getattr(text, "hidden_size", None) and getattr(text, "num_attention_heads", None):
        head_dim = text.hidden_size // text.num_attention_heads
    return head_dim


#: the config fields that tell one model's caches from another's (``model_identity``)
IDENTITY_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                   "vocab_size")


def model_identity(config) -> dict:
    """What a cache's contents depend on in a model config: the architecture's sizes (``IDENTITY_FIELDS``), the
    head dim, and the checkpoint's name when known (``name_or_path``; "" when unknown)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    out = {name: getattr(text, name, None) for name in IDENTITY_FIELDS}
    out["head_dim"] = head_dim_of(config)
    out["name_or_path"] = str(getattr(config, "name_or_path", "") or "")
    return out


class QuantizedKVCache(Cache):
    """A transformers ``Cache`` whose full-attention layers are quantized (module docstring).

    Args:
        config: the model's config (``model.config``), or None to create every layer lazily, quantized.
        **settings: the method's settings, the fields of ``config_class`` (e.g. ``bits=4``).
    """

    method: ClassVar[str | None] = None
    config_class: ClassVar[type]
    layer_class: ClassVar[type[QuantizedKVLayer]] = QuantizedKVLayer

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("method")
        if name is not None:
            if name in _REGISTRY and _REGISTRY[name] is not cls:
                raise ValueError(f"method name {name!r} is already used by {_REGISTRY[name].__name__}")
            _REGISTRY[name] = cls

    def __init__(self, config=None, **settings):
        if config is not None and not isinstance(config, PreTrainedConfig):
            raise TypeError(
                f"config must be a transformers PreTrainedConfig (model.config) or None, got {type(config).__name__} "
                f"{short_repr(config)}; method settings are keyword arguments, e.g. "
                f"{type(self).__name__}(model.config, bits=4)"
            )
        self.method_config = self.make_config(**settings)
        if config is not None:
            head_dim = head_dim_of(config)
            if head_dim is not None:
                self.method_config.check_head_dim(head_dim)
            template = DynamicCache(config=config).layers
            layers = [
                self.layer_class(self.method_config, layer_idx=i) if type(layer) is DynamicLayer else layer
                for i, layer in enumerate(template)
            ]
            super().__init__(layers=layers)
            if not self.quantized_layers:
                warnings.warn(
                    f"{type(self).__name__}: the config has no full-attention layer (layer types "
                    f"{sorted({type(layer).__name__ for layer in layers})}), so nothing will be quantized and the "
                    "cache saves no memory",
                    UserWarning,
                    stacklevel=2,
                )
        else:
            super().__init__(layer_class_to_replicate=DynamicLayer)
        #: token ids this cache holds, per batch row, when known (recorded by ``tq_transformers.enable``)
        self.token_ids: torch.Tensor | None = None
        #: the model config this cache was built for (None without one): the fast path checks its attention
        #: implementation, so that a prepared cache cannot silently feed window-only placeholders to plain SDPA
        self.model_config = config
        #: called with each quantized layer created later, lazily, without a config (``fast_attention``)
        self.layer_setup: Callable[[QuantizedKVLayer], None] | None = None
        #: decode steps replayed from CUDA graphs by a model with ``cuda_graphs.install``
        self.cuda_graphs = False

    @classmethod
    def make_config(cls, **settings):
        """The method config of `settings` (a TypeError naming the accepted settings for an unknown one)."""
        fields = [f.name for f in dataclasses.fields(cls.config_class) if f.init]
        unknown = sorted(set(settings) - set(fields))
        if unknown:
            raise TypeError(f"{cls.__name__} got unknown settings {unknown}; accepted: {fields}")
        return cls.config_class(**settings)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Store new states in layer `layer_idx` and return what its attention reads (``QuantizedKVLayer.update``).

        Args:
            key_states / value_states: ``[B, H, T, D]``.
            layer_idx: the decoder layer.
        Returns:
            (keys, values) ``[B, H, n + T, D]``.
        """
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                layer = self.layer_class(self.method_config, layer_idx=len(self.layers))
                if self.layer_setup is not None:
                    self.layer_setup(layer)
                self.layers.append(layer)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the batch rows of every layer.

        Args:
            beam_idx: ``[B]`` the source row of each new row.

        In the static layout (CUDA graphs) the buffers are reordered in place, so the captured graph keeps replaying
        (``StaticLayout.reorder_in_place``); otherwise, or if that is not possible, each layer reorders its own
        tensors (leaving the static layout: the next steps run eagerly until the layout is rebuilt).
        """
        layers = self.quantized_layers
        if layers and len(layers) == len(self.layers) and all(layer.static is not None for layer in layers):
            if StaticLayout.reorder_in_place(layers, beam_idx):
                return
        super().reorder_cache(beam_idx)

    def reset(self):
        super().reset()
        self.token_ids = None

    @property
    def quantized_layers(self) -> list[QuantizedKVLayer]:
        return [layer for layer in self.layers if isinstance(layer, QuantizedKVLayer)]

    def memory_footprint(self) -> dict[str, int]:
        """Bytes held by this cache.

        Returns:
            {"codes", "metadata" (norms, scales, zero points, means), "window" (the quantized layers' full-precision
            window), "unquantized_layers" (sliding-window ones), "total"}, each an int.
        """
        out = {"codes": 0, "metadata": 0, "window": 0, "unquantized_layers": 0}
        for layer in self.layers:
            if isinstance(layer, QuantizedKVLayer):
                for key, value in layer.memory_footprint().items():
                    out[key] += value
            elif getattr(layer, "is_initialized", False) and layer.keys is not None:
                out["unquantized_layers"] += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        out["total"] = sum(out.values())
        return out

    def memory_sharing(self) -> dict[str, int]:
        """The ``memory_footprint()["total"]`` of a fork split into what it holds of its own (its windows, its flushes,
        the unquantized layers) and what it shares with the caches it was forked from or into (``fork``).

        Returns:
            {"own", "shared", "total"}, bytes (own + shared == total).
        """
        shared = sum(layer.memory_sharing()["shared"] for layer in self.quantized_layers)
        total = self.memory_footprint()["total"]
        return {"own": total - shared, "shared": shared, "total": total}

    # ------------------------------------------------------------------------------------------------------------
    # Prefix reuse and persistence (``tq_transformers.fork``, ``tq_transformers.persistence``)
    # ------------------------------------------------------------------------------------------------------------
    def fork(self) -> QuantizedKVCache:
        """A copy that continues independently and shares the quantized history with this cache (copy-on-write: the
        fork pays for its own window and new tokens). ``copy.deepcopy(cache)`` shares the history the same way.

        Returns:
            the new cache (``tq_transformers.fork``).
        """
        from .fork import fork_cache

        return fork_cache(self)

    def save(self, path) -> None:
        """Write this cache to `path` in safetensors (no pickle): packed codes, metadata, windows, counters, the
        method settings, the token ids when known, and a header with the format version, the model's identity and a
        checksum (``tq_transformers.persistence``).

        Args:
            path: the file to write.
        """
        from .persistence import save_cache

        save_cache(self, path)

    @classmethod
    def load(cls, path, config, device="cpu", dtype: torch.dtype | None = None) -> QuantizedKVCache:
        """Read a cache written by ``save``.

        Args:
            path: the file.
            config: the model's config (``model.config``) or the model itself; a ValueError names any mismatch
                with the file's model (layers, layer types, KV heads, head dims, dtype). None: no check (for a
                config-less cache).
            device: where the tensors go.
            dtype: the model's dtype, checked against the file's when given (a model passed as `config` gives
                its own).
        Returns:
            the cache, of the file's class (``QuantizedKVCache.load`` accepts any; a subclass only its own).
        """
        from .persistence import load_cache

        return load_cache(path, config, device=device, dtype=dtype, expected=cls)

    def __repr__(self):
        return f"{type(self).__name__}({self.method_config}, layers={len(self.layers)})"
