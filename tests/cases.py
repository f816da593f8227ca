"""What the test modules share: the one method table, tiny models, inputs and generation helpers.

Test modules import from here (and from nowhere else in tests/). A method case is a registry name plus the settings
that make the variant (bits, flags), with two windows:

- ``small``: short test sequences go through the packed storage, with flushes during decoding;
- ``lossless``: a residual window longer than any sequence, so nothing is ever quantized (the output must then equal
  a ``DynamicCache``'s exactly).

A group size that does not divide a model's head_dim is reduced to one that does (``Case.settings_for``), so one case
runs on the 64-dim tiny Llama, the 32-dim tiny Qwen2 and the 128-dim real model alike.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tq_transformers.cache import head_dim_of
from tq_transformers.generation import CACHE_KWARG
from tq_transformers.registry import METHOD_NAMES, get_method

LOSSLESS = 10**9  # a residual window longer than any sequence (a multiple of every group size: KIVI accepts it)

#: |fast - reference| of scores and logits on the CPU, where the fast path computes attention on the packed codes
#: (``tq_transformers.cpu_attention``; exact equality before it, when the fast path fell back to the reference)
CPU_FAST_ATOL = 1e-4

HAS_GPU = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
#: marks of a test that needs the GPU kernels (`gpu`: skipped by conftest without CUDA; skipif: without Triton)
GPU = (pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs CUDA and Triton"))


def needs_gpu(fn):
    """Decorator: the GPU marks (``GPU``)."""
    for mark in GPU:
        fn = mark(fn)
    return fn


# ----------------------------------------------------------------------------------------------------------------------
# The method table
# ----------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """One method variant under test.

    id: the readable test id.
    method: the registry name (``tq_transformers.METHOD_NAMES``).
    settings: what makes the variant (bits, flags); the window is left to ``small`` / ``lossless`` / the defaults.
    small: the window under which short sequences go through the packed storage, flushing while decoding.
    """

    id: str
    method: str
    settings: dict
    small: dict

    @property
    def lossless(self) -> dict:
        return {"residual_length": LOSSLESS}

    @property
    def cache_class(self):
        return get_method(self.method)

    def accepts(self, name: str) -> bool:
        """Whether the method has the setting `name` (KIVI has no flush_size: its flush is its group)."""
        return any(f.name == name and f.init for f in dataclasses.fields(self.cache_class.config_class))

    def settings_for(self, window: str = "small", head_dim: int | None = None, **overrides) -> dict:
        """The cache's keyword arguments: the variant's settings, a window ("small", "lossless" or "default": the
        method's own), then `overrides`; a group size is fitted to `head_dim` when given."""
        windows = {"small": self.small, "lossless": {**self.small, **self.lossless}, "default": {}}
        kwargs = {**self.settings, **windows[window], **overrides}
        if head_dim is not None:
            kwargs = fit_group_size(self.cache_class, kwargs, head_dim)
            for side in ("key", "value"):  # a mixed cache's sides ({"method": name, **settings})
                if isinstance(kwargs.get(side), dict):
                    spec = kwargs[side]
                    kwargs[side] = {"method": spec["method"],
                                    **fit_group_size(get_method(spec["method"]), spec, head_dim, skip=("method",))}
        return kwargs

    def kwargs(self, config, window: str = "small", **overrides) -> dict:
        """``settings_for`` a model config (its head_dim): the keyword arguments of ``enable`` or the cache."""
        return self.settings_for(window, head_dim_of(config), **overrides)

    def cache(self, config=None, window: str = "small", head_dim: int | None = None, **overrides):
        """A fresh cache of this case for a model `config` (or None: layers created lazily, for `head_dim`)."""
        if head_dim is None and config is not None:
            head_dim = head_dim_of(config)
        return self.cache_class(config, **self.settings_for(window, head_dim, **overrides))


def fit_group_size(cache_class, kwargs: dict, head_dim: int, skip=()) -> dict:
    """`kwargs` with a group size that does not divide `head_dim` reduced to one that does."""
    kwargs = {k: v for k, v in kwargs.items() if k not in skip}
    if any(f.name == "group_size" and f.init for f in dataclasses.fields(cache_class.config_class)):
        group = kwargs.get("group_size", cache_class.config_class().group_size)
        if head_dim % group:
            kwargs["group_size"] = math.gcd(group, head_dim)
    return kwargs


_WINDOW = dict(residual_length=16, flush_size=16)

CASES = {
    c.id: c
    for c in [
        Case("turboquant4", "turboquant", dict(bits=4), dict(residual_length=0, flush_size=16)),
        Case("turboquant3", "turboquant", dict(bits=3), _WINDOW),
        Case("turboquant2", "turboquant", dict(bits=2), _WINDOW),
        Case("turboquant3-qjl", "turboquant", dict(bits=3, qjl=True), _WINDOW),
        Case("kivi2", "kivi", dict(bits=2), dict(group_size=16, residual_length=16)),
        Case("kivi4", "kivi", dict(bits=4), dict(group_size=16, residual_length=16)),
        Case("bonsai", "bonsai", {}, _WINDOW),  # faithful Q1_0
        Case("bonsai-improved", "bonsai", dict(center=True, rotate=True), _WINDOW),  # = BonsaiCache.improved
        Case("bonsai-improved-l2", "bonsai", dict(center=True, rotate=True, scale="l2"), _WINDOW),
        # issue 14: keys and values apart (per-side bits, mixed methods) and fractional TurboQuant rates
        Case("turboquant2.5", "turboquant", dict(bits=2.5), _WINDOW),
        Case("turboquant3.5", "turboquant", dict(bits=3.5), _WINDOW),
        Case("turboquant-k4v2", "turboquant", dict(key_bits=4, value_bits=2), _WINDOW),
        Case("kivi-k4v2", "kivi", dict(key_bits=4, value_bits=2), dict(group_size=16, residual_length=16)),
        Case("mixed-tq4-bonsai", "mixed", dict(key={"method": "turboquant", "bits": 4},
                                              value={"method": "bonsai", "center": True, "rotate": True}), _WINDOW),
        Case("mixed-kivi2-tq3.5", "mixed", dict(key={"method": "kivi", "bits": 2, "group_size": 16},
                                               value={"method": "turboquant", "bits": 3.5}), _WINDOW),
        # session 11: TurboQuant's codebook as a uniform grid (values alone: the other side stays Lloyd-Max)
        Case("turboquant4-uniform-values", "turboquant", dict(bits=4, value_grid="uniform"), _WINDOW),
    ]
}
assert {c.method for c in CASES.values()} == set(METHOD_NAMES), "every registered method has a case"

#: one case of each method and the improved Bonsai: the transformers plumbing
PLUMBING = ("turboquant4", "kivi2", "bonsai", "bonsai-improved")
#: the decode kernels' formats and options: the fast path against the reference path
FAST = ("turboquant4", "turboquant2", "kivi2", "bonsai", "bonsai-improved-l2")
#: one case per kernel family and option, for the longer runs (beam search, CUDA graphs)
SHORT = ("turboquant4", "kivi2", "bonsai-improved-l2")


def case(case_id: str) -> Case:
    return CASES[case_id]


def params(*case_ids: str, marks=()) -> list:
    """``pytest.param`` of each case, with its readable id."""
    return [pytest.param(CASES[i], id=i, marks=marks) for i in case_ids]


# ----------------------------------------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------------------------------------
COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, vocab_size=512)
VOCAB = COMMON["vocab_size"]
ARCHS = ("llama", "qwen2", "gemma3")


def _peaky(model):
    """Random models have flat next-token distributions, on which any noise flips the argmax; scaling the output
    head makes them decisive like a trained model, so greedy comparisons mean something."""
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def build_tiny(arch: str, dtype=torch.float32):
    """A tiny random model of `arch` on the CPU (seeded: the same weights every call)."""
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(**COMMON, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":  # q/k/v biases, like the real Qwen2.5
        cfg = Qwen2Config(**COMMON, num_key_value_heads=2, max_position_embeddings=4096)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gemma3":  # sliding-window layers mixed with full-attention ones
        cfg = Gemma3TextConfig(
            **COMMON, num_key_value_heads=1, head_dim=64, sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            max_position_embeddings=4096,
        )
        model = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.generation_config.pad_token_id = 0
    return _peaky(model).to(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs and generation
# ----------------------------------------------------------------------------------------------------------------------
def random_ids(batch: int = 1, length: int = 60, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def padded_inputs(device="cpu") -> dict:
    """Two rows of 40 tokens, the second left-padded by 15."""
    torch.manual_seed(1)
    ids = torch.randint(3, 500, (2, 40))
    mask = torch.ones_like(ids)
    ids[1, :15] = 0
    mask[1, :15] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def generate_with_scores(model, inputs: dict, cache, new_tokens: int = 24, **kwargs):
    """Greedy generation; returns (sequences, scores [steps, B, V])."""
    out = model.generate(
        **inputs, max_new_tokens=new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True,
        **{CACHE_KWARG: cache}, **kwargs,
    )
    return out.sequences, torch.stack(out.scores)


def prefill(model, ids: torch.Tensor, cache):
    """One forward of `ids` [B, T] through `cache`; returns the cache."""
    with torch.no_grad():
        model(ids, use_cache=True, **{CACHE_KWARG: cache})
    return cache


def continue_greedy(model, ids: torch.Tensor, cache, new_tokens: int):
    """``generate_with_scores`` of the whole unpadded conversation `ids` from a prefilled `cache` (generate feeds only
    the uncached suffix)."""
    return generate_with_scores(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cache, new_tokens)


def assert_valid_tokens(sequences: torch.Tensor, prompt: torch.Tensor) -> None:
    """Generated ids start with the prompt and lie in the vocabulary."""
    assert bool((sequences[:, : prompt.shape[1]] == prompt.to(sequences.device)).all())  # rows: beams or samples
    assert int(sequences.min()) >= 0 and int(sequences.max()) < VOCAB, (int(sequences.min()), int(sequences.max()))


def model_state(model) -> dict:
    """What our wrappers may touch on a model, to compare before and after: the instance dict (names -> objects),
    the methods of its class hierarchy, the attention implementation of every config in it, device, dtype, mode."""
    from tq_transformers.fast_attention import attn_implementation_of

    configs = {id(m.config): m.config for m in model.modules() if getattr(m, "config", None) is not None}
    return {
        "instance": dict(vars(model)),
        # methods and descriptors (plain values are left out: transformers caches some on the class, e.g.
        # `_can_set_attn_implementation_cached_value`)
        "class": {(cls.__name__, k): v for cls in type(model).__mro__ for k, v in vars(cls).items()
                  if callable(v) or isinstance(v, (property, classmethod, staticmethod))},
        "attn": sorted(str(attn_implementation_of(c)) for c in configs.values()),
        "device": {p.device for p in model.parameters()},
        "dtype": {p.dtype for p in model.parameters()},
        "training": model.training,
    }


def assert_same_state(before: dict, after: dict) -> None:
    """`model_state` equal: the same keys, each value the very same object (or an equal plain value)."""
    assert before["instance"].keys() == after["instance"].keys(), (
        sorted(set(after["instance"]) ^ set(before["instance"])))
    changed = [k for k in before["instance"] if before["instance"][k] is not after["instance"][k]]
    assert changed == [], f"instance attributes replaced: {changed}"
    assert before["class"].keys() == after["class"].keys()
    changed = [k for k in before["class"] if before["class"][k] is not after["class"][k]]
    assert changed == [], f"class attributes replaced: {changed}"
    for key in ("attn", "device", "dtype", "training"):
        assert before[key] == after[key], key


def one_thread():
    """Generator for an autouse fixture: torch on one thread while a module's tests run (restored after). Tiny
    tensors gain nothing from two threads, and on a loaded 2-core machine OpenMP contention made a tiny model's
    30-token generate take 12 s instead of 0.6 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
