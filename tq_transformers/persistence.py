"""Saving and loading a quantized cache in safetensors (no pickle): keep a prefilled document and continue later.

    cache.save("contract.tqkv")                                            # after prefilling a long document
    cache = TurboQuantCache.load("contract.tqkv", model.config, device="cuda")
    model.generate(input_ids, cache=cache, ...)                            # input_ids: the document's ids + more

The file is one safetensors file:

- tensors: ``layers.<i>.<attribute>`` for each tensor attribute of layer ``i`` and ``layers.<i>.<attribute>.<key>``
  for each dict of tensors (a quantized layer: the window ``keys`` / ``values`` and every packed piece of
  ``storage``, shared fork segments joined; a sliding-window layer: its window), and ``token_ids`` when the cache
  knows them (``tq_transformers.enable`` records them: a loaded cache then continues a conversation the same way);
- the header's metadata, strings: ``format`` and ``format_version``; ``cache``, JSON: the cache class, its method
  name and settings; ``model``, JSON: the model's identity (layer count, each layer's type, KV heads and key / value
  head dims, the dtype, the batch size, and the config's sizes: ``cache.model_identity``); ``layers``, JSON: each
  layer's plain attributes (counters, head dims, window size settings) and its method config; ``checksum``:
  SHA-256 of all of the above and of every tensor's name, dtype, shape and bytes.

What a layer saves is generic: every public attribute except those it declares transient
(``QuantizedKVLayer.transient_attributes``, ``state``); transformers' own layers save their public attributes but the
dtype and device. A new attribute flows through as long as it is a tensor, a dict of tensors or a plain value.

Loading rebuilds the cache from the given model config and the saved settings, checks the file against it (a
ValueError names the first mismatch: class, layer count, layer type, KV heads, head dims, dtype, a layer's settings),
verifies the checksum (a truncated or corrupted file raises a ValueError, never a cache that answers wrong), and
restores every layer. The file's size is ``memory_footprint()["total"]`` plus the token ids plus the safetensors
header (tested); a cache in the CUDA-graph static layout saves exactly its tokens, not its reserved capacity.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch

from .cache import QuantizedKVCache, cache_dims, model_identity, registered_methods
from .compile import FixedCapacityLayer
from .layer import QuantizedKVLayer, compact
from .memory import kv_heads_per_rank
from .methods.mixed import WINDOW_FIELDS as _WINDOW_FIELDS

__all__ = ["FORMAT", "FORMAT_VERSION", "load_cache", "save_cache"]

FORMAT = "tq_transformers.cache"
FORMAT_VERSION = 1
#: attributes of transformers' own layers that are not saved (rebuilt by ``lazy_initialization`` at load)
_TRANSIENT = ("dtype", "device")
#: plain layer attributes set at construction from the config, checked at load
_IDENTITY = ("layer_idx", "sliding_window")
_TOKEN_IDS = "token_ids"
_PLAIN = (int, float, bool, str, type(None))


# ----------------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------------
def save_cache(cache: QuantizedKVCache, path) -> None:
    """Write `cache` to `path` (module docstring).

    Args:
        cache: a tq_transformers cache.
        path: the file to write (overwritten).
    """
    from safetensors.torch import save_file

    if not isinstance(cache, QuantizedKVCache):
        raise TypeError(f"cache must be a tq_transformers cache, got {type(cache).__name__}")
    tensors, layers, identity = {}, [], []
    for i, layer in enumerate(cache.layers):
        entry = {"class": type(layer).__name__, "plain": {}, "tensors": [], "dicts": {}}
        for name, value in _layer_state(layer).items():
            key = f"layers.{i}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = _contiguous(value)
                entry["tensors"].append(name)
            elif isinstance(value, dict) and all(isinstance(t, torch.Tensor) for t in value.values()):
                tensors.update({f"{key}.{k}": _contiguous(t) for k, t in value.items()})
                entry["dicts"][name] = list(value)
            elif isinstance(value, _PLAIN):
                entry["plain"][name] = value
            else:
                raise TypeError(
                    f"layer {i} ({type(layer).__name__}) attribute {name!r} is a {type(value).__name__}, which a saved "
                    "cache cannot hold (tensors, dicts of tensors and plain values only); list it in the layer's "
                    "transient_attributes if it is rebuilt from the config"
                )
        if isinstance(layer, QuantizedKVLayer):
            entry["config"] = _settings(layer.cfg)
        layers.append(entry)
        identity.append(_layer_identity(layer))
    if cache.token_ids is not None:
        tensors[_TOKEN_IDS] = _contiguous(cache.token_ids)
    windows = [layer.keys for layer in cache.layers if getattr(layer, "is_initialized", False)]
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "cache": _dumps({"class": type(cache).__name__, "method": cache.method,
                         "settings": _settings(cache.method_config), "layer_settings": _layer_overrides(cache),
                         "max_cache_len": cache.fixed_capacity}),
        "model": _dumps({"num_layers": len(cache.layers), "layers": identity,
                         "dtype": str(windows[0].dtype) if windows else None,
                         "batch_size": windows[0].shape[0] if windows else None,
                         "config": None if cache.model_config is None else model_identity(cache.model_config)}),
        "layers": _dumps(layers),
    }
    metadata["checksum"] = _checksum(metadata, tensors)
    save_file(tensors, os.fspath(path), metadata=metadata)


def _layer_state(layer) -> dict:
    if isinstance(layer, QuantizedKVLayer):
        return layer.state()
    return {name: value for name, value in vars(layer).items()
            if not name.startswith("_") and name not in _TRANSIENT}


def _layer_identity(layer) -> dict:
    out = {"type": type(layer).__name__}
    if getattr(layer, "is_initialized", False):
        out.update(kv_heads=layer.keys.shape[1], key_dim=layer.keys.shape[-1], value_dim=layer.values.shape[-1])
    return out


def _method_of(cfg) -> str:
    """The registered method name whose config class `cfg` is."""
    for name, cls in registered_methods().items():
        if type(cfg) is cls.config_class:
            return name
    raise TypeError(f"a saved cache holds configs of registered methods only, got a {type(cfg).__name__}")


def _settings(cfg) -> dict:
    """A method config's settings as plain values: a nested config (a mixed cache's sides) as the dict
    ``{"method": name, **settings}`` its cache accepts (without the window, which is the outer config's)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = {"method": _method_of(value),
                     **{k: v for k, v in _settings(value).items() if k not in _WINDOW_FIELDS}}
        out[f.name] = value
    return out


def _layer_overrides(cache) -> dict:
    """The per-layer configs that differ from the cache's (``layer_settings``), as plain ``layer_settings``."""
    out = {}
    for i, cfg in cache.layer_configs.items():
        entry = _settings(cfg)
        if type(cfg) is not type(cache.method_config):
            entry = {"method": _method_of(cfg), **{k: v for k, v in entry.items() if k not in _WINDOW_FIELDS}}
        out[str(i)] = entry
    return out


def _dumps(value) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"a saved cache holds plain values only (method settings, counters): {e}") from None


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` as a contiguous tensor owning exactly its bytes (a view is copied: safetensors refuses tensors that share
    a storage, e.g. the views of the static layout's buffers)."""
    return compact(t.detach())


def _checksum(metadata: dict, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------
def load_cache(path, config, device="cpu", dtype: torch.dtype | None = None,
               expected: type = QuantizedKVCache) -> QuantizedKVCache:
    """Read a cache written by ``save_cache`` (module docstring; ``QuantizedKVCache.load``).

    Args:
        path: the file.
        config: the model's config, the model itself (its dtype is then checked too), or None (no model check; every
            layer of the file must be quantized).
        device: where the tensors go.
        dtype: the model's dtype, checked against the file's when given.
        expected: the cache class asked for (``QuantizedKVCache``: any).
    Returns:
        the cache.
    """
    from transformers import PreTrainedConfig, PreTrainedModel

    tp_size = 1
    if isinstance(config, PreTrainedModel):
        dtype = config.dtype if dtype is None else dtype
        tp_size = getattr(config, "tp_size", None) or 1  # a tensor-parallel rank caches kv_heads / tp_size heads
        config = config.config
    if config is not None and not isinstance(config, PreTrainedConfig):
        raise TypeError(f"config must be a transformers PreTrainedConfig, a model or None, got {type(config).__name__}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    metadata, tensors = _read(path)
    head = _parse(metadata, path)
    cache_cls = _cache_class(head["cache"], expected, path)
    model = head["model"]
    if dtype is not None and model["dtype"] is not None and model["dtype"] != str(dtype):
        raise ValueError(f"{path}: the cache was saved from a model in {model['dtype']}, the model is in {dtype}")
    settings = dict(head["cache"]["settings"])
    overrides = head["cache"].get("layer_settings") or {}
    if overrides:
        settings["layer_settings"] = {int(i): entry for i, entry in overrides.items()}
    if head["cache"].get("max_cache_len") is not None:  # a fixed-capacity cache (tq_transformers.compile)
        settings["max_cache_len"] = head["cache"]["max_cache_len"]
    if config is not None:
        cache = cache_cls(config, **settings)
        _check_model(cache, config, model, path, tp_size)
    else:
        cache = cache_cls(**settings)
        for i, entry in enumerate(head["layers"]):
            if entry["class"] != cache.layer_class.__name__:
                raise ValueError(f"{path}: layer {i} is a {entry['class']}; loading it needs the model's config")
            cache.layers.append(cache.layer_class(cache.method_config, layer_idx=i))
    for i, (layer, entry) in enumerate(zip(cache.layers, head["layers"])):
        _restore(layer, i, entry, tensors, device, path)
        if isinstance(layer, FixedCapacityLayer):
            layer.enter_fixed()  # into its buffers: the next decode step is a static-shape one
    if _TOKEN_IDS in tensors:
        cache.token_ids = tensors[_TOKEN_IDS].to(device)
    return cache


def _read(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no saved cache at {path!r}")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path, device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{path} is not a complete safetensors file (truncated or corrupted): {e}") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a saved tq_transformers cache (format {metadata.get('format')!r}, expected "
                         f"{FORMAT!r})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(f"{path}: format version {metadata.get('format_version')!r}, this tq_transformers reads "
                         f"version {FORMAT_VERSION}")
    if metadata.get("checksum") != _checksum(metadata, tensors):
        raise ValueError(f"{path}: checksum mismatch, the file is corrupted (its tensors or header changed after "
                         "saving)")
    return metadata, tensors


def _parse(metadata: dict, path) -> dict:
    try:
        return {key: json.loads(metadata[key]) for key in ("cache", "model", "layers")}
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the header is incomplete or corrupted ({e})") from None


def _cache_class(head: dict, expected: type, path) -> type:
    found = registered_methods().get(head["method"])
    if found is None or found.__name__ != head["class"]:
        raise ValueError(f"{path}: the file holds a {head['class']} (method {head['method']!r}), which is not a "
                         f"registered cache: {sorted(registered_methods())}")
    if expected is not QuantizedKVCache and not issubclass(found, expected):
        raise ValueError(f"{path} holds a {found.__name__}, not a {expected.__name__}: load it with "
                         f"{found.__name__}.load or QuantizedKVCache.load")
    return found


def _check_model(cache, config, model: dict, path, tp_size: int = 1) -> None:
    """A ValueError naming the first difference between the file's model and `config` (``cache`` built from it), on a
    rank of `tp_size` tensor-parallel ranks (``model.tp_size``: each caches its share of the KV heads)."""
    if model["num_layers"] != len(cache.layers):
        raise ValueError(f"{path}: the cache was saved from a model of {model['num_layers']} layers, the config has "
                         f"{len(cache.layers)}")
    saved_config, given = model.get("config") or {}, model_identity(config)
    for name, value in saved_config.items():  # the checkpoint's name may differ between machines: not compared
        if name != "name_or_path" and value is not None and given.get(name) is not None and value != given[name]:
            raise ValueError(f"{path}: the cache was saved from a model with {name}={value!r}, the config has "
                             f"{given[name]!r}")
    heads, key_dim, value_dim = cache_dims(config) or (None, None, None)  # what the config's layers hand a cache
    total_heads = heads
    if heads is not None:
        heads = kv_heads_per_rank(heads, tp_size)
    for i, (layer, saved) in enumerate(zip(cache.layers, model["layers"])):
        if saved["type"] != type(layer).__name__:
            raise ValueError(f"{path}: layer {i} is a {saved['type']} in the file, a {type(layer).__name__} for "
                             "this config (the layer types differ)")
        for name, want in (("kv_heads", heads), ("key_dim", key_dim), ("value_dim", value_dim)):
            if name in saved and want is not None and saved[name] != want:
                hint = ""
                if name == "kv_heads" and total_heads and saved[name] and total_heads % saved[name] == 0:
                    hint = (f" (tp_size={tp_size}); a cache saved by one of {total_heads // saved[name]} "
                            "tensor-parallel ranks holds that rank's heads only: load it on a rank of the same "
                            "tp_size, passing the model (QuantizedKVCache.load(path, model)), not its config")
                raise ValueError(f"{path}: layer {i} was saved with {name}={saved[name]}, the config gives "
                                 f"{want}{hint}")


def _restore(layer, i: int, entry: dict, tensors: dict, device, path) -> None:
    if entry["class"] != type(layer).__name__:
        raise ValueError(f"{path}: layer {i} is a {entry['class']} in the file, a {type(layer).__name__} here")
    if isinstance(layer, QuantizedKVLayer) and entry.get("config") != _settings(layer.cfg):
        raise ValueError(f"{path}: layer {i} was saved with settings {entry.get('config')}, the cache rebuilt from "
                         f"them has {_settings(layer.cfg)}")
    for name in _IDENTITY:  # fixed at construction from the config: a difference is another model
        if name in entry["plain"] and getattr(layer, name, None) != entry["plain"][name]:
            raise ValueError(f"{path}: layer {i} was saved with {name}={entry['plain'][name]!r}, this config gives "
                             f"{getattr(layer, name, None)!r}")
    if entry["plain"].get("is_initialized"):
        keys, values = (tensors[f"layers.{i}.{name}"] for name in ("keys", "values"))
        layer.lazy_initialization(keys[..., :0, :].to(device), values[..., :0, :].to(device))
    for name in entry["tensors"]:
        setattr(layer, name, tensors[f"layers.{i}.{name}"].to(device))
    for name, keys in entry["dicts"].items():
        setattr(layer, name, {k: tensors[f"layers.{i}.{name}.{k}"].to(device) for k in keys})
    for name, value in entry["plain"].items():
        setattr(layer, name, value)
