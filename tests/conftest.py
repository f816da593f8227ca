"""Shared fixtures: tiny random models of the architectures we support, built on the CPU in milliseconds."""

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

COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, vocab_size=512)


def _peaky(model):
    """Random models have flat next-token distributions, on which any noise flips the argmax; scaling the output
    head makes them decisive like a trained model, so greedy comparisons mean something."""
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def build_tiny(arch: str, dtype=torch.float32):
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


_CACHE = {}


@pytest.fixture
def tiny_model():
    def get(arch="llama", dtype=torch.float32):
        key = (arch, dtype)
        if key not in _CACHE:
            _CACHE[key] = build_tiny(arch, dtype)
        return _CACHE[key]

    return get


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
