"""The evaluation end to end: side-by-side runner, configs, quick mode on a tiny random Llama (and, marked, the
real Qwen2.5-Coder-1.5B)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from eval_helpers import save_tiny_llama
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from tq_transformers import KIVICache
from tq_transformers.evaluation import cli
from tq_transformers.evaluation import config as eval_config
from tq_transformers.evaluation.runner import MethodSpec, RowSplitCache, build_caches, forward, replay_prefill

REPO = Path(__file__).resolve().parents[1]


def tiny_config():
    return LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=128, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama and a byte-level BPE tokenizer trained on real text, saved as a local model folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tiny_config())


def test_row_split_matches_separate_runs():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 320, (1, 300))
    specs = [MethodSpec("full", "full"), MethodSpec("kivi", "kivi")]
    caches, _, _ = build_caches(model, specs, ids[:, :260])
    replayed = caches[1].memory_footprint()
    side = forward(model, ids[:, 260:].repeat(2, 1), RowSplitCache(caches, [1, 1]))
    alone_ref = DynamicCache(config=model.config)
    forward(model, ids[:, :260], alone_ref)
    alone_kivi = KIVICache(model.config)
    forward(model, ids[:, :260], alone_kivi)  # a real prefill through the cache
    assert alone_kivi.memory_footprint() == replayed  # replay == real prefill
    torch.testing.assert_close(side[0], forward(model, ids[:, 260:], alone_ref)[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(side[1], forward(model, ids[:, 260:], alone_kivi)[0], atol=1e-4, rtol=1e-4)


def test_replay_prefill_fills_every_layer():
    model = LlamaForCausalLM(tiny_config()).eval()
    prefill = DynamicCache(config=model.config)
    forward(model, torch.randint(0, 320, (1, 40)), prefill)
    cache = KIVICache(model.config, residual_length=0)
    replay_prefill(prefill, cache)
    assert cache.get_seq_length() == 40 and all(layer.num_quantized == 32 for layer in cache.layers)


def test_default_yaml_equals_embedded_defaults():
    data = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert eval_config.merge(eval_config.DEFAULTS, data) == eval_config.DEFAULTS
    assert data == eval_config.DEFAULTS


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_loads_and_every_key_is_commented(path):
    cfg = eval_config.validate(eval_config.load_config(str(path)))
    specs = eval_config.method_specs(cfg)
    assert specs[0].name == "full" and specs[0].method == "full" and len(specs) >= 2
    for spec in specs[1:]:
        spec.make(tiny_config())  # settings are valid
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped and not stripped.startswith("- {"):
            assert "#" in line, f"{path.name}: key without a comment: {line!r}"


def test_bad_inputs_name_the_parameter():
    with pytest.raises(ValueError, match="config must be a YAML file or one of"):
        eval_config.load_config("no-such-config")
    with pytest.raises(ValueError, match=r"method must be one of .* got 'zip'"):
        MethodSpec("x", "zip")
    with pytest.raises(ValueError, match="methods must be names from the config"):
        eval_config.method_specs(eval_config.DEFAULTS, ["nope"])
    bad = eval_config.merge(eval_config.DEFAULTS, {"perplexity": {"segments": 0}})
    with pytest.raises(ValueError, match="perplexity.segments must be a positive integer, got 0"):
        eval_config.validate(bad)
    bad = eval_config.merge(eval_config.DEFAULTS, {"needle": {"depths": [1.5]}})
    with pytest.raises(ValueError, match=r"needle.depths must be .* in \[0, 1\], got \[1.5\]"):
        eval_config.validate(bad)
    with pytest.raises(ValueError, match="max_length must be an integer >= 64, got 3"):
        eval_config.apply_max_length(eval_config.DEFAULTS, 3)


def test_quick_mode_end_to_end_tiny(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    rc = cli.main(["--quick", "--model", str(tiny_model_dir), "--dtype", "fp32", "--output-dir", str(out),
                   "--methods", "turboquant-4,kivi-2,bonsai-1"])
    assert rc == 0
    for name in ("results.json", "results.csv", "table.md", "memory_fidelity.png", "memory_quality.png",
                 "needle_heatmap.png"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    methods = res["methods"]
    assert list(methods) == ["full", "turboquant-4", "kivi-2", "bonsai-1"]
    ref = methods["full"]
    assert ref["label"] == "full (float32)"
    assert ref["perplexity"]["top1_agreement"] == 1.0
    assert ref["perplexity"]["kl_divergence"] == pytest.approx(0, abs=1e-9)
    assert ref["agreement"]["full_match"] == 1.0
    assert ref["projection"]["mib"] == pytest.approx(4096)
    for name in ("turboquant-4", "kivi-2", "bonsai-1"):
        m = methods[name]
        assert m["perplexity"]["held_bytes"] == m["perplexity"]["estimated_bytes"]  # measured == analytic
        assert m["perplexity"]["held_bytes"] < ref["perplexity"]["held_bytes"]
        assert 0.0 < m["perplexity"]["fidelity"]["mean"] <= 1.0 + 1e-9
        assert len(m["perplexity"]["fidelity"]["per_layer"]) == 2
    assert methods["turboquant-4"]["projection"]["mib"] < 1056.2  # 1056 + 0.125 MiB of centering means
    assert methods["bonsai-1"]["projection"]["mib"] < 310
    fidelity = {name: m["perplexity"]["fidelity"]["mean"] for name, m in methods.items()}
    assert fidelity["turboquant-4"] > fidelity["bonsai-1"]


@pytest.mark.real_model
def test_quick_mode_real_model(tmp_path):
    """Quick mode on Qwen2.5-Coder-1.5B (about 25 s on an idle 2-core CPU once the model is cached); floors are set
    below the measured quick-mode values (TurboQuant-4 99.3%, KIVI-2 97.3%, Bonsai-1 77% / improved 93%)."""
    out = tmp_path / "out"
    assert cli.main(["--quick", "--output-dir", str(out)]) == 0
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert methods["turboquant-4"]["perplexity"]["fidelity"]["mean"] > 0.98
    assert methods["kivi-2"]["perplexity"]["fidelity"]["mean"] > 0.95
    assert methods["turboquant-4"]["perplexity"]["top1_agreement"] > 0.9
    assert methods["turboquant-4"]["needle"]["accuracy"] == 1.0
    assert methods["kivi-2"]["needle"]["accuracy"] == 1.0
    faithful, improved = methods["bonsai-1"], methods["bonsai-1-improved"]
    assert improved["perplexity"]["fidelity"]["mean"] > faithful["perplexity"]["fidelity"]["mean"] + 0.1
    for m in methods.values():
        assert m["perplexity"]["held_bytes"] == m["perplexity"]["estimated_bytes"]
