"""scripts/benchmark_speed.py's interleaved decode timing, on a tiny random model on the CPU (its bookkeeping; the
figures themselves come from the GPU)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from transformers import DynamicCache

from tq_transformers import TurboQuantCache

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
