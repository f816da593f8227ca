"""Saving and loading caches (tq_transformers.persistence): a loaded cache continues exactly as the original, the file
is the cache's bytes plus a header, and a mismatching model or a damaged file raises a clear ValueError."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import LlamaConfig

from tq_transformers import KIVICache, MixedCache, QuantizedKVCache, TurboQuantCache

from cases import COMMON, PLUMBING, case, continue_greedy, one_thread, params, prefill, random_ids

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

PREFIX, QUESTION, NEW = 50, 6, 30  # 16-token windows: the continuation flushes after loading




def _header_bytes(path) -> int:
    """The safetensors header: its 8-byte length and the JSON it announces."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("c", params(*PLUMBING))
def test_loaded_cache_continues_exactly_as_the_original(tiny_model, tmp_path, arch, c):
    model = tiny_model(arch)
    prefix = random_ids(length=PREFIX)
    ids = torch.cat([prefix, random_ids(length=QUESTION, seed=2)], dim=1)
    original = prefill(model, prefix, c.cache(model.config))
    original.token_ids = prefix
    path = tmp_path / "cache.tqkv"
    original.save(path)
    footprint = original.memory_footprint()
    assert os.path.getsize(path) == footprint["total"] + prefix.numel() * prefix.element_size() + _header_bytes(path)

    loaded = type(original).load(path, model.config)
    assert type(loaded) is type(original) and loaded.memory_footprint() == footprint
    assert torch.equal(loaded.token_ids, prefix) and loaded.get_seq_length() == PREFIX
    got = continue_greedy(model, ids, loaded, NEW)
    want = continue_greedy(model, ids, original, NEW)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(layer.num_quantized > 32 for layer in loaded.quantized_layers)  # flushed after loading


PRECISION_SETTINGS = {  # issue 14's settings: each must survive a save / load and a fork (exactly)
    "sinks-and-layer-bits": lambda cfg: TurboQuantCache(cfg, bits=4, sink_tokens=4, residual_length=16, flush_size=16,
                                                        layer_settings={0: {"bits": 2}}),
    "mixed-sides": lambda cfg: MixedCache(cfg, residual_length=16, flush_size=16,
                                          key={"method": "turboquant", "bits": 4},
                                          value={"method": "bonsai", "group_size": 32}),
    "layer-of-another-method": lambda cfg: TurboQuantCache(cfg, bits=4, residual_length=16, flush_size=16,
                                                           layer_settings={1: {"method": "bonsai", "group_size": 32}}),
}


@pytest.mark.parametrize("make", list(PRECISION_SETTINGS.values()), ids=list(PRECISION_SETTINGS))
def test_per_side_and_per_layer_settings_round_trip_and_fork(tiny_model, tmp_path, make):
    model = tiny_model("llama")
    prefix = random_ids(length=PREFIX)
    ids = torch.cat([prefix, random_ids(length=QUESTION, seed=2)], dim=1)
    original = prefill(model, prefix, make(model.config))
    original.save(tmp_path / "cache.tqkv")
    loaded = QuantizedKVCache.load(tmp_path / "cache.tqkv", model.config)
    assert type(loaded) is type(original) and loaded.memory_footprint() == original.memory_footprint()
    assert loaded.layer_configs == original.layer_configs and loaded.method_config == original.method_config
    fork = original.fork()
    want = continue_greedy(model, ids, original, NEW)
    for other in (loaded, fork):
        got = continue_greedy(model, ids, other, NEW)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_fork_saves_its_whole_history_and_a_lazy_cache_loads_without_a_config(tiny_model, tmp_path):
    model = tiny_model("llama")
    c = case("kivi2")
    prefix = random_ids(length=PREFIX)
    ids = torch.cat([prefix, random_ids(length=QUESTION, seed=2)], dim=1)
    original = prefill(model, prefix, c.cache(head_dim=64))  # no config: layers created lazily
    fork = original.fork()
    fork.save(tmp_path / "fork.tqkv")
    loaded = QuantizedKVCache.load(tmp_path / "fork.tqkv", None)
    assert isinstance(loaded, KIVICache) and not loaded.quantized_layers[0].shared
    assert loaded.memory_footprint() == fork.memory_footprint()
    got, want = continue_greedy(model, ids, loaded, NEW), continue_greedy(model, ids, original, NEW)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_empty_cache_round_trips(tiny_model, tmp_path):
    model = tiny_model("gemma3")
    cache = case("turboquant4").cache(model.config)
    cache.save(tmp_path / "empty.tqkv")
    loaded = TurboQuantCache.load(tmp_path / "empty.tqkv", model)
    assert loaded.get_seq_length() == 0 and loaded.memory_footprint()["total"] == 0


def _saved(tiny_model, tmp_path, arch="llama", method="turboquant4"):
    model = tiny_model(arch)
    cache = prefill(model, random_ids(length=40), case(method).cache(model.config))
    path = tmp_path / "cache.tqkv"
    cache.save(path)
    return model, path


def _llama(**overrides):
    return LlamaConfig(**{**COMMON, "num_key_value_heads": 2, "head_dim": 64, **overrides})


@pytest.mark.parametrize("config, message", [
    (_llama(num_hidden_layers=4), "3 layers, the config has 4"),
    (_llama(num_key_value_heads=4), "num_key_value_heads=2, the config has 4"),
    (_llama(head_dim=32), "head_dim=64, the config has 32"),
    (_llama(vocab_size=1000), "vocab_size=512, the config has 1000"),
    (_llama(num_attention_heads=8), "num_attention_heads=4, the config has 8"),
])
def test_loading_into_another_model_names_the_mismatch(tiny_model, tmp_path, config, message):
    _, path = _saved(tiny_model, tmp_path)
    with pytest.raises(ValueError, match=message):
        TurboQuantCache.load(path, config)


def test_loading_checks_layer_types_window_class_and_dtype(tiny_model, tmp_path):
    model, path = _saved(tiny_model, tmp_path, "gemma3")
    with pytest.raises(ValueError, match="model_type='gemma3_text', the config has 'llama'"):
        TurboQuantCache.load(path, tiny_model("llama").config)
    other = model.config.__class__(**{**model.config.to_dict(), "layer_types": ["full_attention"] * 3})
    with pytest.raises(ValueError, match="layer 0 is a DynamicSlidingWindowLayer in the file, a QuantizedKVLayer"):
        TurboQuantCache.load(path, other)
    other = model.config.__class__(**{**model.config.to_dict(), "sliding_window": 32})
    with pytest.raises(ValueError, match="sliding_window=16, this config gives 32"):
        TurboQuantCache.load(path, other)
    with pytest.raises(ValueError, match="holds a TurboQuantCache, not a KIVICache"):
        KIVICache.load(path, model.config)
    with pytest.raises(ValueError, match="saved from a model in torch.float32, the model is in torch.bfloat16"):
        TurboQuantCache.load(path, model.config, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="config must be"):
        TurboQuantCache.load(path, {"num_hidden_layers": 3})


def test_damaged_files_raise_clear_errors(tiny_model, tmp_path):
    model, path = _saved(tiny_model, tmp_path)
    data = path.read_bytes()
    header = _header_bytes(path)
    bad = tmp_path / "bad.tqkv"

    bad.write_bytes(data[: len(data) - 100])  # truncated
    with pytest.raises(ValueError, match="truncated or corrupted"):
        TurboQuantCache.load(bad, model.config)

    flipped = bytearray(data)
    flipped[header + (len(data) - header) // 2] ^= 0x10  # one bit of the packed codes
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum mismatch"):
        TurboQuantCache.load(bad, model.config)

    text = data[8:header].decode()
    meta = json.loads(text)
    layers = json.loads(meta["__metadata__"]["layers"])
    layers[1]["plain"]["cumulative_length"] += 1  # a counter edited, same header length
    meta["__metadata__"]["layers"] = json.dumps(layers, sort_keys=True)
    edited = json.dumps(meta).encode()
    bad.write_bytes(len(edited).to_bytes(8, "little") + edited + data[header:])
    with pytest.raises(ValueError, match="checksum mismatch"):
        TurboQuantCache.load(bad, model.config)

    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match="not a saved tq_transformers cache"):
        TurboQuantCache.load(bad, model.config)
    with pytest.raises(FileNotFoundError):
        TurboQuantCache.load(tmp_path / "missing.tqkv", model.config)


def test_an_attribute_a_file_cannot_hold_is_named(tiny_model, tmp_path):
    model = tiny_model("llama")
    cache = prefill(model, random_ids(length=40), case("kivi2").cache(model.config))
    cache.layers[1].extra = object()
    with pytest.raises(TypeError, match="layer 1 .*'extra'"):
        cache.save(tmp_path / "x.tqkv")


def test_a_cache_in_the_static_layout_saves_exactly_its_tokens(tmp_path):
    from tq_transformers.static_layout import StaticShared

    c = case("kivi2")
    cache = c.cache(head_dim=64)
    gen = torch.Generator().manual_seed(0)
    for layer_idx in range(2):
        cache.update(torch.randn(1, 2, 70, 64, generator=gen), torch.randn(1, 2, 70, 64, generator=gen), layer_idx)
    dynamic = cache.memory_footprint()
    shared = StaticShared(torch.zeros(3, dtype=torch.int64), torch.ones(1, 1024, dtype=torch.bool))
    for layer in cache.layers:
        layer.enter_static(512, shared)
    assert cache.memory_footprint()["total"] > dynamic["total"]  # the reserved capacity
    cache.save(tmp_path / "static.tqkv")
    loaded = QuantizedKVCache.load(tmp_path / "static.tqkv", None)
    assert loaded.memory_footprint() == dynamic
    for a, b in zip(loaded.layers, cache.layers):
        assert all(torch.equal(x, y) for x, y in zip(a.dequantize(torch.float32), b.dequantize(torch.float32)))
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
