"""An lm-evaluation-harness model, ``tq-hf``: lm-eval's `HFLM` with one of our KV caches really in the loop.

Plain `HFLM` scores a loglikelihood request with one forward over context + continuation and no cache: a quantized
cache would change nothing. Here

- loglikelihood requests: the context (all but its last token) is prefilled through a fresh cache of the chosen
  setting, then the last context token and the continuation are fed in a second forward (or in chunks of
  ``score_chunk_size`` tokens) with ``past_key_values=cache``: every scored token attends to the method's (partly
  quantized) history. Requests sharing a context share one prefill (the cache is deep-copied per continuation);
- generation requests: every ``generate`` call (one per request at ``batch_size=1``) gets a fresh cache.

Run it from the command line (``--model_args`` holds HFLM's arguments plus ``cache_method`` and ``cache_<setting>``
for the method's settings; ``pretrained`` also takes this project's registry names, e.g. ``qwen2.5-coder-1.5b``)::

    tq-lm-eval --model tq-hf --model_args pretrained=qwen2.5-coder-1.5b,cache_method=kivi,cache_bits=2 \\
        --tasks tq_local_mc --include_path configs/lm_eval_tasks --device cpu --batch_size 1

or from Python: ``import tq_transformers.evaluation.lm_eval_model`` registers ``tq-hf`` with lm-eval's registry.
Needs the ``lm-eval`` extra (``pip install 'tq_transformers[lm-eval]'``).
"""

from __future__ import annotations

import copy
import inspect
import sys

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("tq_transformers.evaluation.lm_eval_model needs lm-eval: pip install 'tq_transformers[lm-eval]'"
                      ) from e

from ..generation import CACHE_KWARG
from .models import PYPI_MODELS, ensure_pypi_model
from .progress import bar
from .runner import MethodSpec

#: Name of the model class in lm-eval's registry (``--model tq-hf``).
MODEL_NAME = "tq-hf"
#: ``--model_args`` keys with this prefix are settings of the cache method (``cache_bits=2`` -> ``bits=2``).
CACHE_ARG_PREFIX = "cache_"


def split_cache_args(kwargs: dict) -> tuple[dict, dict]:
    """(cache settings without the prefix, the other arguments) of `kwargs`; ``cache_method`` is left out of both."""
    settings, rest = {}, {}
    for key, value in kwargs.items():
        if key == "cache_method":
            continue
        if key.startswith(CACHE_ARG_PREFIX):
            settings[key[len(CACHE_ARG_PREFIX):]] = value
        else:
            rest[key] = value
    return settings, rest


@register_model(MODEL_NAME)
class TQHFLM(HFLM):
    """`HFLM` whose loglikelihood and generation requests run through a fresh cache of one setting.

    Args:
        pretrained: as for `HFLM` (a model instance, a folder, a hub id), or a name of this project's model registry
            (``qwen2.5-coder-1.5b``: fetched from its PyPI parts once and cached).
        cache_method: "full" (a DynamicCache: the same two-forward scoring with an exact cache) or a quantized
            method ("turboquant", "kivi", "bonsai").
        score_chunk_size: continuation tokens per forward when scoring (None: the whole continuation in one second
            forward; a small value makes long continuations, e.g. rolling perplexity windows, read the quantized
            history token group by token group).
        **kwargs: `HFLM`'s arguments, and ``cache_<name>=value`` settings of the method (e.g. ``cache_bits=2``,
            ``cache_residual_length=128``).
    """

    def __init__(self, pretrained, cache_method: str = "turboquant", score_chunk_size: int | None = None, **kwargs):
        settings, rest = split_cache_args(kwargs)
        if isinstance(pretrained, str) and pretrained in PYPI_MODELS:
            pretrained = str(ensure_pypi_model(pretrained))
        if score_chunk_size is not None and (isinstance(score_chunk_size, bool) or not isinstance(score_chunk_size, int)
                                             or score_chunk_size < 1):
            raise ValueError(f"score_chunk_size must be a positive integer or None, got {score_chunk_size!r}")
        self.cache_spec = MethodSpec(cache_method, cache_method, settings)  # checks the method name
        super().__init__(pretrained, **rest)
        if self.backend != "causal":
            raise ValueError(f"{MODEL_NAME} needs a decoder-only (causal) model, got backend {self.backend!r}")
        self.score_chunk_size = score_chunk_size
        self.new_cache()  # bad settings fail here, before any request

    def new_cache(self):
        """A fresh cache of the chosen setting for this model."""
        return self.cache_spec.make(self.model.config)

    def _cache_forward(self, ids: list[int], cache) -> torch.Tensor:
        """Logits [1, len(ids), V] of `ids` continuing `cache` (which they update)."""
        name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        inp = torch.tensor([ids], dtype=torch.long, device=self.device)
        mixed = getattr(self, "mixed_precision_dtype", None)  # as HFLM._model_call does
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=mixed, enabled=mixed is not None):
            return self.model(input_ids=inp, use_cache=True, **{name: cache}).logits

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """(sum of log-probabilities, greedy match) of each continuation, read through the cache.

        For a request (context, continuation), the model's input is (context + continuation)[:-1], left-truncated to
        ``max_length`` as `HFLM` does; all of it but the last ``len(continuation)`` tokens is prefilled through a
        fresh cache, and those last tokens are fed with the cache (in chunks of ``score_chunk_size``).
        """
        plans = []
        for request_str, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc or len(continuation_enc) > self.max_length:
                raise ValueError(f"requests must have a non-empty context and a non-empty continuation of at most "
                                 f"max_length={self.max_length} tokens, got {len(context_enc)} and "
                                 f"{len(continuation_enc)}")
            full = (context_enc + continuation_enc)[-(self.max_length + 1):]
            n_prefill = len(full) - len(continuation_enc) - 1
            plans.append((tuple(full[:n_prefill]), full[n_prefill:-1], continuation_enc, request_str))
        order = sorted(range(len(plans)), key=lambda i: (plans[i][0], i))  # requests of one context side by side
        results: list[tuple[float, bool] | None] = [None] * len(plans)
        chunk = self.score_chunk_size
        with bar(desc=f"loglikelihood through {self.cache_spec.name} caches", unit="request",
                 total=len(plans)) as progress:
            prefilled, prefix = None, None
            for pos, i in enumerate(order):
                prefix_ids, fed, cont, request_str = plans[i]
                if prefix_ids != prefix:
                    prefilled, prefix = self.new_cache(), prefix_ids
                    if prefix_ids:
                        self._cache_forward(list(prefix_ids), prefilled)
                shared = pos + 1 < len(order) and plans[order[pos + 1]][0] == prefix_ids
                cache = copy.deepcopy(prefilled) if shared else prefilled
                step = chunk or len(fed)
                logits = torch.cat([self._cache_forward(fed[s:s + step], cache) for s in range(0, len(fed), step)], 1)
                softmax_dtype = getattr(self, "softmax_dtype", None)  # as HFLM._loglikelihood_tokens does
                logprobs = F.log_softmax(logits, dim=-1, dtype=softmax_dtype)[0]  # [len(cont), V]
                target = torch.tensor(cont, dtype=torch.long, device=logprobs.device)
                greedy = bool((logprobs.argmax(-1) == target).all())
                answer = (float(logprobs.gather(-1, target[:, None]).sum()), greedy)
                results[i] = answer
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
                progress.update(1)
        return results

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        """`HFLM`'s generation with a fresh cache of the chosen setting for this call."""
        generation_kwargs[CACHE_KWARG] = self.new_cache()
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


def main(argv=None) -> None:
    """lm-eval's command line with ``tq-hf`` registered (the ``tq-lm-eval`` console script)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":  # pragma: no cover
    main()
