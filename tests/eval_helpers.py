"""Helpers shared by the evaluation tests: a results dict shaped like `run_evaluation`'s (model-free), and a tiny
random Llama saved as a local model folder."""

import copy

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from tq_transformers.evaluation import config as eval_config
from tq_transformers.evaluation.data import load_text

#: characters of real text the tiny tokenizer is trained on
TOKENIZER_TEXT_CHARS = 20000


def save_tiny_llama(folder, config, eos_token: str | None = None):
    """Save a tiny random Llama of `config` (seed 0) and a byte-level BPE tokenizer of ``config.vocab_size`` tokens
    trained on real text in `folder`; with `eos_token`, the tokenizer has it as its end-of-text and padding token.

    Returns:
        `folder`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[eos_token] if eos_token else [])
    tok.train_from_iterator([load_text("wikitext2-valid")[:TOKENIZER_TEXT_CHARS]], trainer)
    special = {"eos_token": eos_token, "pad_token": eos_token} if eos_token else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def fake_results(change_ci=((-1.0, 2.0), (0.5, 3.0))) -> dict:
    """Results of a reference and two settings, with chosen perplexity-change intervals for the two settings."""
    cfg = copy.deepcopy(eval_config.DEFAULTS)

    def method(label, mib, ppl, change, ci, kl, held, found):
        return {
            "method": "full" if label.startswith("full") else "kivi",
            "kwargs": {},
            "label": label,
            "projection": {"mib": mib, "saving_pct": 100 * (1 - mib / 4096), "bits_per_value": 16 * mib / 4096},
            "perplexity": {
                "perplexity": ppl, "perplexity_change_pct": change, "perplexity_change_ci_pct": ci,
                "change_interval_includes_zero": None if ci is None else ci[0] <= 0 <= ci[1],
                "top1_agreement": 1.0 if ci is None else 0.9, "kl_divergence": kl, "scored_tokens": 256,
                "held_bytes": held, "held_tokens": 1280, "estimated_bytes": held,
                "fidelity": {"mean": 1.0 if ci is None else 0.97, "worst_layer": None if ci is None else 3,
                             "worst_layer_mean": 1.0 if ci is None else 0.9},
            },
            "needle": {"found": {"1024@0.1": True, "1024@0.5": found}, "accuracy": (1 + found) / 2},
            "agreement": {"mean_prefix": 24.0 if ci is None else 12.5, "full_match": 1.0 if ci is None else 0.0},
        }

    return {
        "config": cfg,
        "model": {"spec": "qwen2.5-coder-1.5b", "name": "qwen2.5-coder-1.5b", "description": "a test model",
                  "dtype": "bfloat16", "device": "cpu"},
        "machine": {"device": "cpu", "threads": 2, "gpu": None},
        "methods": {
            "full": method("full (bfloat16)", 4096.0, 10.0, 0.0, None, 0.0, 35 * 2**20, True),
            "kivi-a": method("kivi-a", 781.0, 10.1, 1.0, list(change_ci[0]), 0.01, 9 * 2**20, True),
            "kivi-b": method("kivi-b", 500.0, 10.2, 2.0, list(change_ci[1]), 0.05, 6 * 2**20, False),
        },
        "bootstrap": {"resamples": 2000, "block": 8, "level": 0.95, "seed": 0},
        "timings_s": {"load_model": 3.2, "perplexity": 41.0, "needle": 20.5, "agreement": 10.0, "total": 74.7},
    }
