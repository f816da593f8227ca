"""scripts/benchmark_speed.py's interleaved decode timing, on a tiny random model on the CPU (its bookkeeping; the
figures themselves come from the GPU)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from transformers import DynamicCache

from tq_transformers import TurboQuantCache
from tq_transformers.fast_attention import attn_implementation_of

from conftest import build_tiny

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
benchmark_speed = pytest.importorskip("benchmark_speed")


def test_decode_interleaved_times_every_cache_each_round():
    model = build_tiny("llama")
    factories = {
        "dynamic": (lambda cfg: DynamicCache(config=cfg), "sdpa"),
        "turboquant4_fast": (lambda cfg: TurboQuantCache(cfg, bits=4, flush_size=16), "fast"),
    }
    rows = benchmark_speed.decode_interleaved(model, factories, batch=2, context=40, steps=3, rounds=2)
    assert [r["cache"] for r in rows] == ["dynamic", "turboquant4_fast"]
    for r in rows:
        assert r["batch"] == 2 and r["context"] == 40
        assert len(r["ms_rounds"]) == 2 and all(t > 0 for t in r["ms_rounds"])
        assert r["ms_median"] == pytest.approx(sorted(r["ms_rounds"])[0] / 2 + sorted(r["ms_rounds"])[1] / 2)
    assert rows[0]["ratio_vs_dynamic"] == 1.0
    want = [t / b for t, b in zip(rows[1]["ms_rounds"], rows[0]["ms_rounds"])]
    assert rows[1]["ratio_vs_dynamic"] == pytest.approx(sum(want) / 2)
    assert torch.is_grad_enabled()


def test_presets_are_measured_only_when_named():
    """The default run is the three default caches; a preset with sinks (README) is there when named, and builds a
    cache of the preset's settings for a real config."""
    default = benchmark_speed.cache_factories(False)
    assert not any(name.startswith("tq_k") for name in default)
    named = benchmark_speed.cache_factories(False, ["dynamic", "tq_k4v2.875_s4_f64_graph_fused"])
    assert {name: mode for name, (_, mode) in named.items()} == {"dynamic": "sdpa",
                                                                "tq_k4v2.875_s4_f64_graph_fused": "graph_fused"}
    cache = named["tq_k4v2.875_s4_f64_graph_fused"][0](build_tiny("llama").config)
    cfg = cache.method_config
    assert (cfg.key_bits, cfg.value_bits, cfg.sink_tokens, cfg.flush_size) == (4, 2.875, 4, 64)


def test_benchmark_compile_runs_every_configuration_on_cpu():
    """scripts/benchmark_compile.py's generate call per configuration (on the CPU nothing compiles: its bookkeeping,
    and that each configuration generates the requested tokens and leaves the model as it found it)."""
    benchmark_compile = pytest.importorskip("benchmark_compile")
    model = build_tiny("llama")
    names = benchmark_compile.configurations(["kivi-2"], list(benchmark_compile.KINDS))
    assert names == ["runner-kivi-2", "compiled-kivi-2", "static-compile"]
    ids = torch.randint(1, 500, (1, 40), generator=torch.Generator().manual_seed(0))
    for name in names:
        assert benchmark_compile.run_generate(model, name, ids, 4, 64) > 0
        assert attn_implementation_of(model.config) == "sdpa"


def test_sass_inspector_finds_the_tile_loop():
    """scripts/inspect_cuda_sass.py's loop finder (model-free, no NVIDIA tools): the body of the largest backward
    branch of a listing, inner and forward branches ignored."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "inspect_cuda_sass.py"
    spec = importlib.util.spec_from_file_location("inspect_cuda_sass", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    listing = [(0x00, "MOV R1, R2"), (0x10, "LDS R3, [R4]"), (0x20, "@P0 BRA 0x40"), (0x30, "IADD3 R5, R5, 1, RZ"),
               (0x40, "BRA 0x30"), (0x50, "@P1 BRA 0x10"), (0x60, "EXIT")]
    assert mod.tile_loop(listing) == ["LDS R3, [R4]", "@P0 BRA 0x40", "IADD3 R5, R5, 1, RZ", "BRA 0x30",
                                      "@P1 BRA 0x10"]
