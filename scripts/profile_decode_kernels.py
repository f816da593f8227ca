#!/usr/bin/env python
"""Run each method's decode step a few times on the Llama-3.1-8B attention shape, for a hardware profiler.

    ncu --clock-control none -k regex:"codebook_split|split_kernel" --section SpeedOfLight --section WarpStateStats \\
        --section Occupancy --section MemoryWorkloadAnalysis python3 scripts/profile_decode_kernels.py

One layer, batch x context from --point (default 8x32768), 32 query heads, 8 KV heads, head_dim 128, bf16, packed as
``tune_decode_kernels.pack`` does; each method's step runs --calls times on --impl (the first compiles). Prints each
method's output error against the reference.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tune_decode_kernels import HKV, HQ, METHODS, D, pack, rel_err  # noqa: E402

from tq_transformers import kernels  # noqa: E402


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--point", default="8x32768")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--impl", default="triton", choices=["triton", "triton_only", "cuda"])
    ap.add_argument("--calls", type=int, default=2)
    args = ap.parse_args()
    batch, context = map(int, args.point.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(batch, HKV, context, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, HKV, context, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, HQ, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    for name in args.methods.split(","):
        keys, values, _ = pack(name, k, v)
        call = {"q": q, "keys": keys, "values": values, "window_k": k[:, :, -64:], "window_v": v[:, :, -64:],
                "key_mask": None, "scaling": D**-0.5}
        ref = kernels.decode_attention(**call, impl="reference")
        for _ in range(args.calls):
            out = kernels.decode_attention(**call, impl=args.impl)
        torch.cuda.synchronize()
        print(f"{name}: max error {rel_err(out, ref):.2e} (relative to max |out|)", flush=True)


if __name__ == "__main__":
    main()
