"""KIVI's least-squares range option (``fit_iterations``, issue 14): model-free units and a tiny cache.

The option changes only how a group's scale and zero are chosen; the format, the bytes and the dequantization are
KIVI's. The default stays the paper's min-max."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from tq_transformers import KIVICache, estimate_cache_bytes
from tq_transformers.methods.kivi import kivi_encode_keys, kivi_encode_values, minmax_quantize

BITS = (1, 2, 3, 4)


def _group_error(x: torch.Tensor, bits: int, fit_iterations: int) -> torch.Tensor:
    """Squared reconstruction error of each group (groups along the last dim)."""
    codes, scale, zero = minmax_quantize(x, bits, dim=-1, fit_iterations=fit_iterations)
    back = zero.float()[..., None] + codes.float() * scale.float()[..., None]
    return ((back - x) ** 2).sum(-1)


def _samples(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=gen)
    if kind == "outliers":  # one large entry in every group, as a sink token's key channel
        x[:, 0] += 20.0
    elif kind == "offset":  # a per-group offset far from 0 (Qwen2.5's key channels)
        x += 300.0
    return x


@pytest.mark.parametrize("kind", ["gaussian", "outliers", "offset"])
@pytest.mark.parametrize("bits", BITS, ids=[f"{b}bit" for b in BITS])
def test_refit_never_loses_to_min_max_and_wins_on_average(bits, kind):
    x = _samples(kind)
    base = _group_error(x, bits, 0)
    for iterations in (1, 4):
        fitted = _group_error(x, bits, iterations)
        assert (fitted <= base).all(), (bits, kind, iterations)  # a group keeps min-max where the fit would lose
        assert fitted.mean() < base.mean(), (bits, kind, iterations)


def test_refit_lowers_two_bit_gaussian_error_by_a_fifth_or_more():
    # min-max over 32 Gaussian samples spans about 4.1 sigma: a 2-bit step of ~1.37 sigma; the least-squares grid is
    # near Lloyd-Max's uniform optimum (step ~1.0 sigma), about 25% less squared error
    x = _samples("gaussian")
    ratio = float(_group_error(x, 2, 4).mean() / _group_error(x, 2, 0).mean())
    assert ratio < 0.8, ratio


def test_zero_iterations_is_the_paper_min_max():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 64, 64, generator=gen) * 3 + 1
    codes, scale, zero = minmax_quantize(x.float().reshape(2, 2, 2, 32, 64), 2, dim=3)
    lo, hi = x.reshape(2, 2, 2, 32, 64).amin(3), x.reshape(2, 2, 2, 32, 64).amax(3)
    assert torch.equal(zero, lo.half())
    assert torch.allclose(scale.float(), (hi - zero.float()) / 3, rtol=1e-3)
    for a, b in zip(kivi_encode_keys(x, 2, 32), kivi_encode_keys(x, 2, 32, fit_iterations=0)):
        assert torch.equal(a, b)


def test_non_finite_entries_stay_out_of_the_fit():
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    x[0, 3], x[1, 5] = float("inf"), float("nan")
    codes, scale, zero = minmax_quantize(x, 2, dim=-1, fit_iterations=4)
    assert torch.isfinite(scale).all() and torch.isfinite(zero).all()
    assert codes[0, 3] == 0 and codes[1, 5] == 0
    clean = _group_error(x[2:], 2, 4)
    assert torch.isfinite(clean).all()


def test_encoders_pass_the_option_on():
    x = torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(3))
    for encode in (kivi_encode_keys, kivi_encode_values):
        plain, fitted = encode(x, 2, 32), encode(x, 2, 32, fit_iterations=4)
        assert [t.shape for t in plain] == [t.shape for t in fitted]
        assert [t.dtype for t in plain] == [t.dtype for t in fitted]
        assert not torch.equal(plain[1], fitted[1])  # the scales differ


def _config() -> LlamaConfig:
    return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, head_dim=64)


def _feed(cache, steps, seed=0):
    """Feed keys (with a per-channel offset, as real keys carry) and values of `steps` token counts into both layers;
    returns per layer (what the last update returned, every key fed, every value fed)."""
    gen = torch.Generator().manual_seed(seed)
    out, fed = {}, {0: ([], []), 1: ([], [])}
    for t in steps:
        for layer in range(2):
            k = torch.randn(1, 2, t, 64, generator=gen) + 4.0 * torch.randn(1, 2, 1, 64, generator=gen)
            v = torch.randn(1, 2, t, 64, generator=gen)
            fed[layer][0].append(k)
            fed[layer][1].append(v)
            out[layer] = (cache.update(k, v, layer), torch.cat(fed[layer][0], 2), torch.cat(fed[layer][1], 2))
    return out


@pytest.mark.parametrize("settings", [dict(fit_iterations=4), dict(fit_iterations=2, sink_tokens=4)],
                         ids=["fit4", "fit2-sinks4"])
def test_cache_memory_is_exact_and_the_same_as_min_max(settings):
    config = _config()
    base = dict(bits=2, group_size=32, residual_length=32)
    cache, plain = KIVICache(config, **base, **settings), KIVICache(config, **base)
    sinks = dict(sink_tokens=settings["sink_tokens"]) if "sink_tokens" in settings else {}
    plain_same_window = KIVICache(config, **base, **sinks)
    for steps in ([100], [1, 1, 40]):
        _feed(cache, steps)
        _feed(plain_same_window, steps)
        _feed(plain, steps)
        n = cache.get_seq_length()
        want = estimate_cache_bytes(config, n, batch_size=1, method="kivi", dtype=torch.float32, **base, **settings)
        assert cache.memory_footprint() == want
        assert cache.memory_footprint() == plain_same_window.memory_footprint()  # the option costs no byte
    assert cache.memory_footprint()["codes"] > 0


def test_cache_with_refit_reconstructs_closer():
    config = _config()
    errors = {}
    for fit in (0, 4):
        cache = KIVICache(config, bits=2, group_size=32, residual_length=32, fit_iterations=fit)
        out = _feed(cache, [160, 1], seed=5)  # the second update returns the packed tokens
        (ks, vs), k, v = out[0]
        errors[fit] = (float(((ks - k) ** 2).sum()), float(((vs - v) ** 2).sum()))
    assert errors[0][0] > 0 and errors[0][1] > 0  # packed tokens were returned
    assert errors[4][0] < errors[0][0] and errors[4][1] < errors[0][1], errors


@pytest.mark.parametrize("value,error,message", [
    (-1, ValueError, r"fit_iterations must be an integer >= 0 \(0: the paper's min-max range; n: n least-squares "
                     r"refits of scale and zero\), got -1"),
    (2.0, TypeError, r"fit_iterations must be an integer >= 0 .*got float 2.0"),
    (True, TypeError, r"fit_iterations must be an integer >= 0 .*got bool True"),
], ids=["negative", "float", "bool"])
def test_fit_iterations_is_validated(value, error, message):
    with pytest.raises(error, match=message):
        KIVICache(fit_iterations=value)

