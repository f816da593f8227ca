"""Real-model tier: Qwen2.5-Coder-1.5B (from its PyPI parts, sha256-checked, converted once and cached) on real
WikiText-2 text. Attention-output fidelity of each cache, per layer and head, against the full-precision cache.

Floors are the values measured on 2026-11-28 (CPU, fp32, 1024-token context, 64 continuation queries) rounded down
with a little room: TurboQuant-4 0.9952, KIVI-2 0.9749, KIVI-4 0.9989, Bonsai faithful 0.7257, Bonsai improved 0.9357.
"""

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tq_transformers.fast_attention import attn_implementation_of

from cases import case, params

pytestmark = pytest.mark.real_model

CONTEXT, CONTINUATION = 1024, 64


@pytest.fixture(scope="module")
def recorded():
    """Per layer: post-RoPE queries of the continuation and the exact keys/values of the whole text."""
    from tq_transformers.evaluation.data import load_text, tokenize_text
    from tq_transformers.evaluation.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("qwen2.5-coder-1.5b", dtype=torch.float32)
    ids = tokenize_text(tok, load_text("wikitext2-test"), max_tokens=CONTEXT + CONTINUATION)
    ids = ids[: CONTEXT + CONTINUATION].unsqueeze(0)
    states = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        states[module.layer_idx] = (query[:, :, CONTEXT:].detach(), key.detach(), value.detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("tq_test_record", record)
    previous = attn_implementation_of(model.config)
    model.set_attn_implementation("tq_test_record")
    try:
        with torch.no_grad():
            model(ids)
    finally:
        model.set_attn_implementation(previous)
    return model.config, states


def _attention(q, k, v):
    """Causal attention of the last T positions; q [1, Hq, T, D], k/v [1, Hkv, N, D] (grouped-query)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    t, n = q.shape[2], k.shape[2]
    mask = torch.ones(t, n, dtype=torch.bool).tril(n - t)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_fidelity(cache, states) -> torch.Tensor:
    """Cosine [layers, heads] between attention outputs over the quantized cache and over the exact one."""
    rows = []
    for layer, (q, k, v) in sorted(states.items()):
        cache.update(k[:, :, :CONTEXT], v[:, :, :CONTEXT], layer)  # the prefill, stored
        kq, vq = cache.update(k[:, :, CONTEXT:], v[:, :, CONTEXT:], layer)  # the continuation attends to it
        out, ref = _attention(q, kq, vq), _attention(q, k, v)
        rows.append(torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean(-1)[0])
    return torch.stack(rows)


# measured floors (module docstring); each case with the method's default window, as shipped
FLOORS = {"turboquant4": 0.99, "kivi2": 0.97, "kivi4": 0.995, "bonsai": 0.70, "bonsai-improved": 0.92}


@pytest.mark.parametrize("c", params(*FLOORS))
def test_attention_fidelity_on_real_text(recorded, c):
    config, states = recorded
    cache = c.cache(config, "default")
    cos = attention_fidelity(cache, states)
    assert cache.memory_footprint()["codes"] > 0  # the continuation really read quantized tokens
    floor = FLOORS[c.id]
    assert cos.mean().item() > floor, f"{c.id}: mean attention-output cosine {cos.mean():.4f} below {floor}"


def test_centering_is_what_saves_turboquant_on_qwen(recorded):
    """docs/METHODS.md, "Key offsets and centering": without centering, the shared key offset eats the per-vector
    error budget."""
    config, states = recorded
    c = case("turboquant4")
    centered = attention_fidelity(c.cache(config, "default"), states)
    plain = attention_fidelity(c.cache(config, "default", center=False), states)
    assert centered.mean(1).min() > plain.mean(1).min() + 0.1  # the worst layer gains most
