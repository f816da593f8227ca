"""scripts/fidelity_sweep.py on a tiny random Llama: the same attention fidelity as tq-eval's for the same config,
1.0 for a lossless setting, and its pre-RoPE wrapper exact around a lossless cache."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from eval_helpers import save_tiny_llama
from transformers import LlamaConfig

from tq_transformers.evaluation.config import load_config
from tq_transformers.evaluation.evaluate import run_evaluation

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("fidelity_sweep", REPO / "scripts" / "fidelity_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOSSY = {"name": "kivi-2", "method": "kivi", "bits": 2, "group_size": 32, "residual_length": 32}
LOSSLESS = {"name": "kivi-lossless", "method": "kivi", "bits": 2, "group_size": 32, "residual_length": 1024}


@pytest.fixture(scope="module")
def sweep_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama_sweep")
    config = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=128, max_position_embeddings=4096)
    save_tiny_llama(folder, config)
    cfg = {
        "name": "sweep-test", "model": str(folder), "dtype": "fp32",
        "methods": [{"name": "full", "method": "full"}, LOSSY, LOSSLESS],
        "perplexity": {"data": "wikitext2-valid", "context_length": 160, "continuation_length": 48, "chunk_size": 8},
        "needle": {"enabled": False}, "agreement": {"enabled": False},
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sweep_matches_tq_eval_and_is_exact_where_lossless(sweep_config, tmp_path):
    out = tmp_path / "sweep.json"
    args = ["--config", str(sweep_config), "--out", str(out), "--pre-rope", "kivi-2,kivi-lossless"]
    assert _script().main(args) == 0
    got = json.loads(out.read_text())["settings"]
    assert got["kivi-lossless"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert got["kivi-lossless-prerope"]["mean"] == pytest.approx(1.0, abs=1e-5)  # RoPE undone, then redone
    assert got["kivi-2"]["mean"] < 0.999
    assert got["kivi-2-prerope"]["mean"] != got["kivi-2"]["mean"]  # the keys were quantized before RoPE

    results = run_evaluation(load_config(str(sweep_config)))
    for name in ("kivi-2", "kivi-lossless"):
        fid = results["methods"][name]["perplexity"]["fidelity"]
        assert got[name]["mean"] == pytest.approx(fid["mean"], abs=1e-5), name
        assert got[name]["worst_layer"] == fid["worst_layer"]


def test_sweep_refuses_unknown_settings(sweep_config):
    with pytest.raises(ValueError, match=r"--pre-rope must name settings of the config .*got unknown \['nope'\]"):
        _script().main(["--config", str(sweep_config), "--pre-rope", "nope"])
