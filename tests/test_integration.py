"""Tiny random-model integration tests: the transformers plumbing of every cache (generate, padding, beams, crop,
continuation, dtypes, pipelines, hybrid sliding-window models)."""

import pytest
import torch
from transformers import DynamicCache, pipeline

import tq_transformers
from tq_transformers import BonsaiCache, KIVICache, QuantizedLayer, TurboQuantCache
from tq_transformers.generation import CACHE_KWARG

ARCHS = ["llama", "qwen2", "gemma3"]
LOSSLESS = 10**9  # a residual window longer than any sequence: nothing is ever quantized


def _group(model):
    return min(64, model.config.head_dim if getattr(model.config, "head_dim", None) else 32)


def make(method, model, **kw):
    if method == "turboquant":
        return TurboQuantCache(model.config, **kw)
    if method == "kivi":
        return KIVICache(model.config, group_size=min(32, _group(model)), **kw)
    if method == "bonsai":
        return BonsaiCache(model.config, group_size=_group(model), **kw)
    if method == "bonsai-improved":
        return BonsaiCache.improved(model.config, group_size=_group(model), **kw)
    raise ValueError(method)


METHODS = ["turboquant", "kivi", "bonsai", "bonsai-improved"]
# Small windows so that short test sequences really go through the quantized storage.
SMALL = {"turboquant": dict(flush_size=16), "kivi": dict(residual_length=32), "bonsai": dict(residual_length=16, flush_size=16),
         "bonsai-improved": dict(residual_length=16, flush_size=16)}


def _ids(batch=1, length=60, seed=1):
    return torch.randint(1, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, cache, n=20, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          **{CACHE_KWARG: cache}, **kw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_lossless_setting_reproduces_dynamic_cache(tiny_model, arch, method):
    model = tiny_model(arch)
    ids = _ids(batch=2)
    ref = _generate(model, ids, DynamicCache(config=model.config))
    cache = make(method, model, residual_length=LOSSLESS)
    assert torch.equal(_generate(model, ids, cache), ref)
    assert cache.memory_footprint()["codes"] == 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_quantized_generation_uses_storage_and_stays_close(tiny_model, arch, method):
    model = tiny_model(arch)
    ids = _ids(length=100)
    ref = _generate(model, ids, DynamicCache(config=model.config), n=30)
    cache = make(method, model, **SMALL[method])
    out = _generate(model, ids, cache, n=30)
    assert cache.get_seq_length() == out.shape[1] - 1
    assert cache.memory_footprint()["codes"] > 0
    if method.startswith("bonsai"):
        return  # 1-bit is known to derail greedy decoding (REFERENCE.md section 6): measured on the real model instead
    agree = (out[0, 100:] == ref[0, 100:]).float().mean().item()
    assert agree >= 0.8, f"{method} on {arch}: greedy agreement {agree:.2f}"


def test_hybrid_model_keeps_sliding_layers_unquantized(tiny_model):
    model = tiny_model("gemma3")
    cache = make("turboquant", model, flush_size=16)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds[1] is tq_transformers.TurboQuantLayer
    assert not issubclass(kinds[0], QuantizedLayer) and not issubclass(kinds[2], QuantizedLayer)
    assert cache.layers[0].is_sliding
    _generate(model, _ids(length=80), cache)
    assert cache.memory_footprint()["unquantized_layers"] > 0


def test_config_without_full_attention_layers_warns():
    from transformers import MistralConfig

    cfg = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=100, sliding_window=32)
    with pytest.warns(UserWarning, match="no full-attention layer"):
        cache = KIVICache(cfg)
    assert cache.quantized_layers == []


def test_lazy_cache_without_config(tiny_model):
    model = tiny_model("llama")
    ids = _ids()
    ref = _generate(model, ids, DynamicCache())
    cache = TurboQuantCache(residual_length=LOSSLESS)
    assert torch.equal(_generate(model, ids, cache), ref)
    assert len(cache.layers) == model.config.num_hidden_layers
    assert all(isinstance(layer, QuantizedLayer) for layer in cache.layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_dtypes(tiny_model, method, dtype):
    model = tiny_model("llama", dtype)
    ids = _ids()
    ref = _generate(model, ids, DynamicCache(config=model.config))
    assert torch.equal(_generate(model, ids, make(method, model, residual_length=LOSSLESS)), ref)
    cache = make(method, model, **SMALL[method])
    _generate(model, ids, cache)
    layer = cache.layers[0]
    assert layer.keys.dtype == dtype  # the window stays in the model's dtype
    k, v = layer.update(torch.randn(1, 2, 1, 64, dtype=dtype), torch.randn(1, 2, 1, 64, dtype=dtype))
    assert k.dtype == dtype and v.dtype == dtype and k.shape[-2] == cache.get_seq_length()


def _left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("method", METHODS)
def test_left_padded_batch_matches_each_row_alone(tiny_model, arch, method):
    model = tiny_model(arch)
    rows = [_ids(length=n, seed=n)[0].tolist() for n in (70, 45, 58)]
    ids, mask = _left_pad(rows)

    def run(cache_kw, batch_ids, batch_mask):
        cache = make(method, model, **cache_kw)
        return model.generate(batch_ids, attention_mask=batch_mask, max_new_tokens=20, do_sample=False,
                              **{CACHE_KWARG: cache})[:, batch_ids.shape[1]:]

    # Faithful 1-bit derails on random models whatever the padding; its padded rows are only checked when lossless.
    settings = [(dict(residual_length=LOSSLESS), 1.0)] + ([] if method == "bonsai" else [(SMALL[method], 0.75)])
    for kw, floor in settings:
        batched = run(kw, ids, mask)
        agree = []
        for i, r in enumerate(rows):
            alone = run(kw, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))[0]
            agree.append((batched[i] == alone).float().mean().item())
        if floor == 1.0:
            assert agree == [1.0, 1.0, 1.0], f"lossless padded batch differs from single rows: {agree}"
        else:
            assert min(agree) >= floor, f"{method}: padded rows agree with their own runs on {agree}"


@pytest.mark.parametrize("method", METHODS)
def test_beam_search(tiny_model, method):
    model = tiny_model("llama")
    ids = _ids()
    ref = _generate(model, ids, DynamicCache(config=model.config), num_beams=3)
    assert torch.equal(_generate(model, ids, make(method, model, residual_length=LOSSLESS), num_beams=3), ref)
    out = _generate(model, ids, make(method, model, **SMALL[method]), num_beams=3)
    assert out.shape == ref.shape


@pytest.mark.parametrize("method", METHODS)
def test_reorder_cache_permutes_rows_exactly(method, tiny_model):
    model = tiny_model("llama")
    cache = make(method, model, **SMALL[method])
    x = torch.randn(3, 2, 70, 64)
    cache.update(x, x * 2, 0)
    layer = cache.layers[0]
    k_before, v_before = layer._dequantize(torch.float32)
    window_before = layer.keys.clone()
    beam_idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(beam_idx)
    k_after, v_after = layer._dequantize(torch.float32)
    assert torch.equal(k_after, k_before[beam_idx]) and torch.equal(v_after, v_before[beam_idx])
    assert torch.equal(layer.keys, window_before[beam_idx])


@pytest.mark.parametrize("method", METHODS)
def test_prompt_lookup_decoding_uses_crop(tiny_model, method):
    model = tiny_model("llama")
    ids = torch.tensor([list(range(5, 25)) * 4])  # repetitive, so the lookup proposes candidates
    ref = _generate(model, ids, DynamicCache(config=model.config), n=30)
    out = _generate(model, ids, make(method, model, residual_length=LOSSLESS), n=30, prompt_lookup_num_tokens=5)
    assert torch.equal(out, ref)
    cache = make(method, model, **SMALL[method])
    assert cache.is_croppable
    out = _generate(model, ids, cache, n=30, prompt_lookup_num_tokens=5)
    assert cache.get_seq_length() == out.shape[1] - 1


@pytest.mark.parametrize("method", METHODS)
def test_crop_then_refeed_matches_never_cropped(method, tiny_model):
    model = tiny_model("llama")
    x = torch.randn(1, 2, 100, 64, generator=torch.Generator().manual_seed(3))
    a, b = make(method, model, **SMALL[method]), make(method, model, **SMALL[method])
    a.update(x[:, :, :90], x[:, :, :90], 0)
    a.update(x[:, :, 90:], x[:, :, 90:], 0)
    b.update(x[:, :, :90], x[:, :, :90], 0)
    b.update(x[:, :, 90:], x[:, :, 90:], 0)
    b.crop(-25)  # reaches into the quantized part
    assert b.get_seq_length() == 75
    # the cropped cache holds only what it reports: no view keeps the pre-crop tensors alive (batch 1, so a prefix
    # of the storage is itself contiguous)
    layer = b.layers[0]
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [layer.keys, layer.values, *layer.storage.values()]}
    assert sum(held.values()) == sum(layer.memory_footprint().values())
    b.update(x[:, :, 75:], x[:, :, 75:], 0)
    ka, kb = a.layers[0]._dequantize(torch.float32)[0], b.layers[0]._dequantize(torch.float32)[0]
    held_a = torch.cat([ka, a.layers[0].keys], dim=2)
    held_b = torch.cat([kb, b.layers[0].keys], dim=2)
    assert held_a.shape == held_b.shape == x.shape
    if method == "kivi":  # a partly cropped key group comes back into the window dequantized: close, not equal
        assert torch.nn.functional.cosine_similarity(held_a, held_b, dim=-1).min() > 0.95
    else:  # per-token storage: cropping and re-feeding gives the very same state
        assert torch.equal(held_a, held_b)
    with pytest.raises(ValueError, match="tokens_to_remove must be a negative"):
        b.crop(5)


@pytest.mark.parametrize("method", METHODS)
def test_continue_generation_from_returned_cache(tiny_model, method):
    model = tiny_model("llama")
    ids = _ids()
    one_shot = _generate(model, ids, make(method, model, **SMALL[method]), n=30)
    cache = make(method, model, **SMALL[method])
    first = _generate(model, ids, cache, n=12)
    second = _generate(model, first, cache, n=18)
    assert torch.equal(second, one_shot)


def test_sampling_matches_dynamic_cache_when_lossless(tiny_model):
    model = tiny_model("llama")
    ids = _ids()
    outs = []
    for cache in (DynamicCache(config=model.config), KIVICache(model.config, residual_length=LOSSLESS)):
        torch.manual_seed(123)
        outs.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=True,
                                   top_k=20, **{CACHE_KWARG: cache}))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(5)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=True,
                         **{CACHE_KWARG: TurboQuantCache(model.config, flush_size=16)})
    assert out.shape == (1, 80)


def test_past_key_values_name_still_works(tiny_model):
    model = tiny_model("llama")
    ids = _ids()
    ref = _generate(model, ids, DynamicCache(config=model.config))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                         past_key_values=TurboQuantCache(model.config, residual_length=LOSSLESS))
    assert torch.equal(out, ref)


def test_enable_gives_a_fresh_cache_per_call_and_refuses_foreign_caches(tiny_model):
    model = tiny_model("llama")
    a, b = _ids(seed=1), _ids(seed=2)
    ref_b = _generate(model, b, TurboQuantCache(model.config, flush_size=16))
    tq_transformers.enable(model, "turboquant", flush_size=16)
    try:
        model.generate(a, attention_mask=torch.ones_like(a), max_new_tokens=20, do_sample=False)
        out_b = model.generate(b, attention_mask=torch.ones_like(b), max_new_tokens=20, do_sample=False)
        assert torch.equal(out_b, ref_b)  # the second prompt did not continue the first one's cache

        cache = TurboQuantCache(model.config, flush_size=16)
        first = model.generate(a, attention_mask=torch.ones_like(a), max_new_tokens=5, do_sample=False,
                               **{CACHE_KWARG: cache})
        with pytest.raises(ValueError, match="not the start of input_ids"):
            model.generate(b, attention_mask=torch.ones_like(b), max_new_tokens=5, **{CACHE_KWARG: cache})
        more = model.generate(first, attention_mask=torch.ones_like(first), max_new_tokens=5, do_sample=False,
                              **{CACHE_KWARG: cache})  # a true continuation is accepted
        assert torch.equal(more[:, : first.shape[1]], first)
        filled = TurboQuantCache(model.config)
        model(a, **{CACHE_KWARG: filled})
        with pytest.raises(ValueError, match="unknown origin"):
            model.generate(b, max_new_tokens=2, **{CACHE_KWARG: filled})
    finally:
        tq_transformers.disable(model)
    assert not hasattr(model.generate, "__tq_original__")


def test_enable_validates_arguments_up_front(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="bits must be an integer in 1..4, got 7"):
        tq_transformers.enable(model, "turboquant", bits=7)
    with pytest.raises(ValueError, match=r"method must be one of \('turboquant', 'kivi', 'bonsai'\), got 'gptq'"):
        tq_transformers.enable(model, "gptq")


def test_text_generation_pipeline_many_prompts(tiny_model):
    pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(ord("a") + i): i + 1 for i in range(26)} | {"<pad>": 0, " ": 27}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    model = tiny_model("llama")
    prompts = ["the quick brown fox jumps over the lazy dog " * 3, "hello world " * 6, "lorem ipsum dolor " * 4]
    fresh = []
    for p in prompts:
        ids = torch.tensor([tokenizer(p)["input_ids"]])
        fresh.append(_generate(model, ids, KIVICache(model.config, residual_length=32), n=10)[0, ids.shape[1]:].tolist())
    tq_transformers.enable(model, "kivi", residual_length=32)
    try:
        pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
        outs = [pipe(p, max_new_tokens=10, do_sample=False, return_tensors=True)[0]["generated_token_ids"] for p in prompts]
    finally:
        tq_transformers.disable(model)
    for p, o, f in zip(prompts, outs, fresh):
        assert list(o)[-10:] == f


@pytest.mark.parametrize(
    "factory,message",
    [
        (lambda: TurboQuantCache(bits=0), r"bits must be an integer in 1..4, got 0"),
        (lambda: TurboQuantCache(bits=1, qjl=True), r"bits must be in 2..4 with qjl=True"),
        (lambda: TurboQuantCache(residual_length=-1), r"residual_length must be an integer >= 0, got -1"),
        (lambda: TurboQuantCache(flush_size=0), r"flush_size must be an integer >= 1, got 0"),
        (lambda: TurboQuantCache(bits=4.0), r"bits must be an integer in 1..4, got 4.0"),
        (lambda: KIVICache(bits=9), r"bits must be an integer in 1..8 .*got 9"),
        (lambda: KIVICache(group_size=12), r"group_size must be a positive multiple of 8, got 12"),
        (lambda: KIVICache(residual_length=100), r"residual_length must be a multiple of group_size=32, got 100"),
        (lambda: BonsaiCache(scale="max"), r"scale must be one of \('mean_abs', 'l2'\), got 'max'"),
        (lambda: BonsaiCache(group_size=7), r"group_size must be a positive multiple of 8, got 7"),
    ],
    ids=["tq-bits0", "tq-qjl-bits1", "tq-residual", "tq-flush", "tq-bits-float", "kivi-bits", "kivi-group",
         "kivi-residual", "bonsai-scale", "bonsai-group"],
)
def test_bad_arguments_raise_clear_errors(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_bad_shapes_and_dtypes(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(TypeError, match=r"config must be a transformers PreTrainedConfig .* got int 4"):
        TurboQuantCache(4)  # bits passed positionally where the config goes
    with pytest.raises(ValueError, match=r"group_size must divide head_dim=64 .* got group_size=128"):
        BonsaiCache(model.config)  # checked at construction from the config
    cache = TurboQuantCache()
    with pytest.raises(ValueError, match=r"key_states must have shape \[batch, kv_heads, seq, head_dim\]"):
        cache.update(torch.randn(2, 3, 64), torch.randn(2, 3, 64), 0)
    with pytest.raises(TypeError, match="key_states must be floating point"):
        cache.update(torch.ones(1, 2, 3, 64, dtype=torch.long), torch.ones(1, 2, 3, 64, dtype=torch.long), 0)
    cache.update(torch.randn(1, 2, 3, 64), torch.randn(1, 2, 3, 64), 0)
    with pytest.raises(ValueError, match="call cache.reset"):
        cache.update(torch.randn(4, 2, 3, 64), torch.randn(4, 2, 3, 64), 0)
    with pytest.raises(ValueError, match="head_dim must be a multiple of 8"):
        TurboQuantCache().update(torch.randn(1, 1, 2, 12), torch.randn(1, 1, 2, 12), 0)
    cache.reset()
    assert cache.get_seq_length() == 0


@pytest.mark.parametrize("head_dim", [80, 96], ids=lambda d: f"d{d}")
def test_non_power_of_two_head_dim(head_dim):
    cache = TurboQuantCache(flush_size=32)
    x = torch.randn(1, 2, 64, head_dim)
    cache.update(x, x, 0)
    k, _ = cache.layers[0]._dequantize(torch.float32)
    assert torch.nn.functional.cosine_similarity(k, x, dim=-1).mean() > 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_cuda_and_layers_on_different_devices(tiny_model, method):
    model = tiny_model("llama")
    ids = _ids()
    ref = _generate(model, ids, DynamicCache(config=model.config))
    import copy

    split = copy.deepcopy(model)
    split.model.layers[1:].to("cuda")  # layers 1.. on the GPU, the rest on the CPU
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    for i, layer in enumerate(split.model.layers):
        add_hook_to_module(layer, AlignDevicesHook(execution_device="cuda" if i else "cpu", io_same_device=True))
    cache = make(method, split, residual_length=LOSSLESS)
    out = _generate(split, ids, cache)
    assert torch.equal(out, ref)
    assert cache.layers[0].keys.device.type == "cpu" and cache.layers[1].keys.device.type == "cuda"
    cache = make(method, split, **SMALL[method])
    _generate(split, ids, cache)
    assert all(t.device.type == "cuda" for t in cache.layers[1].storage.values())
