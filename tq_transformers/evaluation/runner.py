"""The evaluation passes: every method runs side by side in one batched forward, one batch row (or block of rows)
per cache, against the full-precision reference in the first block.

- `RowSplitCache` puts several caches (one per method) behind one `transformers.Cache`: each layer's update is split
  along the batch and sent to each cache, so one forward of the model drives every method on the same tokens.
- The prefill runs once in full precision (a `DynamicCache`) and its keys and values are replayed into each method's
  cache with the same `update` calls the model would make; the state is the same as after a prefill through that
  cache (a prefill attends to its own exact keys in every method), at a fraction of the cost.
- `FidelityProbe` sees the model's attention calls (through the attention function `capture_attention` registers
  under its own name, `PROBE_ATTN_NAME`): for the reference row it feeds the exact new keys and values into shadow
  caches of each method and compares softmax(q K^T / sqrt(d)) V from the shadow's (partly quantized) keys and values
  with the exact ones, for the same queries.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import math
import warnings
from typing import Any

import torch
from transformers import AttentionInterface, DynamicCache, DynamicLayer
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import METHOD_NAMES, make_cache
from . import metrics
from .progress import FORWARD_OVERHEAD, LineProgress, Overall, bar
from .util import describe

#: The full-precision reference setting: a `DynamicCache` in the model's dtype (bf16, fp16 or fp32).
REFERENCE = "full"
#: Former name of the reference, accepted with a FutureWarning.
DEPRECATED_REFERENCE_NAMES = ("fp16",)
#: The attention implementation name the fidelity probe registers (SDPA plus the probe's observation).
PROBE_ATTN_NAME = "tq_probe"


def canonical_method(method: str, where: str = "") -> str:
    """`method`, with the deprecated reference name "fp16" mapped to "full" (and a FutureWarning)."""
    if method in DEPRECATED_REFERENCE_NAMES:
        warnings.warn(
            f"method {method!r}{where} is deprecated: the full-precision reference is named {REFERENCE!r} "
            f"(it runs in the model's dtype, not necessarily fp16)", FutureWarning, stacklevel=3)
        return REFERENCE
    return method


def reference_label(dtype: torch.dtype | str) -> str:
    """Display name of the reference setting, e.g. "full (bfloat16)"."""
    name = str(dtype).removeprefix("torch.")
    return f"{REFERENCE} ({name})"


def attn_implementation(model) -> str | None:
    """The model's attention implementation name.

    transformers (through 5.x) has no public getter: `set_attn_implementation` is the public setter and the models
    dispatch on `config._attn_implementation`, so this one helper reads that property.
    """
    return model.config._attn_implementation


@dataclasses.dataclass
class MethodSpec:
    """One cache setting: a display `name`, a `method` ("full" or a quantized method) and its keyword arguments."""

    name: str
    method: str
    kwargs: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {describe(self.name)}")
        if not isinstance(self.method, str):
            raise TypeError(f"method must be a str, got {describe(self.method)} (in setting {self.name!r})")
        if not isinstance(self.kwargs, dict):
            raise TypeError(f"kwargs must be a dict, got {describe(self.kwargs)} (in setting {self.name!r})")
        self.method = canonical_method(self.method, f" (in setting {self.name!r})")
        allowed = (REFERENCE, *METHOD_NAMES)
        if self.method not in allowed:
            raise ValueError(f"method must be one of {allowed}, got {self.method!r} (in setting {self.name!r})")

    def make(self, config) -> Cache:
        """A fresh cache of this setting for a model `config`."""
        if self.method == REFERENCE:
            return DynamicCache(config=config)
        return make_cache(self.method, config, **self.kwargs)


def cache_bytes(cache: Cache) -> int:
    """Bytes a cache holds: `memory_footprint()["total"]` for ours, the stored tensors of a DynamicCache."""
    if hasattr(cache, "memory_footprint"):
        return int(cache.memory_footprint()["total"])
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------------------------------------------
# Several caches behind one Cache
# ----------------------------------------------------------------------------------------------------------------
class RowSplitLayer(CacheLayerMixin):
    """One layer of a `RowSplitCache`: batch rows are split into blocks, one block per underlying layer."""

    is_compileable = False

    def __init__(self, parts: list, rows: list[int]):
        super().__init__()
        self.parts, self.rows = parts, rows
        self.is_sliding = getattr(parts[0], "is_sliding", False)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        outs = [
            part.update(k, v, *args, **kwargs)
            for part, k, v in zip(self.parts, key_states.split(self.rows), value_states.split(self.rows))
        ]
        self.is_initialized = True
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.parts[0].get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.parts[0].get_seq_length()

    def get_max_length(self) -> int:
        return self.parts[0].get_max_length()


class RowSplitCache(Cache):
    """`caches[i]` serves batch rows `sum(rows[:i]) .. sum(rows[:i+1])`; every cache must hold the same length."""

    def __init__(self, caches: list[Cache], rows: list[int]):
        if len(caches) != len(rows):
            raise ValueError(f"rows must give one row count per cache ({len(caches)}), got {rows!r}")
        n_layers = {len(c.layers) for c in caches}
        if len(n_layers) != 1:
            raise ValueError(f"caches must have the same number of layers, got {sorted(n_layers)}")
        layers = [RowSplitLayer([c.layers[i] for c in caches], rows) for i in range(n_layers.pop())]
        super().__init__(layers=layers)
        self.caches = caches


def replay_prefill(prefill: DynamicCache, cache: Cache) -> None:
    """Feed each layer's prefill keys and values into `cache` exactly as the model's prefill would."""
    for layer_idx, layer in enumerate(prefill.layers):
        cache.update(layer.keys, layer.values, layer_idx)


def can_replay(prefill: DynamicCache) -> bool:
    """Replaying needs every layer to hold all prefill tokens (no sliding-window layers)."""
    return all(type(layer) is DynamicLayer for layer in prefill.layers)


def forward(model, input_ids: torch.Tensor, cache: Cache, last_only: bool = False,
            attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, T, V] (float32) of `input_ids` [B, T] continuing `cache` ([B, 1, V] with `last_only`); a padded
    batch passes its `attention_mask` [B, cached + T] and `position_ids` [B, T]."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    kwargs = {name: cache}
    if last_only:
        kwargs["logits_to_keep"] = 1
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True, **kwargs)
    return out.logits.float()


def build_caches(model, specs: list[MethodSpec], prompt: torch.Tensor):
    """Prefill `prompt` [b, T] once; return (one filled cache per spec, last-position logits [b, V])."""
    config = model.config
    prefill = DynamicCache(config=config)
    logits = forward(model, prompt, prefill, last_only=True)[:, -1]
    caches = [spec.make(config) for spec in specs]
    if can_replay(prefill):
        for cache in caches:
            replay_prefill(prefill, cache)
    else:  # sliding-window layers: a real prefill through every cache
        forward(model, prompt.repeat(len(specs), 1), RowSplitCache(caches, [prompt.shape[0]] * len(specs)), True)
    return caches, logits, prefill


# ----------------------------------------------------------------------------------------------------------------
# Attention fidelity
# ----------------------------------------------------------------------------------------------------------------
class FidelityProbe:
    """Cosine of attention outputs from each method's cache against the exact cache, per layer and query head.

    Shadow caches of each quantized setting receive the reference row's exact keys and values; for every attention
    call while `active`, the reference row's queries attend (causally) to the exact and to the shadow's keys and
    values, and the cosine of the two outputs is accumulated per (layer, head) over query tokens.
    """

    def __init__(self, specs: list[MethodSpec], config, prefill: DynamicCache):
        self.specs = [s for s in specs if s.method != REFERENCE]
        self.shadows = {s.name: s.make(config) for s in self.specs}
        for cache in self.shadows.values():
            replay_prefill(prefill, cache)
        self.sums: dict[str, dict[int, torch.Tensor]] = {s.name: {} for s in self.specs}
        self.counts: dict[int, int] = {}
        self.active = False

    def observe(self, module, query, key, value) -> None:
        if not self.active:
            return
        layer = module.layer_idx
        q, k, v = query[:1], key[:1], value[:1]
        n = q.shape[-2]
        scale = getattr(module, "scaling", None)
        ref = metrics.attention_output(q, k, v, scale=scale)
        for name, shadow in self.shadows.items():
            ks, vs = shadow.update(k[..., -n:, :], v[..., -n:, :], layer)
            out = metrics.attention_output(q, ks.to(q.device), vs.to(q.device), scale=scale)
            cos = metrics.cosine(out, ref).sum(-1)[0].cpu()  # [Hq], summed over query tokens
            acc = self.sums[name]
            acc[layer] = acc[layer] + cos if layer in acc else cos
        self.counts[layer] = self.counts.get(layer, 0) + n

    def add(self, other: FidelityProbe) -> None:
        """Accumulate another probe's sums (a further text segment)."""
        for name, per_layer in other.sums.items():
            for layer, value in per_layer.items():
                acc = self.sums[name]
                acc[layer] = acc[layer] + value if layer in acc else value
        for layer, n in other.counts.items():
            self.counts[layer] = self.counts.get(layer, 0) + n

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per setting: mean cosine, worst layer (index and its mean), worst (layer, head), per-layer means."""
        out = {}
        for name, per_layer in self.sums.items():
            layers = sorted(per_layer)
            if not layers:
                continue
            table = torch.stack([per_layer[i] / self.counts[i] for i in layers]).double()  # [L, Hq]
            layer_means = table.mean(1)
            worst = int(layer_means.argmin())
            flat = int(table.argmin())
            out[name] = {
                "mean": float(table.mean()),
                "worst_layer": layers[worst],
                "worst_layer_mean": float(layer_means[worst]),
                "worst_head": [layers[flat // table.shape[1]], flat % table.shape[1]],
                "worst_head_value": float(table.min()),
                "per_layer": [float(x) for x in layer_means],
            }
        return out


_ACTIVE_PROBE: contextvars.ContextVar[FidelityProbe | None] = contextvars.ContextVar("tq_probe", default=None)


def _probe_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """SDPA attention that first shows its inputs to the active `FidelityProbe` (if any)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    probe = _ACTIVE_PROBE.get()
    if probe is not None:
        probe.observe(module, query, key, value)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, *args, **kwargs)


def register_probe_attention() -> None:
    """Register `PROBE_ATTN_NAME` with transformers: SDPA's attention (observed) and SDPA's mask. Idempotent."""
    AttentionInterface.register(PROBE_ATTN_NAME, _probe_attention)
    AttentionMaskInterface.register(PROBE_ATTN_NAME, sdpa_mask)


@contextlib.contextmanager
def capture_attention(model, probe: FidelityProbe):
    """Route `model`'s attention calls through `probe.observe` while inside.

    The model is switched to the registered `PROBE_ATTN_NAME` implementation (SDPA underneath, so eager models are
    probed under SDPA) and switched back to its own implementation afterwards; no other model and no global
    attention function is changed.
    """
    impl = attn_implementation(model)
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"attention implementation must be 'sdpa' or 'eager' for the fidelity probe, got {impl!r}")
    register_probe_attention()
    token = _ACTIVE_PROBE.set(probe)
    model.set_attn_implementation(PROBE_ATTN_NAME)
    try:
        yield probe
    finally:
        model.set_attn_implementation(impl)
        _ACTIVE_PROBE.reset(token)


# ----------------------------------------------------------------------------------------------------------------
# Passes
# ----------------------------------------------------------------------------------------------------------------
def forward_units(rows: int, tokens: int) -> int:
    """Work of one forward pass of `rows` x `tokens` new tokens, in the units of `progress.Overall`."""
    return rows * tokens + FORWARD_OVERHEAD


def quality_units(n_specs: int, segments: int, context_length: int, continuation_length: int, chunk_size: int) -> int:
    """Work of `quality_pass` (prefill of each segment, then the scored chunks of every setting side by side)."""
    scored = continuation_length  # a segment holds one more token than it scores
    chunks = [min(chunk_size, scored - s) for s in range(0, scored, chunk_size)]
    return segments * (forward_units(1, context_length) + sum(forward_units(n_specs, c) for c in chunks))


def greedy_units(n_specs: int, rows: int, prompt_length: int, new_tokens: int) -> int:
    """Work of `greedy_pass` (prefill of the prompts, then `new_tokens - 1` decode steps of every setting)."""
    return forward_units(rows, prompt_length) + (new_tokens - 1) * forward_units(n_specs * rows, 1)


def _settings_label(specs: list[MethodSpec]) -> str:
    return f"{len(specs)} caches side by side" if len(specs) > 1 else specs[0].name


def quality_pass(model, segments: list[torch.Tensor], specs: list[MethodSpec], context_length: int,
                 chunk_size: int, overall: Overall | None = None) -> dict[str, Any]:
    """Perplexity, top-1 agreement, KL and attention fidelity of each setting (`specs[0]` is the reference).

    Each segment [context_length + C + 1] is prefilled for `context_length` tokens, then the next C tokens are fed
    in chunks of `chunk_size` through every cache side by side; the C predictions (of tokens context+1 .. context+C)
    are scored. Returns per setting: perplexity, top-1, KL, the per-token negative log-likelihoods (for intervals),
    bytes held at the end, and fidelity.
    """
    n = len(specs)
    stats = {s.name: {"nll": 0.0, "top1": 0.0, "kl": 0.0, "tokens": 0, "token_nll": []} for s in specs}
    fidelity = None
    held: dict[str, int] = {}
    held_len = None
    steps_per_segment = [range(0, len(seg) - context_length - 1, chunk_size) for seg in segments]
    progress = bar(desc=f"perplexity+fidelity ({_settings_label(specs)})", unit="chunk",
                   total=sum(len(s) for s in steps_per_segment), overall=overall)
    with progress:
        for k, (seg, steps) in enumerate(zip(segments, steps_per_segment)):
            progress.set_postfix_str(f"segment {k + 1}/{len(segments)}: prefilling {context_length} tokens")
            seg = seg.to(model.device)
            caches, _, prefill = build_caches(model, specs, seg[None, :context_length])
            probe = FidelityProbe(specs, model.config, prefill)
            del prefill
            _advance(progress, overall, forward_units(1, context_length), 0)
            cache = RowSplitCache(caches, [1] * n)
            cont = seg[context_length:]
            with capture_attention(model, probe):
                probe.active = True
                for start in steps:
                    inputs = cont[start:min(start + chunk_size, len(cont) - 1)]
                    targets = cont[start + 1:start + 1 + len(inputs)]
                    logits = forward(model, inputs[None].repeat(n, 1), cache)  # [n, c, V]
                    ref = logits[0]
                    for i, spec in enumerate(specs):
                        st = stats[spec.name]
                        c = len(targets)
                        st["nll"] += c * math.log(metrics.perplexity(logits[i], targets))
                        st["top1"] += c * metrics.top1_agreement(logits[i], ref)
                        st["kl"] += c * metrics.kl_divergence(logits[i], ref)
                        st["tokens"] += c
                        st["token_nll"].extend(metrics.token_nll(logits[i], targets).tolist())
                    _advance(progress, overall, forward_units(n, len(inputs)), 1,
                             f"segment {k + 1}/{len(segments)}, {chunk_size} tokens a chunk")
            if fidelity is None:
                fidelity = probe
            else:
                fidelity.add(probe)
            held = {spec.name: cache_bytes(c) for spec, c in zip(specs, caches)}
            held_len = caches[0].get_seq_length()
    fid = fidelity.summary() if fidelity is not None else {}
    out = {}
    for spec in specs:
        st = stats[spec.name]
        tokens = max(st["tokens"], 1)
        out[spec.name] = {
            "perplexity": math.exp(st["nll"] / tokens),
            "top1_agreement": st["top1"] / tokens,
            "kl_divergence": st["kl"] / tokens,
            "scored_tokens": st["tokens"],
            "token_nll": st["token_nll"],
            "held_bytes": held.get(spec.name),
            "held_tokens": held_len,
            "fidelity": fid.get(spec.name, {"mean": 1.0, "worst_layer": None, "worst_layer_mean": 1.0}),
        }
    return out


def _advance(progress, overall: Overall | None, units: int, steps: int, postfix: str | None = None) -> None:
    """Count `steps` steps on the phase's bar and `units` of work on the overall estimate."""
    if overall is not None:
        overall.advance(units)
    text = "; ".join(t for t in (postfix, overall.describe() if overall is not None else None) if t)
    if text and not isinstance(progress, LineProgress):  # a plain-line display appends the overall estimate itself
        progress.set_postfix_str(text, refresh=False)
    elif postfix is not None:
        progress.set_postfix_str(postfix)
    progress.update(steps)


def greedy_pass(model, prompts: torch.Tensor, specs: list[MethodSpec], new_tokens: int, desc: str = "greedy decode",
                overall: Overall | None = None):
    """Greedy continuation of `prompts` [b, T] through every setting side by side: token ids [len(specs), b, N]."""
    prompts = prompts.to(model.device)
    b, n = prompts.shape[0], len(specs)
    with bar(desc=f"{desc} ({_settings_label(specs)})", unit="token", total=new_tokens, overall=overall) as progress:
        progress.set_postfix_str(f"prefilling {b} x {prompts.shape[1]} tokens")
        caches, last_logits, prefill = build_caches(model, specs, prompts)
        del prefill
        cache = RowSplitCache(caches, [b] * n)
        token = last_logits.argmax(-1).repeat(n)  # the prefill's prediction is exact for every cache
        out = [token]
        _advance(progress, overall, forward_units(b, prompts.shape[1]), 1, f"{b} x {n} rows a step")
        for _ in range(new_tokens - 1):
            token = forward(model, token[:, None], cache)[:, -1].argmax(-1)
            out.append(token)
            _advance(progress, overall, forward_units(n * b, 1), 1, f"{b} x {n} rows a step")
    return torch.stack(out, dim=-1).view(n, b, new_tokens).cpu()
