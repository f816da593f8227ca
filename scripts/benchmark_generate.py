#!/usr/bin/env python
"""End-to-end `model.generate` speed against the physical floor, on the Llama-3.1-8B config with random bf16 weights.

    python scripts/benchmark_generate.py --out results/generate                  # one H200: about 8 minutes
    python scripts/benchmark_generate.py --contexts 32768 --batches 1 --no-static

What is timed, each configuration through the `generate` a user calls (greedy, `min_new_tokens` = `max_new_tokens`):

- "dynamic": transformers' DynamicCache, eager (SDPA);
- "static-compile": transformers' StaticCache through generate's own auto-compile (a fresh StaticCache of fixed
  length each call, so both generation lengths share one compiled graph); its first call's time is the warm-up;
- ours: `tq_transformers.enable(model, method, fast=True)` (CUDA graphs on, the default with fast=True) for
  TurboQuant-4, KIVI-2 and Bonsai-1; a name ending in "@fused" adds ``fuse=True`` (the decoder layers' norms and MLPs
  compiled inside the graph steps: ``tq_transformers.cuda_graphs``, "Fusion"; the compile runs in the warm-up call).

Per-token decode time = (t(long) - t(short)) / (long - short) generated tokens, so the prefill cancels; prefill =
t(short) - short x per-token time. The configurations run in alternation, round after round, after one warm-up call
of each (docs/METHODS.md, "Measurement rules"); the median over rounds is reported. Peak GPU memory is the peak
allocated during the long call, weights included.

The physical floor of a decode step is (bytes of weights read + bytes of cache held) / copy bandwidth, with the copy
bandwidth measured here (a device-to-device copy, bytes read + written). The weights read per step leave out the
embedding table, of which a step reads B rows only. Results are printed and written to `--out`/generate.json after
every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

import tq_transformers  # noqa: E402
from tq_transformers.generation import CACHE_KWARG  # noqa: E402

LLAMA31_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
OURS = {  # name -> (method, settings)
    "turboquant-4": ("turboquant", {"bits": 4}),
    "kivi-2": ("kivi", {"bits": 2}),
    "bonsai-1": ("bonsai", {}),
    # the presets of the README's budgets (configs/frontier_gpu.yaml): 3-bit and fractional codes, sinks
    "tq-k4v3": ("turboquant", {"key_bits": 4, "value_bits": 3}),
    "tq-k3.5v2.375": ("turboquant", {"key_bits": 3.5, "value_bits": 2.375}),
    "tq-k2v1-s4": ("turboquant", {"key_bits": 2, "value_bits": 1, "sink_tokens": 4}),
}
DEFAULT_CACHES = ("turboquant-4", "kivi-2", "bonsai-1")
REFERENCE = "@reference"  # a cache name with this suffix decodes on the reference path (enable(..., fast=False))
FUSED = "@fused"  # a cache name with this suffix decodes in CUDA graphs with the norms and MLPs fused (fuse=True)
# generated tokens of the short and long call, per batch size (REFERENCE anchors of 2026-12-01 used the same)
LENGTHS = {1: (8, 136), 8: (8, 72)}
COPY_BYTES = 2 << 30  # the copy-bandwidth probe's buffer


def _base(name: str) -> str:
    """The OURS name of a configuration name (its "@reference" / "@fused" suffix left off)."""
    return name.removesuffix(REFERENCE).removesuffix(FUSED)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a device-to-device copy (median of 20 after 3 warm-ups)."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(23):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * COPY_BYTES / statistics.median(times)


def build_model(layers: int):
    cfg = LlamaConfig(**{**LLAMA31_8B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device("cuda"):
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = LlamaForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(default)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def weight_bytes_read(model) -> int:
    embed = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters()) - embed.numel() * embed.element_size()


def run_generate(model, name: str, ids: torch.Tensor, new_tokens: int, max_len: int):
    """One generate call of configuration `name`; returns (seconds, peak bytes allocated)."""
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False)
    if name == "dynamic":
        kwargs[CACHE_KWARG] = DynamicCache(config=model.config)
    elif name == "static-compile":
        kwargs[CACHE_KWARG] = StaticCache(config=model.config, max_cache_len=max_len)
    else:
        method, settings = OURS[_base(name)]
        tq_transformers.enable(model, method, fast=not name.endswith(REFERENCE), fuse=name.endswith(FUSED),
                               **settings)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(ids, **kwargs)
        torch.cuda.synchronize()
    finally:
        if _base(name) in OURS:
            tq_transformers.disable(model)
    seconds = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return seconds, torch.cuda.max_memory_allocated()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "results/generate"))
    ap.add_argument("--contexts", default="32768", help="comma-separated prompt lengths")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the alternating timing (median reported)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--no-static", action="store_true", help="skip StaticCache + auto-compile")
    ap.add_argument("--static-batches", default="1,8", help="batch sizes at which StaticCache + compile runs")
    ap.add_argument("--budget-s", type=float, default=540.0, help="start no new batch size after this")
    ap.add_argument("--caches", default=",".join(DEFAULT_CACHES),
                    help=f"comma-separated, of {list(OURS)}; a name ending in {REFERENCE!r} decodes on the reference "
                         f"path, one ending in {FUSED!r} with fuse=True (norms and MLPs compiled in the graph steps)")
    args = ap.parse_args()
    caches = args.caches.split(",")
    unknown = [c for c in caches if _base(c) not in OURS]
    if unknown:
        ap.error(f"--caches: unknown {unknown}; choose from {list(OURS)} (optionally with {REFERENCE!r} or "
                 f"{FUSED!r})")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the figures are GPU timings)")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    model = build_model(args.layers)
    bandwidth = copy_bandwidth()
    weights = weight_bytes_read(model)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": __import__("transformers").__version__, "copy_bandwidth_Bps": bandwidth,
               "weight_bytes_read": weights, "runs": []}
    print(f"{results['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s; weights read per step "
          f"{weights / 1e9:.2f} GB")
    for ctx in (int(c) for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            if time.perf_counter() - t0 > args.budget_s:
                print(f"budget reached: {ctx} x {batch} not run")
                continue
            short, long = LENGTHS.get(batch, (8, 72))
            names = ["dynamic", *caches]
            if not args.no_static and str(batch) in args.static_batches.split(","):
                names.insert(1, "static-compile")
            ids = torch.randint(0, LLAMA31_8B["vocab_size"], (batch, ctx), device="cuda",
                                generator=torch.Generator("cuda").manual_seed(ctx + batch))
            warm = {}
            for name in names:  # warm-up: a whole short call of each (the static one compiles here)
                warm[name] = run_generate(model, name, ids, short, ctx + long)[0]
            timings = {name: {"short": [], "long": [], "peak": 0} for name in names}
            for _ in range(args.rounds):
                for name in names:
                    for key, n in (("short", short), ("long", long)):
                        seconds, peak = run_generate(model, name, ids, n, ctx + long)
                        timings[name][key].append(seconds)
                        if key == "long":
                            timings[name]["peak"] = max(timings[name]["peak"], peak)
            rows = []
            for name in names:
                per_round = [(b - a) / (long - short) for a, b in zip(timings[name]["short"], timings[name]["long"])]
                per_token = statistics.median(per_round)
                prefill = statistics.median(timings[name]["short"]) - short * per_token
                method, settings = OURS.get(_base(name), ("full", {}))
                held = tq_transformers.estimate_cache_bytes(model.config, ctx + long, batch, method,
                                                            dtype=torch.bfloat16, **settings)["total"]
                floor = (weights + held) / bandwidth
                rows.append({"name": name, "context": ctx, "batch": batch, "ms_per_token": 1e3 * per_token,
                             "prefill_s": prefill, "warmup_s": warm[name], "peak_GiB": timings[name]["peak"] / 2**30,
                             "cache_held_MiB": held / 2**20, "floor_ms": 1e3 * floor,
                             "x_floor": per_token / floor, "per_round_ms": [1e3 * x for x in per_round]})
            base = {r["name"]: r for r in rows}["dynamic"]
            print(f"\n{batch} x {ctx}: ms per token (x its floor), prefill s (x dynamic), peak GiB, warm-up s")
            print("| cache | ms/token | floor ms | x floor | prefill s | x dynamic | peak GiB | warm-up s |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
            for r in rows:
                r["prefill_x_dynamic"] = r["prefill_s"] / base["prefill_s"]
                print(f"| {r['name']} | {r['ms_per_token']:.2f} | {r['floor_ms']:.2f} | {r['x_floor']:.2f} | "
                      f"{r['prefill_s']:.3f} | {r['prefill_x_dynamic']:.3f} | {r['peak_GiB']:.1f} | "
                      f"{r['warmup_s']:.1f} |")
            results["runs"].extend(rows)
            with open(os.path.join(args.out, "generate.json"), "w") as f:
                json.dump(results, f, indent=1)
            del ids
            torch.cuda.empty_cache()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
