"""Multi-turn with `tq_transformers.enable`: the returned cache (or its fork, or a saved and loaded copy) passed back
with the extended conversation continues it; any other cache raises."""

from __future__ import annotations

import copy

import pytest
import torch

import tq_transformers
from tq_transformers import QuantizedKVCache
from tq_transformers.generation import CACHE_KWARG

from cases import case, one_thread, params, random_ids

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

TURN = 20


def _generate(model, ids, cache=None, **kw):
    cache_kw = {} if cache is None else {CACHE_KWARG: cache}
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=TURN, do_sample=False,
                          **cache_kw, **kw)


@pytest.mark.parametrize("c", params("turboquant4", "kivi2", "bonsai-improved"))
def test_enable_continues_a_conversation_from_the_returned_cache(tiny_model, tmp_path, c):
    model = tiny_model("llama")
    first, second = random_ids(length=30), random_ids(length=8, seed=4)
    explicit = c.cache(model.config)  # the reference: plain generate on the model, the cache passed by hand
    ref1 = _generate(model, first, explicit)
    ref2 = _generate(model, torch.cat([ref1, second], dim=1), explicit)

    tq_transformers.enable(model, c.method, **c.kwargs(model.config))
    try:
        out = _generate(model, first, return_dict_in_generate=True)
        cache = out.past_key_values
        assert torch.equal(out.sequences, ref1) and torch.equal(cache.token_ids, ref1)
        forked = cache.fork()
        cache.save(tmp_path / "turn1.tqkv")
        conversation = torch.cat([out.sequences, second], dim=1)
        assert torch.equal(_generate(model, conversation, cache), ref2)
        assert torch.equal(_generate(model, conversation, forked), ref2)
        loaded = QuantizedKVCache.load(tmp_path / "turn1.tqkv", model)
        assert torch.equal(_generate(model, conversation, loaded), ref2)

        with pytest.raises(ValueError, match="not the start of input_ids"):  # another conversation
            _generate(model, torch.cat([random_ids(length=52, seed=9), second], dim=1), cache)
        with pytest.raises(ValueError, match="not the start of input_ids"):  # nothing new to feed
            _generate(model, ref2[:, : cache.get_seq_length()], cache)
    finally:
        tq_transformers.disable(model)


def test_enable_refuses_a_cache_of_another_model(tiny_model):
    llama, qwen = tiny_model("llama"), tiny_model("qwen2")
    c = case("turboquant4")
    ids = random_ids(length=30)
    for model in (llama, qwen):
        tq_transformers.enable(model, c.method, **c.kwargs(model.config))
    try:
        out = _generate(qwen, ids, return_dict_in_generate=True)
        with pytest.raises(ValueError, match="built for another model .*model_type='qwen2'"):
            _generate(llama, out.sequences, out.past_key_values)
        out = _generate(llama, ids, return_dict_in_generate=True)  # the same model under another name
        cache = out.past_key_values
        cache.model_config = copy.deepcopy(llama.config)
        cache.model_config.name_or_path = "org/other-llama"
        llama.config.name_or_path = "org/this-llama"
        with pytest.raises(ValueError, match="name_or_path='org/other-llama'"):
            _generate(llama, out.sequences, cache)
    finally:
        for model in (llama, qwen):
            tq_transformers.disable(model)
