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

from .compile import FixedCapacityLayer
from .layer import QuantizedKVLayer
from .static_layout import StaticLayout
from .validation import check_int, check_mapping, short_repr

__all__ = ["IDENTITY_FIELDS", "LAYER_SETTINGS", "QuantizedKVCache", "cache_dims", "head_dim_of", "mla_latent_dims",
           "model_identity", "registered_methods"]

#: cache keyword arguments that are not a method's settings but choose them per layer (``QuantizedKVCache``)
LAYER_SETTINGS = ("layer_settings", "edge_layers", "edge_settings")

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


def mla_latent_dims(config) -> tuple[int, int] | None:
    """(kv_lora_rank, qk_rope_head_dim) of an MLA model's config (``cache_dims``), else None."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    rank, rope = getattr(text, "kv_lora_rank", None), getattr(text, "qk_rope_head_dim", None)
    return (rank, rope) if isinstance(rank, int) and isinstance(rope, int) else None


def cache_dims(config) -> tuple[int, int, int] | None:
    """(kv_heads, key_dim, value_dim) of what a model's attention layers hand the cache, or None when unknown.

    Most models cache ``[B, num_key_value_heads, T, head_dim]`` keys and values; a config that declares
    ``v_head_dim`` beside ``head_dim`` (MiMo-V2-Flash: 192 and 128) caches values of ``v_head_dim``. MLA models
    (DeepSeek-V2/V3 and their kin in transformers: configs with ``kv_lora_rank``) cache their two latents instead,
    each viewed as one head: the compressed key-value latent (``kv_lora_rank`` wide) as "keys" and the shared rotary
    key (``qk_rope_head_dim``) as "values"; attention expands them after the cache. Layers always check the dims
    their states really have at the first update; this is what a config lets us check (and count) before.

    kv_heads is the model's: under tensor parallelism (``tp_plan``) the config is not changed, and a rank's layers
    receive ``kv_heads / tp_size`` of them (``memory.kv_heads_per_rank``; the layers take the count they receive).
    """
    latents = mla_latent_dims(config)
    if latents is not None:
        return 1, *latents
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    head_dim = head_dim_of(config)
    if head_dim is None:
        return None
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    value_dim = getattr(text, "v_head_dim", None)
    return heads, head_dim, value_dim if isinstance(value_dim, int) and value_dim > 0 else head_dim


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
        layer_settings: per-layer precision: ``{layer_idx: settings}`` or a list of one ``settings`` (or None) per
            decoder layer. A settings dict without ``"method"`` is applied over `**settings` for that layer (e.g.
            ``{0: {"bits": 4}}``); with ``"method"`` it is another method's settings (e.g.
            ``{"method": "turboquant", "bits": 4}``). The window (residual_length, flush_size, sink_tokens) is the
            cache's: every layer keeps it.
        edge_layers: the first and the last `edge_layers` decoder layers use `edge_settings` (a budget rule: those
            layers at a higher precision); `layer_settings` wins where both name a layer. Needs `config`.
        edge_settings: the settings of the edge layers (as in `layer_settings`).
        max_cache_len: None (the default: storage grows with the tokens), or the most tokens the cache will hold
            (prompt and generated): the full-attention layers are then ``compile.FixedCapacityLayer``s, preallocated,
            with a static-shape decode step, and the cache declares ``is_compileable`` (when every layer is one), so
            ``generate`` compiles the decode step as for a ``StaticCache``. Needs `config` and ``sink_tokens=0``;
            decodes through "tq_fused" attention (``fast_attention.install``).
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

    def __init__(self, config=None, max_cache_len: int | None = None, **settings):
        if config is not None and not isinstance(config, PreTrainedConfig):
            raise TypeError(
                f"config must be a transformers PreTrainedConfig (model.config) or None, got {type(config).__name__} "
                f"{short_repr(config)}; method settings are keyword arguments, e.g. "
                f"{type(self).__name__}(model.config, bits=4)"
            )
        if max_cache_len is not None:
            check_int("max_cache_len", max_cache_len, 1)
            if config is None:
                raise ValueError(f"max_cache_len={max_cache_len} (a fixed-capacity cache) needs the model config: "
                                 f"{type(self).__name__}(model.config, max_cache_len=...)")
        #: the most tokens the cache holds (``max_cache_len``: a fixed-capacity, compileable cache), or None (storage
        #: grows). Not named max_cache_len: transformers 5.17's Cache has a read-only property of that name.
        self.fixed_capacity = max_cache_len
        template = DynamicCache(config=config).layers if config is not None else None
        self.method_config, self.layer_configs = self.make_layer_configs(
            None if template is None else len(template), **settings)
        if config is not None:
            dims = cache_dims(config)
            if dims is not None:
                for i, cfg in {-1: self.method_config, **self.layer_configs}.items():
                    try:
                        cfg.check_dims(*dims[1:])
                    except ValueError as err:
                        where = "" if i < 0 else f" (layer {i}'s settings)"
                        raise ValueError(f"{type(self).__name__}: the model caches keys of head_dim {dims[1]} and "
                                         f"values of head_dim {dims[2]}{where}: {err}") from None
            layers = [
                self.make_layer(i, max_cache_len, config) if type(layer) is DynamicLayer else layer
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
            raise TypeError(f"{cls.__name__} got unknown settings {unknown}; accepted: {fields + list(LAYER_SETTINGS)}")
        return cls.config_class(**settings)

    @classmethod
    def make_layer_configs(cls, num_layers: int | None, layer_settings=None, edge_layers: int = 0,
                           edge_settings: dict | None = None, **settings):
        """The base config and the per-layer ones (class docstring: `layer_settings`, `edge_layers`).

        Args:
            num_layers: decoder layers of the model (None without a config: lists and `edge_layers` then fail).
        Returns:
            (base config, {layer_idx: config} for the layers that differ).
        """
        base = cls.make_config(**settings)
        overrides: dict[int, dict] = {}
        check_int("edge_layers", edge_layers, 0)
        if edge_layers:
            if num_layers is None:
                raise ValueError(f"edge_layers={edge_layers} needs the model config (the number of layers); pass "
                                 "model.config, or layer_settings={layer_idx: settings}")
            if 2 * edge_layers > num_layers:
                raise ValueError(f"edge_layers must be at most half the {num_layers} layers ({num_layers // 2}), "
                                 f"got {edge_layers}")
            check_mapping("edge_settings", edge_settings, "a dict of settings with edge_layers > 0")
            for i in [*range(edge_layers), *range(num_layers - edge_layers, num_layers)]:
                overrides[i] = edge_settings
        elif edge_settings is not None:
            raise ValueError(f"edge_settings needs edge_layers > 0, got edge_layers=0 and edge_settings="
                             f"{short_repr(edge_settings)}")
        if isinstance(layer_settings, (list, tuple)):
            if num_layers is not None and len(layer_settings) != num_layers:
                raise ValueError(f"layer_settings must have one entry per decoder layer ({num_layers}), got "
                                 f"{len(layer_settings)}")
            layer_settings = {i: entry for i, entry in enumerate(layer_settings) if entry is not None}
        elif layer_settings is not None and not isinstance(layer_settings, dict):
            raise TypeError(f"layer_settings must be a dict {{layer_idx: settings}} or a list of settings (or None) "
                            f"per layer, got {type(layer_settings).__name__} {short_repr(layer_settings)}")
        for i, entry in (layer_settings or {}).items():
            limit = f"0..{num_layers - 1}" if num_layers is not None else ">= 0"
            if isinstance(i, bool) or not isinstance(i, int) or i < 0 or (num_layers is not None and i >= num_layers):
                raise ValueError(f"layer_settings keys must be decoder layer indices ({limit}), got {i!r}")
            check_mapping(f"layer_settings[{i}]", entry, "a dict of settings")
            overrides[i] = entry
        configs = {}
        for i, entry in overrides.items():
            cfg = cls.override_config(base, settings, entry)
            if cfg.window != base.window:
                raise ValueError(
                    f"layer {i}'s settings change the window to (residual_length, flush_size, sink_tokens) = "
                    f"{cfg.window}, the cache's is {base.window}: the window is the same in every layer"
                )
            configs[i] = cfg
        return base, configs

    @classmethod
    def override_config(cls, base, settings: dict, entry: dict):
        """The config of a layer whose `entry` (``layer_settings``) applies over the cache's `settings`."""
        if "method" not in entry:
            return cls.make_config(**{**settings, **entry})
        rest = {k: v for k, v in entry.items() if k != "method"}
        method = _REGISTRY.get(entry["method"])
        if method is None:
            raise ValueError(f"method must be one of {tuple(_REGISTRY)}, got {entry['method']!r} (in layer_settings)")
        window = {"residual_length": base.residual_length, "flush_size": base.flush_size,
                  "sink_tokens": base.sink_tokens}
        accepted = {f.name for f in dataclasses.fields(method.config_class) if f.init}
        return method.make_config(**{k: v for k, v in window.items() if k in accepted}, **rest)

    def make_layer(self, layer_idx: int, max_cache_len: int | None = None, model_config=None) -> QuantizedKVLayer:
        """The quantized layer of decoder layer `layer_idx`: a ``layer_class``, or with `max_cache_len` a
        ``FixedCapacityLayer`` of that capacity for the model of `model_config`."""
        if max_cache_len is None:
            return self.layer_class(self.config_of(layer_idx), layer_idx=layer_idx)
        return FixedCapacityLayer(self.config_of(layer_idx), layer_idx=layer_idx, max_cache_len=max_cache_len,
                                  model_config=model_config)

    def config_of(self, layer_idx: int):
        """The method config of decoder layer `layer_idx` (``layer_settings``)."""
        return self.layer_configs.get(layer_idx, self.method_config)

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
                layer = self.layer_class(self.config_of(len(self.layers)), layer_idx=len(self.layers))
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
