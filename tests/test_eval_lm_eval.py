"""The lm-evaluation-harness model `tq-hf` on the small local tasks of configs/lm_eval_tasks (offline, tiny random
Llama): lossless settings score exactly as plain HFLM, quantized ones differ. Skipped without lm-eval."""

from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from eval_helpers import save_tiny_llama  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from tq_transformers.evaluation import lm_eval_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "configs" / "lm_eval_tasks"
#: Documents per task (the whole tasks hold 12 and 8).
LIMIT = 4
METRICS = {"tq_local_mc": "acc,none", "tq_local_gen": "exact_match,strip"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with a byte-level BPE tokenizer (with an end-of-text token) trained on real text."""
    config = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=128, max_position_embeddings=1024)
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_eos"), config, eos_token="<|endoftext|>")


def evaluate(lm, task_manager) -> dict:
    """Per task: (metric value, per-document responses), on the first LIMIT documents of each task."""
    out = lm_eval.simple_evaluate(model=lm, tasks=list(METRICS), task_manager=task_manager, limit=LIMIT,
                                  log_samples=True, bootstrap_iters=0)
    res = {}
    for task, metric in METRICS.items():
        samples = out["samples"][task]
        if task == "tq_local_mc":
            resps = [[r[0][0] for r in s["resps"]] for s in samples]  # loglikelihood of each choice
        else:
            resps = [s["resps"][0][0] for s in samples]  # the generated text
        res[task] = (out["results"][task][metric], resps)
    return res


@pytest.fixture(scope="module")
def scores(model_dir):
    """Plain HFLM, tq-hf lossless (KIVI with a window larger than any sequence) and tq-hf quantized (KIVI-2 without a
    window) on both tasks."""
    import os

    cwd = os.getcwd()
    os.chdir(REPO)  # the tasks' data_files are relative to the repository root
    try:
        args = {"pretrained": str(model_dir), "device": "cpu", "batch_size": 1}
        lms = {
            "hf": HFLM(**args),
            "lossless": lm_eval_model.TQHFLM(**args, cache_method="kivi", cache_residual_length=1024),
            "quantized": lm_eval_model.TQHFLM(**args, cache_method="kivi", cache_bits=2, cache_residual_length=0),
        }
        task_manager = TaskManager(include_path=str(TASKS))  # indexing lm-eval's task library once
        return {name: evaluate(lm, task_manager) for name, lm in lms.items()}
    finally:
        os.chdir(cwd)


def test_registered_as_tq_hf():
    from lm_eval.api.registry import get_model

    assert get_model(lm_eval_model.MODEL_NAME) is lm_eval_model.TQHFLM


@pytest.mark.slow
def test_lossless_setting_scores_as_plain_hflm(scores):
    hf, lossless = scores["hf"], scores["lossless"]
    assert lossless["tq_local_mc"][0] == hf["tq_local_mc"][0]  # accuracy: exactly equal
    torch.testing.assert_close(torch.tensor(lossless["tq_local_mc"][1]), torch.tensor(hf["tq_local_mc"][1]),
                               rtol=0, atol=1e-4)  # the two-forward split only reorders float sums
    assert lossless["tq_local_gen"] == hf["tq_local_gen"]  # identical generations and score


@pytest.mark.slow
def test_quantized_setting_reads_the_quantized_history(scores):
    hf, quant = torch.tensor(scores["hf"]["tq_local_mc"][1]), torch.tensor(scores["quantized"]["tq_local_mc"][1])
    diff = (quant - hf).abs().max().item()
    print(f"KIVI-2 without a window: max |loglikelihood change| {diff:.4f} nats; accuracy "
          f"{scores['quantized']['tq_local_mc'][0]:.3f} vs {scores['hf']['tq_local_mc'][0]:.3f}")
    assert diff > 1e-3


def test_bad_arguments_name_the_parameter(model_dir):
    with pytest.raises(ValueError, match="method must be one of"):
        lm_eval_model.TQHFLM(pretrained=str(model_dir), device="cpu", cache_method="zip")
    with pytest.raises(ValueError, match="score_chunk_size must be a positive integer or None, got 0"):
        lm_eval_model.TQHFLM(pretrained=str(model_dir), device="cpu", score_chunk_size=0)
    assert lm_eval_model.split_cache_args({"cache_method": "kivi", "cache_bits": 2, "device": "cpu"}) == (
        {"bits": 2}, {"device": "cpu"})
