#!/usr/bin/env python
"""Where a 32K prefill's GPU time goes, per cache: the CUDA kernels with the most time in one prefill forward.

    python scripts/profile_prefill.py --out results/prefill    # a CUDA GPU; Llama-3.1-8B config, random bf16 weights

For DynamicCache (SDPA) and each of our caches on the fast path with CUDA graphs prepared (what ``enable(model,
method, fast=True)`` runs), after one warm-up prefill: wall seconds of a prefill, and torch.profiler's top kernels.
Writes `--out`/prefill.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_speed import CACHE_KWARG, build_model, cache_factories, sync_time, use_path  # noqa: E402

#: Kernels listed per cache.
TOP_KERNELS = 20


@torch.no_grad()
def profile_one(model, name, make, mode, batch, context):
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")

    def prefill():
        cache = make(model.config)
        with use_path(model, cache, mode):
            model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)

    prefill()  # warm-up (compiles kernels)
    seconds = sync_time(prefill)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        prefill()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if dev and e.device_type.name == "CUDA":
            rows.append({"kernel": e.key[:90], "launches": e.count, "ms": dev / 1e3})
    rows.sort(key=lambda r: r["ms"], reverse=True)
    return {"cache": name, "batch": batch, "context": context, "prefill_s": seconds,
            "gpu_ms": sum(r["ms"] for r in rows), "top": rows[:TOP_KERNELS]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "results/prefill"))
    ap.add_argument("--points", default="1x32768")
    ap.add_argument("--caches", default="dynamic,turboquant4_graph,kivi2_graph,bonsai1_graph")
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model = build_model(args.layers)
    factories = cache_factories(False)
    res = {"card": torch.cuda.get_device_name(), "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
           "rows": []}
    for p in args.points.split(","):
        batch, context = map(int, p.split("x"))
        for name in args.caches.split(","):
            r = profile_one(model, name, *factories[name], batch, context)
            res["rows"].append(r)
            print(f"{name} {p}: prefill {r['prefill_s']:.3f} s, GPU {r['gpu_ms']:.1f} ms", flush=True)
            for t in r["top"][:12]:
                print(f"    {t['ms']:9.2f} ms  x{t['launches']:5d}  {t['kernel']}", flush=True)
            torch.cuda.empty_cache()
            with open(os.path.join(args.out, "prefill.json"), "w") as f:
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
