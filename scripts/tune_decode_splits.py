"""Sweep the split heuristic of the fused decode kernels (programs per SM) and check each setting against the
PyTorch reference. One layer, Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head_dim 128), bf16.

    python scripts/tune_decode_splits.py --out $OUT
"""

import argparse
import json
import os

import torch

from tq_transformers import BonsaiCache, KIVICache, TurboQuantCache, kernels
from tq_transformers.kernels import triton_kernels as tk

CACHES = {"turboquant4": lambda: TurboQuantCache(bits=4), "kivi2": lambda: KIVICache(bits=2),
          "bonsai1": lambda: BonsaiCache()}


def timed(fn, iters=30):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3  # us


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "results/tune"))
    ap.add_argument("--waves", default="2,8,16,32,64")
    ap.add_argument("--points", default="8x32768,1x32768")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    copy_bw = None
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_bw = 2 * x.numel() / (timed(lambda: y.copy_(x), 10) * 1e-6) / 1e12  # TB/s, read + write
    del x, y
    for point in args.points.split(","):
        batch, context = map(int, point.split("x"))
        gen = torch.Generator(device="cuda").manual_seed(0)
        k = torch.randn(batch, 8, context, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(batch, 32, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
        for name, make in CACHES.items():
            cache = make()
            cache.update(k, k, 0)
            cache.update(k[:, :, :1], k[:, :, :1], 0)
            layer = cache.layers[0]
            fp = layer.memory_footprint()
            nbytes = fp["codes"] + fp["metadata"] + fp["window"]
            args_ = (layer, q, layer.num_quantized, layer.keys, layer.values, None, 128**-0.5)
            ref = kernels.decode_attention(*args_, impl="reference").float()
            for waves in map(int, args.waves.split(",")):
                tk.SPLIT_WAVES, tk.MAX_SPLITS = waves, max(128, waves * 8)
                out = kernels.decode_attention(*args_, impl="triton").float()
                err = ((out - ref).norm() / ref.norm()).item()
                us = timed(lambda: kernels.decode_attention(*args_, impl="triton"))
                row = dict(method=name, batch=batch, context=context, waves=waves, us=round(us, 1),
                           tbps=round(nbytes / us / 1e6, 3), of_copy=round(nbytes / us / 1e6 / copy_bw, 4),
                           rel_err=err)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del cache, layer
        del k
    with open(os.path.join(args.out, "tune_decode_splits.json"), "w") as f:
        json.dump({"copy_tbps": copy_bw, "rows": rows, "gpu": torch.cuda.get_device_name()}, f, indent=1)
    print("copy TB/s", round(copy_bw, 3))


if __name__ == "__main__":
    main()
