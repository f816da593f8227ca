"""The evaluation's attention probe, the reference's name and setting checks (tiny random models, no download)."""

import warnings

import pytest
import torch
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tq_transformers.evaluation import config as eval_config
from tq_transformers.evaluation.runner import (
    PROBE_ATTN_NAME,
    REFERENCE,
    FidelityProbe,
    MethodSpec,
    attn_implementation,
    build_caches,
    capture_attention,
    forward,
    reference_label,
)


def _prefilled(model, ids):
    cache = DynamicCache(config=model.config)
    forward(model, ids, cache)
    return cache


def _probe(model, ids):
    specs = [MethodSpec(REFERENCE, REFERENCE), MethodSpec("kivi", "kivi")]
    _, _, prefill = build_caches(model, specs, ids)
    probe = FidelityProbe(specs, model.config, prefill)
    probe.active = True
    return probe


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_probe_uses_its_own_attention_name_and_restores_the_model(tiny_model, impl):
    model = tiny_model("llama")
    other = tiny_model("qwen2")
    model.set_attn_implementation(impl)
    try:
        sdpa_before = ALL_ATTENTION_FUNCTIONS["sdpa"]
        ids = torch.randint(0, 512, (1, 40))
        expected = forward(model, ids[:, 32:], _prefilled(model, ids[:, :32]))
        probe = _probe(model, ids[:, :32])
        with capture_attention(model, probe):
            assert attn_implementation(model) == PROBE_ATTN_NAME
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_before  # nothing global is replaced
            forward(other, ids, DynamicCache(config=other.config))  # another model is not observed
            assert probe.counts == {}
            cache = DynamicCache(config=model.config)
            forward(model, ids[:, :32], cache)
            got = forward(model, ids[:, 32:], cache)
        assert attn_implementation(model) == impl
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_before
        assert sorted(probe.counts) == list(range(model.config.num_hidden_layers))
        assert probe.counts[0] == 40  # every query token of both calls, once per layer
        forward(model, ids, DynamicCache(config=model.config))  # outside the context: not observed
        assert probe.counts[0] == 40
        # the probe only observes: the logits are SDPA's (exactly, for an SDPA model)
        if impl == "sdpa":
            assert torch.equal(got, expected)
        else:  # eager attention is probed under SDPA: equal up to float rounding
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    finally:
        model.set_attn_implementation("sdpa")


def test_probe_restores_the_model_after_an_error(tiny_model):
    model = tiny_model("llama")
    probe = _probe(model, torch.randint(0, 512, (1, 20)))
    with pytest.raises(RuntimeError, match="boom"), capture_attention(model, probe):
        raise RuntimeError("boom")
    assert attn_implementation(model) == "sdpa"


def test_probe_refuses_other_attention_implementations(tiny_model):
    model = tiny_model("llama")
    probe = _probe(model, torch.randint(0, 512, (1, 20)))
    model.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(ValueError, match="must be 'sdpa' or 'eager'.*got 'flex_attention'"), \
                capture_attention(model, probe):
            pass
    finally:
        model.config._attn_implementation = "sdpa"


def test_reference_is_named_full_and_fp16_is_a_deprecated_alias():
    with pytest.warns(FutureWarning, match="'fp16'.*deprecated.*'full'"):
        spec = MethodSpec("fp16", "fp16")
    assert spec.method == REFERENCE == "full"
    cfg = eval_config.merge(eval_config.DEFAULTS, {})
    cfg["methods"] = [{"name": "fp16", "method": "fp16"}, {"name": "k", "method": "kivi"}]
    with pytest.warns(FutureWarning):
        specs = eval_config.method_specs(cfg)
    assert [(s.name, s.method) for s in specs] == [("full", "full"), ("k", "kivi")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [s.name for s in eval_config.method_specs(eval_config.DEFAULTS)][0] == "full"  # no warning
    assert reference_label(torch.bfloat16) == "full (bfloat16)"


def test_setting_names_must_be_unique_and_not_the_references():
    cfg = eval_config.merge(eval_config.DEFAULTS, {})
    cfg["methods"] = [{"name": "a", "method": "kivi"}, {"name": "a", "method": "bonsai"}]
    with pytest.raises(ValueError, match=r"unique .* got \['a'\]"):
        eval_config.method_specs(cfg)
    cfg["methods"] = [{"name": "full", "method": "kivi"}]
    with pytest.raises(ValueError, match=r"got \['full'\]"):
        eval_config.method_specs(cfg)


def test_type_errors_name_the_type_and_truncate_the_value():
    with pytest.raises(TypeError) as info:
        MethodSpec("k", "kivi", "bits=4 " * 1000)
    msg = str(info.value)
    assert "kwargs must be a dict, got str 'bits=4 " in msg and len(msg) < 200
    cfg = eval_config.merge(eval_config.DEFAULTS, {})
    cfg["methods"] = [["kivi"] * 1000]
    with pytest.raises(TypeError) as info:
        eval_config.method_specs(cfg)
    msg = str(info.value)
    assert "got list ['kivi'" in msg and len(msg) < 200
    cfg = eval_config.merge(eval_config.DEFAULTS, {"model": {"a": 1}})
    with pytest.raises(TypeError, match="model must be a string, got dict"):
        eval_config.validate(cfg)
