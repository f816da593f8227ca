#!/usr/bin/env python
"""Run each fused decode kernel a few times on the Llama-3.1-8B attention shape, for a hardware profiler.

    ncu --clock-control none -k regex:split_kernel --section SpeedOfLight --section WarpStateStats \\
        --section Occupancy --section MemoryWorkloadAnalysis python3 scripts/profile_decode_kernels.py

One layer, batch x context from --point (default 8x32768), 32 query heads, 8 KV heads, head_dim 128, bf16; each
method's kernel runs --calls times (the first compiles). Prints each method's output error against the reference.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tq_transformers import kernels  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tune_decode_kernels import CACHES  # noqa: E402


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--point", default="8x32768")
    ap.add_argument("--methods", default=",".join(CACHES))
    ap.add_argument("--calls", type=int, default=2)
    args = ap.parse_args()
    batch, context = map(int, args.point.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(batch, 8, context, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, 8, context, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, 32, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
    for name in args.methods.split(","):
        cache = CACHES[name][0]()
        cache.update(k, v, 0)
        cache.update(k[:, :, :1], v[:, :, :1], 0)
        layer = cache.layers[0]
        call = (layer, q, layer.num_quantized, layer.keys, layer.values, None, 128**-0.5)
        ref = kernels.decode_attention(*call, impl="reference").float()
        for _ in range(args.calls):
            out = kernels.decode_attention(*call, impl="triton").float()
        torch.cuda.synchronize()
        print(f"{name}: rel err {float((out - ref).norm() / ref.norm()):.2e}", flush=True)


if __name__ == "__main__":
    main()
