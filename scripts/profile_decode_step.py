#!/usr/bin/env python
"""Where a decode step's time goes: the host (Python, launches) or the GPU (kernels), per cache.

    python scripts/profile_decode_step.py --out results/step    # a CUDA GPU; Llama-3.1-8B config, 8 x 32K and 1 x 32K

For each cache (DynamicCache on SDPA, and our three on the fast path) and each batch x context point, after a warm-up:

- ``ms_per_token``: wall time of `--steps` greedy steps run back to back (the GPU may lag the host), per step;
- ``host_ms``: the same steps' host time, without waiting for the GPU (what Python and the launches cost);
- ``gpu_ms``: the sum of the CUDA kernel durations of one step (torch.profiler), and ``launches`` per step;
  a step is host-bound when ``host_ms`` is close to ``ms_per_token`` and ``gpu_ms`` below it;
- ``top_host``: the operators with the most host time of one step (torch.profiler's self CPU time).

Also one layer's fast-path call alone (update + attention): host time per call against its GPU time.
Writes `--out`/step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_speed import OURS, build_model, cache_factories, fill, greedy_step, use_path  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from tq_transformers import fast_attention  # noqa: E402

#: Kernels listed per configuration in the step breakdown (``top_gpu``).
TOP_KERNELS = 25


def kernel_stats(prof, steps: int):
    """(GPU ms per step, kernel launches per step, top host operators) from a profiler run over `steps` steps."""
    events = prof.key_averages()
    gpu_us, launches = 0.0, 0
    for e in events:
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = e.self_cuda_time_total
        if dev and e.key and not e.key.startswith("cuda") and e.count and e.device_type.name == "CUDA":
            gpu_us += dev
            launches += e.count
    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    top = [{"op": e.key[:60], "calls": e.count // steps, "self_host_us": e.self_cpu_time_total / steps} for e in host]
    return gpu_us / 1e3 / steps, launches / steps, top


def top_kernels(prof, steps: int, count: int = TOP_KERNELS):
    """The CUDA kernels with the most GPU time in one step: name, launches and microseconds per step."""
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = e.self_cuda_time_total
        if dev and e.key and e.device_type.name == "CUDA":
            rows.append({"kernel": e.key[:90], "launches": e.count / steps, "us": dev / steps})
    return sorted(rows, key=lambda r: r["us"], reverse=True)[:count]


@torch.no_grad()
def step_profile(model, name, make, mode, batch, context, steps):
    with contextlib.ExitStack() as stack:
        return _step_profile(model, name, make, mode, batch, context, steps, stack)


def _step_profile(model, name, make, mode, batch, context, steps, stack):
    cfg = model.config
    gc.collect()
    torch.cuda.empty_cache()
    cache = make(cfg)
    stack.enter_context(use_path(model, cache, mode))
    fill(cache, cfg, batch, context)
    tok = torch.randint(0, cfg.vocab_size, (batch, 1), device="cuda")

    def step():
        nonlocal tok
        tok = greedy_step(model, cache, tok)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    walls = []
    for _ in range(2):  # REFERENCE.md section 6: keep the second of two timings
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        host = 0.0
        for _ in range(steps):
            h0 = time.perf_counter()
            step()
            host += time.perf_counter() - h0
        torch.cuda.synchronize()
        walls.append(((time.perf_counter() - t0) / steps, host / steps))
    wall, host = walls[-1]
    synced = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        synced.append(time.perf_counter() - t0)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    gpu_ms, launches, top = kernel_stats(prof, 3)
    cache = None  # noqa: F841 - free the cache before the next configuration
    return {"cache": name, "batch": batch, "context": context, "ms_per_token": wall * 1e3, "host_ms": host * 1e3,
            "synced_median_ms": statistics.median(synced) * 1e3, "gpu_ms": gpu_ms, "launches": launches,
            "top_host": top, "top_gpu": top_kernels(prof, 3)}


@torch.no_grad()
def layer_call(name, batch, context, iters=200, profile_python=False):
    """One layer's decode (cache update + attention) alone, at a fixed length: host us per call and wall us per call.

    `name` is "dynamic" (DynamicCache + transformers' SDPA attention, default backends), "dynamic_flash" (the same with
    SDPA held to the flash backend) or one of ours on the fast path. With `profile_python`, also the Python functions
    with the most own time (cProfile) over the timed calls."""
    from types import SimpleNamespace

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator(device="cuda").manual_seed(2)
    k = torch.randn(batch, 8, context, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
    dynamic = name.startswith("dynamic")
    cache = DynamicCache() if dynamic else fast_attention.prepare_cache(OURS[name](None))
    cache.update(k, k, 0)
    del k
    q = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(batch, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    module = SimpleNamespace(training=False, layer_idx=0, num_key_value_groups=4, is_causal=True)
    layer = cache.layers[0]
    attend = sdpa_attention_forward if dynamic else fast_attention.tq_fused_attention
    keep = (layer.keys, layer.values, getattr(layer, "cumulative_length", None))

    def call():
        key, value = cache.update(kv, kv, 0)
        attend(module, q, key, value, None, scaling=128**-0.5)
        layer.keys, layer.values = keep[0], keep[1]  # back to the same length (the packed tokens are untouched)
        if keep[2] is not None:
            layer.cumulative_length = keep[2]

    ctx = sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if name == "dynamic_flash" else contextlib.nullcontext()
    with ctx:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        prof = cProfile.Profile() if profile_python else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        for _ in range(iters):
            call()
        if prof:
            prof.disable()
        host = (time.perf_counter() - t0) / iters
        torch.cuda.synchronize()
        total = (time.perf_counter() - t0) / iters
    out = {"cache": name, "batch": batch, "context": context, "host_us": host * 1e6, "wall_us": total * 1e6}
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        out["python_profile"] = buf.getvalue()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "results/step"))
    ap.add_argument("--points", default="8x32768,1x32768")
    ap.add_argument("--caches", default="dynamic,turboquant4,kivi2,bonsai1",
                    help="dynamic first; dynamic_flash (SDPA held to the flash backend) is always added; ours by "
                         "name (fast path) or name_graph (CUDA-graph steps)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--no-layer-call", action="store_true", help="skip the one-layer calls; whole steps only")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    points = [tuple(map(int, p.split("x"))) for p in args.points.split(",")]
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
           "date": time.strftime("%Y-%m-%d"), "layer_call": [], "step": []}
    names = args.caches.split(",")
    layer_names = [n for n in names if not n.endswith("_graph")]  # a graph replays whole steps, not layer calls
    for b, c in points if not args.no_layer_call else []:
        for name in ["dynamic_flash"] + layer_names:
            r = layer_call(name, b, c)
            res["layer_call"].append(r)
            print(r, flush=True)
    for name in layer_names[1:] if not args.no_layer_call else []:
        r = layer_call(name, 1, 32768, profile_python=True)
        print(r.pop("python_profile"), flush=True)
    model = build_model(args.layers)
    makers = {name.removesuffix("_fast"): f for name, f in cache_factories(False).items()}  # ours: fast path
    step_profile(model, "warmup", *makers["dynamic"], 1, 1024, 4)
    for b, c in points:
        for name in names[:1] + ["dynamic_flash"] + names[1:]:
            r = step_profile(model, name, *makers[name], b, c, args.steps)
            res["step"].append(r)
            print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()
                   if k not in ("top_host", "top_gpu")}, flush=True)
            for t in r["top_gpu"][:12]:
                print(f"    {t['us']:9.1f} us  x{t['launches']:6.1f}  {t['kernel']}", flush=True)
            with open(os.path.join(args.out, "step.json"), "w") as f:
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
