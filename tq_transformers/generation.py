"""`enable(model, method, **kwargs)`: a fresh quantized cache for every `generate` call.

transformers has no registry for third-party `cache_implementation` names, and a text-generation pipeline that is
handed one cache instance reuses it for every prompt: the second prompt silently continues the first one's cache.
`enable` wraps the model's `generate` (on the instance, the class is untouched) so that

- a call without a cache gets a new one of the chosen method;
- a call with a cache that already holds tokens is accepted only if those tokens are the prefix of the new
  `input_ids` (continuing a conversation); anything else raises a ValueError instead of answering wrongly.

Multi-turn: the cache of a call (``return_dict_in_generate=True``: ``out.past_key_values``; or one you passed) knows
the ids it holds (``cache.token_ids``, recorded after every call; a fork copies them, a saved cache keeps them), so
passing it back with the extended conversation (the previous ``sequences`` followed by the new turn) continues it:
transformers' generate feeds only the ids the cache does not hold (``cache_position``). A cache of another model (its
config's sizes or checkpoint name differ), of another prompt, or of unknown origin raises a ValueError.

`disable(model)` restores the original `generate`.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import torch
import transformers
from packaging import version

from .cache import QuantizedKVCache, model_identity
from .registry import get_method
from .validation import check_bool

# transformers 5.24 renamed generate's `past_key_values` to `cache` (the old name still works, with a warning).
CACHE_KWARG = "cache" if version.parse(transformers.__version__) >= version.parse("5.24.0.dev0") else "past_key_values"


def check_cache_continues(cache, input_ids: torch.Tensor | None) -> None:
    """Raise a ValueError unless `cache` is empty or holds exactly the first tokens of `input_ids`."""
    held = cache.get_seq_length()
    if held == 0:
        return
    known = getattr(cache, "token_ids", None)
    if known is None or input_ids is None:
        raise ValueError(
            f"the cache passed to generate already holds {held} tokens of unknown origin; pass a fresh cache, call "
            "cache.reset(), or set cache.token_ids to the ids it holds to continue a generation"
        )
    if (
        input_ids.shape[0] != known.shape[0]
        or input_ids.shape[1] <= held
        or not torch.equal(input_ids[:, :held].to(known.device), known[:, :held])
    ):
        raise ValueError(
            f"the cache passed to generate holds {held} tokens that are not the start of input_ids (shape "
            f"{tuple(input_ids.shape)}): it belongs to another prompt. Pass a fresh cache or call cache.reset()"
        )


def check_cache_model(cache, config) -> None:
    """Raise a ValueError if `cache` was built for (or loaded into) a model other than the one of `config`: a field
    of ``model_identity`` differs (the checkpoint name only when both are known)."""
    built_for = getattr(cache, "model_config", None)
    if built_for is None or built_for is config:
        return
    mine, theirs = model_identity(built_for), model_identity(config)
    for name, value in mine.items():
        if name == "name_or_path" and not (value and theirs[name]):
            continue
        if value != theirs[name]:
            raise ValueError(
                f"the cache passed to generate was built for another model ({name}={value!r}, this model has "
                f"{theirs[name]!r}); pass a fresh cache or one of this model's"
            )


def enable(model, method: str, fast: bool = False, cuda_graphs: bool | None = None, fuse: bool | str = False,
           **cache_kwargs):
    """Make every `model.generate` call use a fresh `method` cache (a name of ``METHOD_NAMES``).

    Args:
        model: a transformers model with ``generate``.
        method: "turboquant", "kivi" or "bonsai".
        fast: switch the model to the fused decode path (``tq_transformers.fast_attention``: Triton kernels on CUDA,
            the same output as the reference path elsewhere) for the caches that generate uses.
        cuda_graphs: replay decode steps from CUDA graphs (``tq_transformers.cuda_graphs``: the host out of the step;
            without effect on CPU). Default: on with ``fast=True``, unless ``max_cache_len`` is given (a
            fixed-capacity cache, which generate compiles instead: ``tq_transformers.compile``).
        fuse: inside CUDA-graph steps, run the decoder layers' norms and MLPs through ``torch.compile`` (fewer,
            fused kernels per replayed step: ``tq_transformers.cuda_graphs``, "Fusion"): False (default), True
            (inductor) or another ``torch.compile`` backend's name. Needs ``cuda_graphs``. (Graph steps run the
            attention's q / k / v projections as one grouped launch either way: ``tq_transformers.projections``.)
        **cache_kwargs: the method's settings, validated now (a bad value raises here, not at the first prompt).
    Returns:
        the model. Example::

            tq_transformers.enable(model, "turboquant", bits=4)
            pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    """
    cache_cls = get_method(method)
    check_bool("fast", fast)
    fixed = cache_kwargs.get("max_cache_len") is not None  # a fixed-capacity cache: generate compiles the step
    if cuda_graphs is None:
        cuda_graphs = fast and not fixed
    check_bool("cuda_graphs", cuda_graphs)
    if cuda_graphs and not fast:
        raise ValueError("cuda_graphs=True needs fast=True (graphs replay the fused decode path), got fast=False")
    if cuda_graphs and fixed:
        raise ValueError(f"cuda_graphs=True and max_cache_len={cache_kwargs['max_cache_len']} are two ways to the "
                         "same end: a fixed-capacity cache is compiled by generate (tq_transformers.compile); pass "
                         "one of them")
    from . import fusion

    if fusion.check_fuse(fuse) is not None:
        if not cuda_graphs:
            raise ValueError(f"fuse={fuse!r} needs cuda_graphs=True (it runs only in CUDA-graph steps), got "
                             f"cuda_graphs={cuda_graphs}")
        fusion.fusible(model)  # a ValueError now, before anything is switched, when there is nothing to fuse
    cache_cls(model.config, **cache_kwargs)  # validate the arguments once, at enable time
    previous = vars(model).get(_STATE_ATTR)
    previous_attn = previous.previous_attn if previous is not None else None
    replaced = previous.replaced if previous is not None else vars(model).get("generate")
    if fast:
        from . import fast_attention

        installed = fast_attention.install(model)
        previous_attn = previous_attn or installed
    from . import cuda_graphs as graphs

    if cuda_graphs:
        graphs.install(model, fuse=fuse)
    else:
        graphs.uninstall(model)
    setattr(model, _STATE_ATTR, _Enabled(method, dict(cache_kwargs), fast, cuda_graphs, previous_attn, replaced))
    model.generate = types.MethodType(_enabled_generate(type(model).generate), model)
    return model


@dataclasses.dataclass
class _Enabled:
    """What `enable` set on a model (kept in the model's instance dict: a deep copy of the model carries it, and its
    bound methods rebind to the copy)."""

    method: str
    settings: dict
    fast: bool
    cuda_graphs: bool
    previous_attn: str | None  # the attention implementation before fast=True switched it, or None
    replaced: object  # an instance-level generate that was there before the first enable (not ours), or None


_STATE_ATTR = "_tq_enabled"


def enabled(model) -> tuple[str, dict] | None:
    """(method, settings) that `enable` set on `model`, or None."""
    state = vars(model).get(_STATE_ATTR)
    return None if state is None else (state.method, dict(state.settings))


def _enabled_generate(cls_generate):
    """The model's generate while enabled, with the signature of the class's generate (``_generate``)."""

    @functools.wraps(cls_generate)
    def generate(self, *args, **kwargs):
        return _generate(self, *args, **kwargs)

    return generate


def _generate(self, *args, **kwargs):
    """The model's generate while enabled: a fresh cache per call, or a checked continuation (module docstring)."""
    state = vars(self)[_STATE_ATTR]
    cache_cls = get_method(state.method)
    original = state.replaced if state.replaced is not None else functools.partial(type(self).generate, self)
    name = "cache" if kwargs.get("cache") is not None else "past_key_values"
    cache = kwargs.get(name)
    input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    input_ids = input_ids if isinstance(input_ids, torch.Tensor) else None
    if cache is None:
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        cache = cache_cls(self.config, **state.settings)
        kwargs[CACHE_KWARG] = cache
    elif isinstance(cache, QuantizedKVCache):
        check_cache_model(cache, self.config)
        check_cache_continues(cache, input_ids)
    if state.fast and isinstance(cache, QuantizedKVCache):
        from .fast_attention import prepare_cache

        prepare_cache(cache, cuda_graphs=state.cuda_graphs)
    out = original(*args, **kwargs)
    if isinstance(cache, QuantizedKVCache):
        sequences = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
        cache.token_ids = None if sequences is None else sequences.detach()
    return out


def disable(model):
    """Undo `enable`: the model's own `generate` (and attention implementation, and forward) again.

    Args:
        model: a model `enable` was called on (anything else is returned unchanged).
    Returns:
        the model.
    """
    state = vars(model).pop(_STATE_ATTR, None)
    if state is not None:
        if state.previous_attn is not None:  # enable(fast=True) switched the attention implementation
            model.set_attn_implementation(state.previous_attn)
        if state.replaced is None:
            vars(model).pop("generate", None)
        else:
            model.generate = state.replaced
    from . import cuda_graphs

    cuda_graphs.uninstall(model)
    return model
