"""Hand-computed checks of the evaluation metrics."""

import math

import pytest
import torch

from tq_transformers.evaluation import metrics


def test_cosine_known_vectors():
    a = torch.tensor([[1.0, 0.0], [1.0, 2.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [-2.0, -4.0], [1.0, 0.0]])
    got = metrics.cosine(a, b)
    assert got.tolist() == pytest.approx([1 / math.sqrt(2), -1.0, 0.0])


def test_attention_output_hand_case():
    q = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    k = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]).view(1, 1, 2, 2)
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    out = metrics.attention_output(q, k, v, scale=1.0)  # softmax(0, ln 3) = (1/4, 3/4)
    assert out.view(-1).tolist() == pytest.approx([0.25, 0.75])


def test_attention_output_causal_and_grouped():
    q = torch.ones(1, 2, 2, 2)  # two query heads share one kv head; two queries = the last two positions
    k = torch.zeros(1, 1, 2, 2)
    v = torch.tensor([[2.0, 0.0], [0.0, 2.0]]).view(1, 1, 2, 2)
    out = metrics.attention_output(q, k, v)
    assert out[0, :, 0].tolist() == [[2.0, 0.0], [2.0, 0.0]]  # first query sees key 0 only
    assert out[0, :, 1].tolist() == [[1.0, 1.0], [1.0, 1.0]]  # second: equal weights on both


def test_perplexity_known_distribution():
    uniform = torch.zeros(3, 4)
    assert metrics.perplexity(uniform, torch.tensor([0, 1, 3])) == pytest.approx(4.0)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    assert metrics.perplexity(logits, torch.tensor([0, 1])) == pytest.approx(2 * math.sqrt(2))  # exp((ln2+ln4)/2)


def test_top1_agreement():
    ref = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    got = torch.tensor([[0.0, 5.0], [0.0, 1.0], [0.0, 2.0], [0.0, 1.0]])
    assert metrics.top1_agreement(got, ref) == 0.5


def test_kl_divergence_known_distributions():
    ref = torch.log(torch.tensor([[0.5, 0.5]]))
    got = torch.log(torch.tensor([[0.25, 0.75]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert metrics.kl_divergence(got, ref) == pytest.approx(expected)
    assert metrics.kl_divergence(ref, ref) == pytest.approx(0.0)


def test_needle_found_and_not_found():
    assert metrics.needle_found(" 7-4-1-9-3.\nQuestion", "7-4-1-9-3")
    assert metrics.needle_found(" 7 4 1 9 3", "7-4-1-9-3")
    assert not metrics.needle_found(" 7-4-1-9-8.", "7-4-1-9-3")
    assert not metrics.needle_found("I do not know.", "7-4-1-9-3")


def test_common_prefix_length():
    assert metrics.common_prefix_length([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert metrics.common_prefix_length([1, 2], [1, 2]) == 2
    assert metrics.common_prefix_length([5], [1]) == 0
    assert metrics.common_prefix_length(torch.tensor([3, 4]), [3, 4, 5]) == 2


def test_relative_change():
    assert metrics.relative_change(11.0, 10.0) == pytest.approx(10.0)


def test_token_nll_matches_perplexity():
    torch.manual_seed(0)
    logits, targets = torch.randn(7, 11), torch.randint(0, 11, (7,))
    nll = metrics.token_nll(logits, targets)
    assert nll.shape == (7,)
    assert math.exp(float(nll.mean())) == pytest.approx(metrics.perplexity(logits, targets))
    assert float(nll[2]) == pytest.approx(-float(torch.log_softmax(logits[2].double(), -1)[targets[2]]))


def test_bootstrap_interval_hand_cases():
    ref = torch.rand(64, generator=torch.Generator().manual_seed(1)) * 3
    assert metrics.bootstrap_perplexity_change(ref, ref) == (0.0, 0.0)
    lo, hi = metrics.bootstrap_perplexity_change(ref + 0.1, ref)  # every token 0.1 nats worse
    assert lo == pytest.approx(100 * math.expm1(0.1)) and hi == pytest.approx(100 * math.expm1(0.1))


def test_bootstrap_interval_includes_zero_for_pure_noise_and_not_for_a_clear_shift():
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(256, generator=gen) * 4
    noise = torch.randn(256, generator=gen)
    noise -= noise.mean()  # no change on average
    lo, hi = metrics.bootstrap_perplexity_change(ref + noise, ref)
    assert lo < 0 < hi
    lo, hi = metrics.bootstrap_perplexity_change(ref + noise + 0.5, ref)
    assert 0 < lo < 100 * math.expm1(0.5) < hi
    assert metrics.bootstrap_perplexity_change(ref + noise, ref, seed=3) == \
        metrics.bootstrap_perplexity_change(ref + noise, ref, seed=3)  # deterministic
    wide = metrics.bootstrap_perplexity_change(ref + noise, ref)
    narrow = metrics.bootstrap_perplexity_change(ref + noise, ref, level=0.5)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_bootstrap_bad_inputs():
    with pytest.raises(ValueError, match="one length, got 3 and 2"):
        metrics.bootstrap_perplexity_change([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="level must be in"):
        metrics.bootstrap_perplexity_change([1.0], [1.0], level=1.5)
