"""Small, pure metric functions of the evaluation (each one checked against a hand-computed case in the tests)."""

from __future__ import annotations

import math
import re

import torch


def cosine(a: torch.Tensor, b: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarity of `a` and `b` along `dim` (computed in float64; 0 where either vector is zero)."""
    a, b = a.double(), b.double()
    num = (a * b).sum(dim)
    den = a.norm(dim=dim) * b.norm(dim=dim)
    return torch.where(den > eps, num / den.clamp_min(eps), torch.zeros_like(num))


def attention_output(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v (scale defaults to 1 / sqrt(d)) for `q` [B, Hq, Q, D] and `k`, `v` [B, Hkv, K, D]
    (grouped-query heads repeated).

    With `causal`, the Q queries are the last Q positions of the K keys: query i sees keys 0 .. K - Q + i.
    Computed in float32.
    """
    q, k, v = q.float(), k.float(), v.float()
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if causal:
        n_q, n_k = q.shape[-2], k.shape[-2]
        allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean negative log-likelihood) of `targets` [N] under `logits` [N, V] (natural log)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return float(torch.exp(nll.mean()))


def top1_agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Fraction of positions where the arg-max token of `logits` equals that of `ref_logits` ([N, V] both)."""
    return float((logits.argmax(-1) == ref_logits.argmax(-1)).double().mean())


def kl_divergence(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Mean over positions of KL(P_ref || P) in nats, P = softmax(logits), P_ref = softmax(ref_logits)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.double(), dim=-1)
    return float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())


def _normalize(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def needle_found(generated: str, answer: str) -> bool:
    """True if `answer` appears in `generated`, ignoring case, spaces and punctuation ("7-4-1-9-3" == "7 4 1 9 3")."""
    return _normalize(answer) in _normalize(generated)


def common_prefix_length(a, b) -> int:
    """Number of leading tokens on which sequences `a` and `b` agree (tokens before the first divergence)."""
    n = 0
    for x, y in zip(list(a), list(b)):
        if x != y:
            break
        n += 1
    return n


def relative_change(value: float, reference: float) -> float:
    """(value - reference) / reference, in percent."""
    return 100.0 * (value - reference) / reference


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (nats, float64) of each of `targets` [N] under `logits` [N, V]: a [N] tensor."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def bootstrap_perplexity_change(nll, ref_nll, resamples: int = 2000, block: int = 8, level: float = 0.95,
                                seed: int = 0) -> tuple[float, float]:
    """Percentile interval (in percent) of the perplexity change of `nll` against `ref_nll` (per-token NLLs of the
    same scored tokens), by a paired moving-block bootstrap.

    Each resample draws ceil(N / block) blocks of `block` consecutive token positions (the same positions for both,
    so the pairing is kept and nearby tokens' correlation is respected), and computes
    100 * (exp(mean nll - mean ref_nll) - 1). Returns the (1 - level) / 2 and (1 + level) / 2 quantiles.
    """
    nll = torch.as_tensor(nll, dtype=torch.float64).flatten()
    ref_nll = torch.as_tensor(ref_nll, dtype=torch.float64).flatten()
    if nll.shape != ref_nll.shape or nll.numel() == 0:
        raise ValueError(
            f"nll and ref_nll must be non-empty and of one length, got {nll.numel()} and {ref_nll.numel()}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    n = nll.numel()
    block = max(1, min(int(block), n))
    n_blocks = -(-n // block)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - block + 1, (resamples, n_blocks), generator=gen)
    idx = (starts[:, :, None] + torch.arange(block)).reshape(resamples, -1)[:, :n]  # [R, n]
    diff = (nll - ref_nll)[idx].mean(-1)
    change = 100.0 * torch.expm1(diff)
    lo, hi = torch.quantile(change, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)
