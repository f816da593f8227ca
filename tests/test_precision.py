"""Issue 14, precision where it matters: keys and values apart (per-side bits, mixed methods), fractional TurboQuant
rates, exact attention sinks, per-layer precision, keys and values of different head dims (MLA), and the validation
of every new argument."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DynamicCache,
    Gemma3TextConfig,
    LlamaConfig,
    Qwen2Config,
)

import tq_transformers
import tq_transformers.cpu_attention
import tq_transformers.cuda_graphs
from tq_transformers import (
    BonsaiCache,
    KIVICache,
    MixedCache,
    SplitCodebookPacked,
    TurboQuantCache,
    TurboQuantConfig,
    estimate_cache_bytes,
    make_cache,
)
from tq_transformers.fast_attention import fallback_reason
from tq_transformers.generation import CACHE_KWARG
from tq_transformers.methods.turboquant import rate_split

from cases import (
    CASES,
    COMMON,
    assert_valid_tokens,
    build_tiny,
    case,
    generate_with_scores,
    needs_gpu,
    padded_inputs,
    random_ids,
)

#: the cases issue 14 added to the method table (tests/cases.py)
NEW_CASES = ("turboquant2.5", "turboquant3.5", "turboquant-k4v2", "kivi-k4v2", "mixed-tq4-bonsai", "mixed-kivi2-tq3.5")


def _feed(cache, num_layers: int, steps, heads: int = 2, key_dim: int = 64, value_dim: int | None = None, seed=0):
    """Feed random keys / values of `steps` token counts into every layer; returns the last (keys, values)."""
    gen = torch.Generator().manual_seed(seed)
    value_dim = key_dim if value_dim is None else value_dim
    out = None
    for t in steps:
        for i in range(num_layers):
            k = torch.randn(2, heads, t, key_dim, generator=gen)
            v = torch.randn(2, heads, t, value_dim, generator=gen)
            out = cache.update(k, v, i)
    return out


def tiny_deepseek_config(**overrides) -> DeepseekV3Config:
    """A tiny DeepSeek-V3 (MLA attention: latents of kv_lora_rank 64 and qk_rope_head_dim 16 are cached)."""
    kwargs = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=512, kv_lora_rank=64, q_lora_rank=None,
                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2,
                  n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=4096)
    return DeepseekV3Config(**{**kwargs, **overrides})


#: transformers' MiMo-V2-Flash (absent from older releases): attention that caches keys and values as they are, of
#: different head dims (head_dim 192, v_head_dim 128: DeepSeek-V3's qk_nope + qk_rope and v_head_dim)
MIMO = getattr(transformers, "MiMoV2FlashConfig", None)
needs_mimo = pytest.mark.skipif(MIMO is None, reason="this transformers has no MiMo-V2-Flash")


def tiny_different_dims_model(device: str = "cpu"):
    """A tiny random MiMo-V2-Flash whose cache gets keys of 192 and values of 128 dims (2 KV heads, 8 query heads),
    every layer full attention (its sliding-window layers would stay unquantized). transformers' own DeepSeek-V3
    caches its MLA latents and expands them after the cache (``tiny_deepseek_config``): the fused kernel cannot
    read those, so this is the model on which keys and values of DeepSeek-V3's head dims reach the kernel. The
    output head is scaled (``cases.build_tiny``): greedy comparisons then mean something."""
    config = MIMO(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=512, head_dim=192, v_head_dim=128,
                  layer_types=["full_attention"] * 3, mlp_layer_types=["dense"] * 3, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.MiMoV2FlashForCausalLM(config)
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval().to(device)


# ----------------------------------------------------------------------------------------------------------------------
# Memory: byte-exact for every combination
# ----------------------------------------------------------------------------------------------------------------------
_W = dict(residual_length=16, flush_size=16)
COMBINATIONS = {
    "tq-k4v2": ("turboquant", dict(key_bits=4, value_bits=2, **_W)),
    "tq-k3.5v2.5": ("turboquant", dict(key_bits=3.5, value_bits=2.5, **_W)),
    "tq-2.5-uncentered": ("turboquant", dict(bits=2.5, center=False, **_W)),
    "tq-k4-v3-qjl": ("turboquant", dict(key_bits=4, value_bits=3, qjl=True, **_W)),
    "kivi-k4v2": ("kivi", dict(key_bits=4, value_bits=2, group_size=16, residual_length=16)),
    "kivi-k2v4-sinks": ("kivi", dict(key_bits=2, value_bits=4, group_size=16, residual_length=16, sink_tokens=4)),
    "bonsai-sinks": ("bonsai", dict(group_size=32, sink_tokens=8, **_W)),
    "mixed-tq4-bonsai": ("mixed", dict(key={"method": "turboquant", "bits": 4},
                                       value={"method": "bonsai", "center": True, "group_size": 32}, **_W)),
    "mixed-kivi-tq3": ("mixed", dict(key={"method": "kivi", "bits": 2, "group_size": 16},
                                     value={"method": "turboquant", "bits": 3}, residual_length=16)),
    "mixed-bonsai-kivi": ("mixed", dict(key={"method": "bonsai", "group_size": 32},
                                        value={"method": "kivi", "bits": 4, "group_size": 16}, **_W)),
    "tq2-edges4": ("turboquant", dict(bits=2, edge_layers=1, edge_settings={"bits": 4}, **_W)),
    "tq-per-layer": ("turboquant", dict(bits=3, layer_settings=[{"bits": 2.5}, None, {"key_bits": 4}], **_W)),
    "tq-layer-method": ("turboquant", dict(bits=2, layer_settings={1: {"method": "bonsai", "group_size": 32}}, **_W)),
    "tq3-sinks": ("turboquant", dict(bits=3, sink_tokens=4, **_W)),
}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("combo", list(COMBINATIONS))
def test_memory_footprint_equals_estimate_for_every_combination(combo, arch):
    """``memory_footprint()`` == ``estimate_cache_bytes()`` to the byte at several lengths, through flushes."""
    method, settings = COMBINATIONS[combo]
    config = _gemma3_config() if arch == "gemma3" else _llama_config()
    cache = make_cache(method, config, **settings)
    heads, dim = config.num_key_value_heads, config.head_dim
    for steps in ([3], [40], [1, 1, 1], [30, 1]):
        _feed(cache, config.num_hidden_layers, steps, heads=heads, key_dim=dim)
        n = cache.get_seq_length()
        want = estimate_cache_bytes(config, n, batch_size=2, method=method, dtype=torch.float32, **settings)
        assert cache.memory_footprint() == want, (combo, n)
    assert cache.memory_footprint()["codes"] > 0


#: settings for the 192 / 128 model (group sizes dividing both dims)
DIMS_MEMORY = {
    "turboquant4": ("turboquant", dict(bits=4, **_W)),
    "tq-k3.5v2.5-sinks": ("turboquant", dict(key_bits=3.5, value_bits=2.5, sink_tokens=4, **_W)),
    "kivi2": ("kivi", dict(bits=2, group_size=16, residual_length=16)),
    "bonsai": ("bonsai", dict(group_size=64, **_W)),
    "mixed-tq4-bonsai": ("mixed", dict(key={"method": "turboquant", "bits": 4},
                                       value={"method": "bonsai", "group_size": 64}, **_W)),
}


@needs_mimo
def test_cache_dims_read_the_value_head_dim():
    """A config with v_head_dim beside head_dim (MiMo-V2-Flash) caches values of v_head_dim: (heads, 192, 128)."""
    assert tq_transformers.cache.cache_dims(tiny_different_dims_model().config) == (2, 192, 128)


@needs_mimo
@pytest.mark.parametrize("combo", list(DIMS_MEMORY))
def test_memory_and_persistence_with_keys_and_values_of_different_head_dims(combo, tmp_path):
    """On the 192 / 128 model after a padded generate: ``memory_footprint()`` == ``estimate_cache_bytes()`` to the
    byte, and a saved cache loads against the model (its dims checked) and continues with the original's tokens."""
    method, settings = DIMS_MEMORY[combo]
    model = tiny_different_dims_model()
    inputs = padded_inputs()
    cache = make_cache(method, model.config, **settings)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, **{CACHE_KWARG: cache})
    n = cache.get_seq_length()
    want = estimate_cache_bytes(model.config, n, batch_size=2, method=method, dtype=torch.float32, **settings)
    assert cache.memory_footprint() == want and want["codes"] > 0
    path = tmp_path / "cache.safetensors"
    tq_transformers.save_cache(cache, path)
    loaded = tq_transformers.load_cache(path, model)
    assert loaded.memory_footprint() == cache.memory_footprint()
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, out.shape[1] - inputs["input_ids"].shape[1],
                                                          dtype=inputs["attention_mask"].dtype)], dim=1)
    with torch.no_grad():  # the next tokens from the original and from the loaded copy
        a = model.generate(input_ids=out, attention_mask=mask, max_new_tokens=4, do_sample=False,
                           **{CACHE_KWARG: cache})
        b = model.generate(input_ids=out, attention_mask=mask, max_new_tokens=4, do_sample=False,
                           **{CACHE_KWARG: loaded})
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["turboquant", "kivi", "bonsai", "mixed"])
def test_packed_views_before_anything_is_packed_are_none(method):
    """``layer.packed()`` of a layer whose tokens all sit in the window is (None, None), not a KeyError; after the
    first flush both views hold the packed tokens."""
    settings = {
        "turboquant": dict(residual_length=16, flush_size=16),
        "kivi": dict(group_size=16, residual_length=16),
        "bonsai": dict(group_size=32, residual_length=16, flush_size=16),
        "mixed": dict(key={"method": "kivi", "bits": 2, "group_size": 16}, value={"method": "turboquant", "bits": 4},
                      residual_length=16),
    }[method]
    cache = make_cache(method, None, **settings)
    _feed(cache, 1, [4], key_dim=64)
    assert cache.layers[0].num_quantized == 0 and cache.layers[0].packed() == (None, None)
    _feed(cache, 1, [60], key_dim=64)
    keys, values = cache.layers[0].packed()
    assert cache.layers[0].num_quantized > 0 and keys.num_tokens == values.num_tokens == cache.layers[0].num_quantized


def test_loading_an_mla_cache_checks_the_latent_dims(tmp_path):
    """DeepSeek-V3 caches its latents (1 head of kv_lora_rank keys, qk_rope_head_dim values): a saved cache loads
    against its own config and is refused, naming the dim, against a config of another kv_lora_rank."""
    config = tiny_deepseek_config()
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config).eval()
    cache = make_cache("turboquant", config, bits=4, **_W)
    with torch.no_grad():
        model(random_ids(2, 40), **{CACHE_KWARG: cache})
    path = tmp_path / "mla.safetensors"
    tq_transformers.save_cache(cache, path)
    assert tq_transformers.load_cache(path, config).memory_footprint() == cache.memory_footprint()
    with pytest.raises(ValueError, match=r"key_dim=64, the config gives 32"):
        tq_transformers.load_cache(path, tiny_deepseek_config(kv_lora_rank=32))


def _llama_config():
    return LlamaConfig(**COMMON, num_key_value_heads=2, head_dim=64)


def _qwen2_config():
    return Qwen2Config(**COMMON, num_key_value_heads=2)  # head_dim 32


def _gemma3_config():
    return Gemma3TextConfig(**COMMON, num_key_value_heads=1, head_dim=64, sliding_window=16,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"])


def test_fractional_rates_store_exactly_their_bits():
    """2.5 and 3.5 bits: code bytes are exactly bits * D / 8 a token and head (plus the fp16 norm)."""
    for bits in (2.5, 3.5, 1.25):
        cache = TurboQuantCache(bits=bits, residual_length=0, flush_size=32, center=False)
        _feed(cache, 1, [64], key_dim=128)
        fp = cache.memory_footprint()
        assert fp["codes"] == 2 * 2 * 2 * 64 * int(bits * 128) // 8  # K and V, 2 rows, 2 heads, 64 tokens
        assert fp["metadata"] == 2 * 2 * 2 * 64 * 2  # one fp16 norm a vector


# ----------------------------------------------------------------------------------------------------------------------
# Keys and values apart
# ----------------------------------------------------------------------------------------------------------------------
def _dequantized(cache, steps=(70,), dim=64, value_dim=None):
    _feed(cache, 1, steps, key_dim=dim, value_dim=value_dim, seed=3)
    return cache.layers[0].dequantize(torch.float32)


def test_per_side_bits_code_each_side_as_the_uniform_cache():
    """TurboQuant key_bits=4, value_bits=2: keys exactly TurboQuant-4's, values exactly TurboQuant-2's (KIVI too)."""
    for cls, extra, hi, lo in ((TurboQuantCache, _W, 4, 2),
                               (KIVICache, dict(group_size=16, residual_length=16), 4, 2)):
        k, v = _dequantized(cls(key_bits=hi, value_bits=lo, **extra))
        k_hi, _ = _dequantized(cls(bits=hi, **extra))
        _, v_lo = _dequantized(cls(bits=lo, **extra))
        assert torch.equal(k, k_hi) and torch.equal(v, v_lo)
    # bits is the shorthand of both; a side's own setting wins
    assert TurboQuantConfig(bits=3, value_bits=2).side_bits("k") == 3
    assert TurboQuantConfig(bits=3, value_bits=2).side_bits("v") == 2


def test_mixed_cache_codes_each_side_as_that_method_alone():
    """A mixed cache's keys equal the key method's cache's keys, its values the value method's values; two equal
    sides are that method's cache exactly."""
    tq4, bonsai = {"method": "turboquant", "bits": 4}, {"method": "bonsai", "center": True, "rotate": True,
                                                       "group_size": 32}
    k, v = _dequantized(MixedCache(key=tq4, value=bonsai, **_W))
    k_ref, _ = _dequantized(TurboQuantCache(bits=4, **_W))
    _, v_ref = _dequantized(BonsaiCache(center=True, rotate=True, group_size=32, **_W))
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    same = _dequantized(MixedCache(key=tq4, value=tq4, **_W))
    ref = _dequantized(TurboQuantCache(bits=4, **_W))
    assert all(torch.equal(a, b) for a, b in zip(same, ref))
    # KIVI keys (their group of 16 tokens sets the flush) with TurboQuant values; configs work as well as dicts
    cache = MixedCache(key=tq_transformers.KIVIConfig(bits=2, group_size=16), value=TurboQuantConfig(bits=3),
                       residual_length=16)
    assert cache.method_config.flush_size == 16
    k, v = _dequantized(cache)
    assert torch.equal(k, _dequantized(KIVICache(bits=2, group_size=16, residual_length=16))[0])
    assert torch.equal(v, _dequantized(TurboQuantCache(bits=3, **_W))[1])


def test_keys_at_higher_precision_give_lower_key_error():
    """The point of the split: at the same total bits, the side that gets more bits has the smaller error."""
    x = torch.randn(1, 2, 256, 64, generator=torch.Generator().manual_seed(5))
    cache = TurboQuantCache(key_bits=4, value_bits=2, residual_length=0, flush_size=256)
    cache.update(x, x.clone(), 0)
    k, v = cache.layers[0].dequantize(torch.float32)
    assert (k - x).norm() < 0.5 * (v - x).norm()


# ----------------------------------------------------------------------------------------------------------------------
# Fractional TurboQuant rates
# ----------------------------------------------------------------------------------------------------------------------
def test_rate_split_is_the_two_rate_channel_split():
    assert rate_split(2.5, 128) == ((3, 64), (2, 64))
    assert rate_split(3.5, 128) == ((4, 64), (3, 64))
    assert rate_split(2.25, 128) == ((3, 32), (2, 96))  # the paper's "32 outlier channels at 3 bits, 96 at 2"
    assert rate_split(3, 128) == ((3, 128),)
    with pytest.raises(ValueError, match=r"a rate of 2.125 bits at head_dim 32 splits 4 channels to 3 bits.*"
                                         r"rates between 2 and 3 that work at head_dim 32: \[2.25, 2.5, 2.75\]"):
        rate_split(2.125, 32)


def test_fractional_rate_error_lies_between_its_whole_rates():
    """Reconstruction error of 2.5 bits lies strictly between 2 and 3 bits (and 3.5 between 3 and 4)."""
    x = torch.randn(1, 2, 512, 128, generator=torch.Generator().manual_seed(7))
    err = {}
    for bits in (2, 2.5, 3, 3.5, 4):
        cache = TurboQuantCache(bits=bits, residual_length=0, flush_size=512)
        cache.update(x, x.clone(), 0)
        err[bits] = (cache.layers[0].dequantize(torch.float32)[0] - x).square().mean().item()
    assert err[2] > err[2.5] > err[3] > err[3.5] > err[4], err


def test_fractional_rate_has_a_split_format_that_decodes_to_the_layer():
    cache = case("turboquant2.5").cache(head_dim=64)
    _feed(cache, 1, [40])
    layer = cache.layers[0]
    keys, values = layer.packed()
    assert isinstance(keys, SplitCodebookPacked) and keys.bits == 2.5 and keys.head_dim == 64
    assert [(p.bits, p.head_dim) for p in keys.parts] == [(3, 32), (2, 32)]
    assert torch.equal(keys.dequantize(), layer.dequantize(torch.float32)[0])
    assert tq_transformers.kernels.decode_supported(keys, values, torch.float16)  # decoded a coordinate at a time
    assert fallback_reason(layer, keys, values, torch.float16) is None
    assert fallback_reason(layer, keys, None, torch.float16) == (
        "layer 0: keys SplitCodebookPacked(bits=2.5, head_dim=64), values SplitCodebookPacked(bits=2.5, head_dim=64), "
        "model dtype torch.float16")


# ----------------------------------------------------------------------------------------------------------------------
# Attention sinks
# ----------------------------------------------------------------------------------------------------------------------
def test_sink_tokens_stay_exact_and_first():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 100, 64, generator=gen)
    cache = TurboQuantCache(bits=2, sink_tokens=4, residual_length=16, flush_size=16)
    k, v = cache.update(x[:, :, :50], x[:, :, :50] * 2, 0)  # a prefill attends to itself exactly
    assert torch.equal(k, x[:, :, :50])
    for t in range(50, 100):
        k, v = cache.update(x[:, :, t:t + 1], x[:, :, t:t + 1] * 2, 0)
    layer = cache.layers[0]
    assert layer.num_sinks == 4 and layer.num_quantized == cache.method_config.num_quantized(100) == 80
    assert torch.equal(k[:, :, :4], x[:, :, :4]) and torch.equal(v[:, :, :4], 2 * x[:, :, :4])  # exact, first
    assert not torch.equal(k[:, :, 4:84], x[:, :, 4:84])  # then the packed tokens
    assert torch.equal(k[:, :, 84:], x[:, :, 84:])  # then the window
    packed_k, packed_v = layer.packed()  # the views hold the packed tokens alone; the sinks stay apart
    assert packed_k.num_tokens == packed_v.num_tokens == 80 and layer.sink_keys.shape[-2] == 4
    old_k, _ = layer.dequantize(torch.float32)  # the sinks, then the packed tokens
    assert torch.equal(old_k[:, :, :4], x[:, :, :4]) and torch.equal(packed_k.dequantize(), old_k[:, :, 4:])
    # one prefill, chunks or token by token: the same state (uncentered: the means depend on the first flush)
    states = []
    for chunk in (100, 7, 1):
        other = TurboQuantCache(bits=2, sink_tokens=4, residual_length=16, flush_size=16, center=False)
        for t in range(0, 100, chunk):
            other.update(x[:, :, t:t + chunk], x[:, :, t:t + chunk] * 2, 0)
        states.append((*other.layers[0].dequantize(torch.float32), other.memory_footprint()))
    assert states[0][2] == states[1][2] == states[2][2]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(states, states[1:]))


def test_sinks_crop_and_batch_ops():
    x = torch.randn(2, 2, 60, 64, generator=torch.Generator().manual_seed(2))
    cache = TurboQuantCache(bits=3, sink_tokens=4, residual_length=16, flush_size=16)
    cache.update(x, x, 0)
    cache.crop(-58)  # into the sinks
    layer = cache.layers[0]
    assert cache.get_seq_length() == 2 and layer.num_sinks == 2 and layer.num_quantized == 0
    k, _ = cache.update(x[:, :, 2:40], x[:, :, 2:40], 0)
    assert torch.equal(k, x[:, :, :40]) and layer.num_sinks == 4
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.sink_keys, x[[1, 0], :, :4])
    one_layer = LlamaConfig(**{**COMMON, "num_hidden_layers": 1}, num_key_value_heads=2, head_dim=64)
    assert cache.memory_footprint() == estimate_cache_bytes(one_layer, 40, 2, "turboquant", torch.float32,
                                                            bits=3, sink_tokens=4, residual_length=16, flush_size=16)


def test_sinks_generate_with_padding_matches_the_uncached_window():
    """Sinks on a tiny Llama with a left-padded batch: with a lossless window the output equals DynamicCache's."""
    model = build_tiny("llama")
    inputs = padded_inputs()
    ref, _ = generate_with_scores(model, inputs, DynamicCache(), new_tokens=8)
    cache = TurboQuantCache(model.config, bits=4, sink_tokens=4, residual_length=10**6)
    got, _ = generate_with_scores(model, inputs, cache, new_tokens=8)
    assert torch.equal(got, ref)
    small = TurboQuantCache(model.config, bits=4, sink_tokens=4, residual_length=8, flush_size=8)
    got, _ = generate_with_scores(model, inputs, small, new_tokens=8)
    assert_valid_tokens(got, inputs["input_ids"])


# ----------------------------------------------------------------------------------------------------------------------
# Per-layer precision
# ----------------------------------------------------------------------------------------------------------------------
def test_per_layer_settings_and_edge_layers():
    config = _llama_config()  # 3 layers
    cache = TurboQuantCache(config, bits=2, edge_layers=1, edge_settings={"bits": 4}, layer_settings={2: {"bits": 3}})
    assert [layer.cfg.bits for layer in cache.layers] == [4, 2, 3]  # layer_settings wins over the edge rule
    cache = TurboQuantCache(config, bits=2, layer_settings=[None, {"method": "bonsai", "group_size": 64}, None])
    assert [type(layer.cfg).__name__ for layer in cache.layers] == ["TurboQuantConfig", "BonsaiConfig",
                                                                    "TurboQuantConfig"]
    assert cache.layers[1].cfg.window == cache.method_config.window  # the cache's window, injected
    lazy = TurboQuantCache(bits=2, layer_settings={1: {"bits": 4}})  # without a config: a dict works lazily
    _feed(lazy, 3, [5])
    assert [layer.cfg.bits for layer in lazy.layers] == [2, 4, 2]


# ----------------------------------------------------------------------------------------------------------------------
# Different key and value head dims (MLA)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", ["turboquant4", "turboquant2.5", "turboquant3-qjl", "kivi2", "bonsai",
                                     "bonsai-improved", "turboquant-k4v2", "mixed-tq4-bonsai", "mixed-kivi2-tq3.5"])
def test_keys_and_values_of_different_head_dims(case_id):
    """Keys of 192 and values of 128 dims (DeepSeek's qk_nope + qk_rope and v_head_dim) in every method."""
    c = CASES[case_id]
    cache = c.cache(head_dim=64)  # group sizes fitted to 64: they divide 192 and 128
    k, v = _feed(cache, 1, [40, 1, 20], key_dim=192, value_dim=128)
    layer = cache.layers[0]
    assert k.shape[-1] == 192 and v.shape[-1] == 128 and layer.num_quantized > 0
    kd, vd = layer.dequantize(torch.float32)
    assert kd.shape[-1] == 192 and vd.shape[-1] == 128
    views = layer.packed()
    if views != (None, None):
        assert views[0].head_dim == 192 and views[1].head_dim == 128
        assert tq_transformers.kernels.decode_supported(*views, torch.float16)  # the fused kernels take them
        assert tq_transformers.cpu_attention.supported(*views)


@pytest.mark.parametrize("factory,dims,message", [
    (lambda: BonsaiCache(residual_length=0, flush_size=16), (192, 128), r"layer 0: key_states of shape "
     r"\(2, 2, 16, 192\) \[batch, kv_heads, seq, head_dim\] cannot be quantized with BonsaiConfig: group_size must "
     r"divide head_dim=192 .*got group_size=128; group sizes that work: \[8, 16, 24, 32, 48, 64, 96, 192\]"),
    (lambda: KIVICache(group_size=128), (192, 128), r"layer 0: key_states of shape \(2, 2, 16, 192\) .* KIVIConfig: "
     r"group_size must divide head_dim=192"),
    (lambda: TurboQuantCache(value_bits=2.125), (192, 32), r"layer 0: value_states of shape \(2, 2, 16, 32\) .*"
     r"TurboQuantConfig: a rate of 2.125 bits at head_dim 32 splits 4 channels"),
    (lambda: TurboQuantCache(), (192, 100), r"layer 0: value_states of shape \(2, 2, 16, 100\) .*TurboQuantConfig: "
     r"head_dim must be a multiple of 8"),
    (lambda: MixedCache(key={"method": "turboquant"}, value={"method": "bonsai", "group_size": 96}), (192, 128),
     r"layer 0: value_states of shape \(2, 2, 16, 128\) .* BonsaiConfig: group_size must divide head_dim=128"),
], ids=["bonsai-keys", "kivi-keys", "tq-values-split", "tq-values-packing", "mixed-values"])
def test_a_shape_a_method_cannot_take_names_the_layer_the_shape_and_what_works(factory, dims, message):
    """At the first update, against the dims the states really have."""
    with pytest.raises(ValueError, match=message):
        _feed(factory(), 1, [16], key_dim=dims[0], value_dim=dims[1])


def test_tiny_deepseek_v3_every_method():
    """A tiny random DeepSeek-V3 (its cache holds the MLA latents: 64-dim keys, 16-dim values, one head) generates
    through every method on the reference path, memory byte-exact; a lossless window is exact."""
    config = tiny_deepseek_config()
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    ids = {"input_ids": random_ids(1, 40)}
    ref, _ = generate_with_scores(model, ids, DynamicCache(), new_tokens=6)
    lossless, _ = generate_with_scores(model, ids, TurboQuantCache(config, residual_length=10**6), new_tokens=6)
    assert torch.equal(lossless, ref)
    for case_id in ("turboquant4", "turboquant2.5", "kivi2", "bonsai-improved", "mixed-tq4-bonsai"):
        c = CASES[case_id]
        kwargs = c.kwargs(config)  # group sizes fitted to config.head_dim (qk_rope_head_dim = 16)
        cache = make_cache(c.method, config, **kwargs)
        out, _ = generate_with_scores(model, ids, cache, new_tokens=6)
        assert_valid_tokens(out, ids["input_ids"])
        layer = cache.layers[0]
        assert (layer.head_dim, layer.value_head_dim) == (64, 16) and layer.num_quantized > 0
        n = cache.get_seq_length()
        assert cache.memory_footprint() == estimate_cache_bytes(config, n, 1, c.method, torch.float32, **kwargs)
    # the check against the dims the latents really have, at construction: Bonsai's default group of 128
    with pytest.raises(ValueError, match=r"BonsaiCache: the model caches keys of head_dim 64 and values of head_dim "
                                         r"16: group_size must divide head_dim=64"):
        BonsaiCache(config)
    with pytest.warns(UserWarning, match="fast path off for TurboQuantCache: the model caches MLA latents"):
        tq_transformers.fast_attention.prepare_cache(TurboQuantCache(config))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_new_cases_generate_on_tiny_models(arch):
    """Every new case generates on the tiny Llama (head_dim 64) and Qwen2 (32), memory byte-exact."""
    model = build_tiny(arch)
    ids = {"input_ids": random_ids(1, 40)}
    for case_id in NEW_CASES:
        c = CASES[case_id]
        kwargs = c.kwargs(model.config)
        cache = make_cache(c.method, model.config, **kwargs)
        out, _ = generate_with_scores(model, ids, cache, new_tokens=6)
        assert_valid_tokens(out, ids["input_ids"])
        assert cache.layers[0].num_quantized > 0
        assert cache.memory_footprint() == estimate_cache_bytes(model.config, cache.get_seq_length(), 1, c.method,
                                                                torch.float32, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Validation of every new argument
# ----------------------------------------------------------------------------------------------------------------------
RATES = r"a rate in 1..4 bits, whole or a multiple of 1/8 \(e.g. 2.5, 3.5\)"


@pytest.mark.parametrize("factory,error,message", [
    (lambda: TurboQuantCache(bits=2.7), ValueError, r"bits must be " + RATES + ", got 2.7"),
    (lambda: TurboQuantCache(key_bits=5), ValueError, r"key_bits must be " + RATES + ", got 5"),
    (lambda: TurboQuantCache(value_bits="2"), TypeError, r"value_bits must be " + RATES + ", got str '2'"),
    (lambda: TurboQuantCache(bits=3, qjl=True, value_bits=2.5), ValueError,
     r"value_bits must be a whole number of bits in 2..4 with qjl=True .*got 2.5"),
    (lambda: KIVICache(key_bits=2.5), TypeError, r"key_bits must be an integer in 1..8 \(2 and 4 are KIVI's; "
     r"fractional rates are TurboQuant's\), got float 2.5"),
    (lambda: KIVICache(value_bits=0), ValueError, r"value_bits must be an integer in 1..8 .*got 0"),
    (lambda: TurboQuantCache(sink_tokens=-1), ValueError, r"sink_tokens must be an integer >= 0, got -1"),
    (lambda: TurboQuantCache(sink_tokens=128), ValueError, r"sink_tokens must be smaller than the window "
     r"\(residual_length \+ flush_size = 128\), got sink_tokens=128"),
    (lambda: BonsaiCache(sink_tokens=4.0), TypeError, r"sink_tokens must be an integer >= 0, got float 4.0"),
    (lambda: MixedCache(key={"method": "gptq"}, value={"method": "kivi"}), ValueError,
     r"key\['method'\] must be one of \('bonsai', 'kivi', 'turboquant'\), got 'gptq'"),
    (lambda: MixedCache(key={"method": "turboquant"}), TypeError, r"value must be a method config .* or a dict "
     r"\{\"method\": name, \*\*settings\}, got NoneType None"),
    (lambda: MixedCache(key="turboquant", value={"method": "kivi"}), TypeError, r"key must be a method config"),
    (lambda: MixedCache(key={"method": "turboquant", "residual_length": 4}, value={"method": "kivi"}), ValueError,
     r"key may not set \['residual_length'\]: the window is the mixed cache's"),
    (lambda: MixedCache(key={"method": "turboquant", "bitz": 4}, value={"method": "kivi"}), TypeError,
     r"TurboQuantCache got unknown settings \['bitz'\]"),
    (lambda: MixedCache(key={"method": "kivi", "group_size": 32}, value={"method": "bonsai"}, flush_size=48),
     ValueError, r"flush_size must be a multiple of 32 \(the key side, KIVIConfig, packs 32 tokens together\), got "
     r"48; e.g. flush_size=32"),
    (lambda: TurboQuantCache(_llama_config(), layer_settings=[{"bits": 4}]), ValueError,
     r"layer_settings must have one entry per decoder layer \(3\), got 1"),
    (lambda: TurboQuantCache(_llama_config(), layer_settings={3: {"bits": 4}}), ValueError,
     r"layer_settings keys must be decoder layer indices \(0..2\), got 3"),
    (lambda: TurboQuantCache(layer_settings="all"), TypeError, r"layer_settings must be a dict \{layer_idx: settings\}"
     r" or a list of settings \(or None\) per layer, got str 'all'"),
    (lambda: TurboQuantCache(layer_settings={0: 4}), TypeError, r"layer_settings\[0\] must be a dict of settings, got "
     r"int 4"),
    (lambda: TurboQuantCache(layer_settings={0: {"bits": 2.7}}), ValueError, r"bits must be " + RATES + ", got 2.7"),
    (lambda: TurboQuantCache(layer_settings={0: {"residual_length": 64}}), ValueError,
     r"layer 0's settings change the window to \(residual_length, flush_size, sink_tokens\) = \(64, 128, 0\), the "
     r"cache's is \(0, 128, 0\)"),
    (lambda: TurboQuantCache(layer_settings={0: {"method": "q4"}}), ValueError,
     r"method must be one of \('bonsai', 'kivi', 'mixed', 'turboquant'\), got 'q4' \(in layer_settings\)"),
    (lambda: TurboQuantCache(edge_layers=1, edge_settings={"bits": 4}), ValueError,
     r"edge_layers=1 needs the model config \(the number of layers\)"),
    (lambda: TurboQuantCache(_llama_config(), edge_layers=2, edge_settings={"bits": 4}), ValueError,
     r"edge_layers must be at most half the 3 layers \(1\), got 2"),
    (lambda: TurboQuantCache(_llama_config(), edge_layers=1), TypeError,
     r"edge_settings must be a dict of settings with edge_layers > 0, got NoneType None"),
    (lambda: TurboQuantCache(edge_settings={"bits": 4}), ValueError, r"edge_settings needs edge_layers > 0"),
    (lambda: TurboQuantCache(edge_layers=-1), ValueError, r"edge_layers must be an integer >= 0, got -1"),
    (lambda: TurboQuantCache(value_grid="Uniform"), ValueError,
     r"value_grid must be one of \('lloyd_max', 'uniform'\), got 'Uniform'"),
    (lambda: TurboQuantCache(grid=1), TypeError, r"grid must be a str, one of \('lloyd_max', 'uniform'\), got int 1"),
    (lambda: TurboQuantCache(_qwen2_config(), key_bits=3.125), ValueError,
     r"TurboQuantCache: the model caches keys of head_dim 32 and values of head_dim 32: a rate of 3.125 bits at "
     r"head_dim 32 splits 4 channels"),
], ids=["tq-bits-2.7", "tq-key-bits-5", "tq-value-bits-str", "tq-qjl-fractional", "kivi-fractional", "kivi-value-0",
        "sinks-negative", "sinks-window", "sinks-float", "mixed-unknown-method", "mixed-missing-side",
        "mixed-side-type", "mixed-side-window", "mixed-side-unknown-setting", "mixed-flush", "layers-length",
        "layers-index", "layers-type", "layers-entry-type", "layers-entry-bad", "layers-window", "layers-method",
        "edges-no-config", "edges-too-many", "edges-no-settings", "edges-settings-alone", "edges-negative",
        "grid-unknown", "grid-type", "bits-at-config-dims"])
def test_new_arguments_are_validated_with_clear_messages(factory, error, message):
    with pytest.raises(error, match=message):
        factory()


def test_estimate_accepts_the_same_arguments():
    with pytest.raises(ValueError, match=r"layer_settings must have one entry per decoder layer \(3\), got 2"):
        estimate_cache_bytes(_llama_config(), 100, method="turboquant", layer_settings=[None, None])
    with pytest.raises(ValueError, match=r"group_size must divide head_dim=64"):
        estimate_cache_bytes(tiny_deepseek_config(), 100, method="bonsai")


# ----------------------------------------------------------------------------------------------------------------------
# The fast path: every new format falls back (with a warning on CUDA) or runs the kernel, against the reference
# ----------------------------------------------------------------------------------------------------------------------
#: (case id, extra settings): the new formats and options; which of them the GPU kernels cover today
FAST_NEW = [("turboquant-k4v2", {}), ("kivi-k4v2", {}), ("mixed-tq4-bonsai", {}), ("turboquant2.5", {}),
            ("mixed-kivi2-tq3.5", {}), ("turboquant4", {"sink_tokens": 4}),
            ("turboquant4", {"edge_layers": 1, "edge_settings": {"bits": 2.5}}), ("turboquant3-qjl", {})]
#: what the GPU kernels do not cover (a warned fallback); everything else in FAST_NEW runs the fused kernel
KERNEL_UNCOVERED = {"turboquant3-qjl"}  # QJL's residual signs have no kernel view


def _fast_and_reference(c, extra: dict, device: str):
    model = build_tiny("llama").to(device)
    inputs = padded_inputs(device)
    kwargs = {**c.kwargs(model.config), **extra}
    ref_seq, ref_scores = generate_with_scores(model, inputs, make_cache(c.method, model.config, **kwargs))
    tq_transformers.enable(model, c.method, fast=True, cuda_graphs=False, **kwargs)
    try:
        cache = tq_transformers.fast_attention.prepare_cache(make_cache(c.method, model.config, **kwargs))
        fast_seq, fast_scores = generate_with_scores(model, inputs, cache)
    finally:
        tq_transformers.disable(model)
    assert cache.quantized_layers[0].num_quantized >= 32
    return ref_seq, ref_scores, fast_seq, fast_scores


def _fast_params(cpu: bool) -> list:
    """FAST_NEW as pytest params; on the CPU the split rate and the sinks run always, the rest are `slow`."""
    out = []
    for c, e in FAST_NEW:
        slow = cpu and not (c == "turboquant2.5" or "sink_tokens" in e)
        out.append(pytest.param(c, e, id=f"{c}{'-' + '-'.join(e) if e else ''}",
                                marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.mark.parametrize("case_id,extra", _fast_params(cpu=True))
def test_new_formats_fast_path_fallback_equals_reference_on_cpu(case_id, extra, monkeypatch):
    monkeypatch.setattr(tq_transformers.kernels, "triton_available", lambda: False)
    monkeypatch.setattr(tq_transformers.cpu_attention, "supported", lambda keys, values: False)  # the fallback itself
    ref_seq, ref_scores, fast_seq, fast_scores = _fast_and_reference(CASES[case_id], extra, "cpu")
    assert torch.equal(fast_seq, ref_seq) and torch.equal(fast_scores, ref_scores)


@needs_gpu
@pytest.mark.parametrize("case_id,extra", _fast_params(cpu=False))
def test_new_formats_fast_path_on_gpu_kernel_or_warned_fallback(case_id, extra, recwarn):
    """On CUDA a covered combination runs the fused kernel (same tokens, logits within float32 noise); one the kernels
    do not cover decodes on the reference path with a warning naming it."""
    tq_transformers.fast_attention._WARNED.clear()
    ref_seq, ref_scores, fast_seq, fast_scores = _fast_and_reference(CASES[case_id], extra, "cuda")
    assert torch.equal(fast_seq, ref_seq)
    torch.testing.assert_close(fast_scores, ref_scores, rtol=1e-3, atol=1e-3)
    warned = [str(w.message) for w in recwarn if "do not cover" in str(w.message)]
    if case_id not in KERNEL_UNCOVERED:
        assert warned == []
    else:
        assert warned and warned[0].startswith("tq_fused: the GPU decode kernels do not cover layer "), warned


# ----------------------------------------------------------------------------------------------------------------------
# Keys and values of different head dims through the fast path (192 / 128, DeepSeek-V3's shapes)
# ----------------------------------------------------------------------------------------------------------------------
#: one case per kernel family, a mixed pair and a split rate
DIMS_FAST = ["turboquant4", "kivi2", "bonsai-improved", "mixed-kivi2-tq3.5", "turboquant2.5"]


def _dims_fast_and_reference(c, device: str, attention, monkeypatch, cuda_graphs: bool = False):
    """(reference tokens, scores, fast tokens, scores, fast attention calls) of the tiny 192 / 128 model: the
    reference path, then ``enable(..., fast=True, cuda_graphs=False)``; `attention` names the fast path's function
    that is counted (``kernels.decode_attention`` or ``cpu_attention.decode_attention``); with `cuda_graphs` the
    decode steps replay from CUDA graphs (the static layout), and the runner's counts come last.

    The reference path runs under "tq_fused" with an unprepared cache, i.e. SDPA over the cache's dequantized
    tensors: MiMo's own attention is eager (it has no SDPA), whose prefill of the left-padded row differs from
    SDPA's in the padded positions, and with them the cache's centering means; "tq_fused" runs SDPA wherever it
    does not run a fused decode step."""
    model = tiny_different_dims_model(device)
    inputs = padded_inputs(device)
    kwargs = c.settings_for(head_dim=64)  # group sizes of 64 or less: they divide 192 and 128
    previous = tq_transformers.fast_attention.install(model)
    try:
        ref_seq, ref_scores = generate_with_scores(model, inputs, make_cache(c.method, model.config, **kwargs))
    finally:
        tq_transformers.fast_attention.uninstall(model, previous)
    module, name = attention
    calls, original = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda **kw: calls.append(kw["values"].head_dim) or original(**kw))
    tq_transformers.enable(model, c.method, fast=True, cuda_graphs=cuda_graphs, **kwargs)
    try:
        cache = tq_transformers.fast_attention.prepare_cache(make_cache(c.method, model.config, **kwargs),
                                                             cuda_graphs=cuda_graphs)
        fast_seq, fast_scores = generate_with_scores(model, inputs, cache)
        stats = dict(tq_transformers.cuda_graphs.runner_of(model).stats) if cuda_graphs else {}
    finally:
        tq_transformers.disable(model)
    layer = cache.quantized_layers[0]
    assert (layer.head_dim, layer.value_head_dim) == (192, 128) and layer.num_quantized >= 32
    return ref_seq, ref_scores, fast_seq, fast_scores, calls, stats


@needs_mimo
@pytest.mark.parametrize("case_id", DIMS_FAST)
def test_different_head_dims_decode_on_the_cpu_fast_path(case_id, monkeypatch):
    """Keys of 192 and values of 128 dims on the CPU fast path (``cpu_attention``): the reference path's greedy
    tokens, logits within float32 rounding (tests/test_cpu_attention.py's LOGIT_ATOL)."""
    ref_seq, ref_scores, fast_seq, fast_scores, calls, _ = _dims_fast_and_reference(
        CASES[case_id], "cpu", (tq_transformers.cpu_attention, "decode_attention"), monkeypatch)
    assert calls and set(calls) == {128}  # every quantized layer's decode steps, values of 128 dims
    assert torch.equal(fast_seq, ref_seq)
    torch.testing.assert_close(fast_scores, ref_scores, rtol=0, atol=1e-3)


@needs_gpu
@needs_mimo
@pytest.mark.parametrize("case_id", DIMS_FAST)
def test_different_head_dims_decode_on_the_gpu_kernel(case_id, monkeypatch, recwarn):
    """Keys of 192 and values of 128 dims on CUDA: the fused kernel runs (no "do not cover" fallback warning), with
    the reference path's greedy tokens and logits within float32 noise (as
    ``test_new_formats_fast_path_on_gpu_kernel_or_warned_fallback``)."""
    tq_transformers.fast_attention._WARNED.clear()
    ref_seq, ref_scores, fast_seq, fast_scores, calls, _ = _dims_fast_and_reference(
        CASES[case_id], "cuda", (tq_transformers.kernels, "decode_attention"), monkeypatch)
    assert calls and set(calls) == {128}
    assert [str(w.message) for w in recwarn if "do not cover" in str(w.message)] == []
    assert torch.equal(fast_seq, ref_seq)
    torch.testing.assert_close(fast_scores, ref_scores, rtol=1e-3, atol=1e-3)


@needs_gpu
@needs_mimo
@pytest.mark.parametrize("case_id", ["turboquant4", "kivi2", "bonsai-improved"])
def test_different_head_dims_replay_from_cuda_graphs(case_id, monkeypatch, recwarn):
    """The same on the static layout, decode steps replayed from CUDA graphs (the kernel reads the device counts):
    graphs captured and replayed, the reference path's greedy tokens."""
    tq_transformers.fast_attention._WARNED.clear()
    ref_seq, ref_scores, fast_seq, fast_scores, calls, stats = _dims_fast_and_reference(
        CASES[case_id], "cuda", (tq_transformers.kernels, "decode_attention"), monkeypatch, cuda_graphs=True)
    assert stats.get("replay", 0) > 5 and stats.get("capture", 0) >= 1, stats
    assert [str(w.message) for w in recwarn if "do not cover" in str(w.message)] == []
    assert torch.equal(fast_seq, ref_seq)
    torch.testing.assert_close(fast_scores, ref_scores, rtol=1e-3, atol=1e-3)


@needs_mimo
@pytest.mark.parametrize("case_id", ["turboquant4", "kivi2", "bonsai-improved"])
def test_different_head_dims_fixed_capacity_cache_on_cpu(case_id):
    """A fixed-capacity cache (``max_cache_len``: the compiled path's decode operator, device counts; no compiler
    here) on the 192 / 128 model: the dynamic fast path's tokens and scores exactly."""
    c = CASES[case_id]
    model = tiny_different_dims_model()
    inputs = padded_inputs()
    kwargs = c.settings_for(head_dim=64)
    previous = tq_transformers.fast_attention.install(model)
    try:
        want = generate_with_scores(model, inputs, tq_transformers.fast_attention.prepare_cache(
            make_cache(c.method, model.config, **kwargs)))
        cache = make_cache(c.method, model.config, max_cache_len=128, **kwargs)
        got = generate_with_scores(model, inputs, cache)
    finally:
        tq_transformers.fast_attention.uninstall(model, previous)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (cache.layers[0].head_dim, cache.layers[0].value_head_dim) == (192, 128)


def test_deepseek_v3_latents_stay_on_the_reference_path():
    """transformers' DeepSeek-V3 caches its MLA latents (keys 64, values 16, one head) and expands them after the
    cache: the fast path stays off with a warning that says so (not a kernel fallback: the kernels cannot read what
    attention sees), and generation is the reference path's."""
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(tiny_deepseek_config()).eval()
    model.generation_config.pad_token_id = 0
    ids = {"input_ids": random_ids(1, 40)}
    c = CASES["turboquant4"]
    kwargs = c.kwargs(model.config)
    ref, _ = generate_with_scores(model, ids, make_cache(c.method, model.config, **kwargs), new_tokens=6)
    tq_transformers.enable(model, c.method, fast=True, cuda_graphs=False, **kwargs)
    try:
        with pytest.warns(UserWarning, match="fast path off for TurboQuantCache: the model caches MLA latents"):
            cache = tq_transformers.fast_attention.prepare_cache(make_cache(c.method, model.config, **kwargs))
        out, _ = generate_with_scores(model, ids, cache, new_tokens=6)
    finally:
        tq_transformers.disable(model)
    assert torch.equal(out, ref)
