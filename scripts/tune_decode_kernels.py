#!/usr/bin/env python
"""Sweep the launch settings of the fused decode kernels and check every setting against the PyTorch reference.

One layer, Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head_dim 128), bf16 queries, random keys and
values, each cache with its defaults. For each method and batch x context point, every combination of packed tokens
per iteration (`block_n`), warps, pipelining stages and split waves is run once against the reference (relative
error of the output) and timed with `triton.testing.do_bench` (median, L2 flushed between repetitions). The bytes
the kernel must read (codes + metadata + window) over its time give the achieved bandwidth, compared with a
device-to-device copy measured in the same run (bytes read + written). SDPA on the bf16 cache of the same shape is
timed as the anchor.

    python scripts/tune_decode_kernels.py --out $OUT                   # full sweep (one H200: a few minutes)
    python scripts/tune_decode_kernels.py --quick --out /tmp/tune      # the shipped settings only

Prints one row per setting and, last, the best setting per method and point; writes tune_decode_kernels.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tq_transformers import BonsaiCache, KIVICache, TurboQuantCache, kernels  # noqa: E402

CACHES = {
    "turboquant4": (lambda: TurboQuantCache(bits=4), "codebook"),
    "kivi2": (lambda: KIVICache(bits=2), "kivi"),
    "bonsai1": (lambda: BonsaiCache(), "codebook"),
}


def bench(fn) -> float:
    """Median microseconds of `fn` (triton.testing.do_bench: warm-up, L2 flushed before every repetition)."""
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


def copy_tbps() -> float:
    x = torch.empty(2**31, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    us = bench(lambda: y.copy_(x))
    del x, y
    return 2 * 2**31 / (us * 1e-6) / 1e12


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "results/tune"))
    ap.add_argument("--points", default="8x32768,1x32768")
    ap.add_argument("--methods", default=",".join(CACHES))
    ap.add_argument("--block-n", default="32,64,128")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--waves", default="4,8,16,32")
    ap.add_argument("--quick", action="store_true", help="only the shipped settings")
    args = ap.parse_args()
    from tq_transformers.kernels import triton_kernels as tk

    shipped = {k: dict(v) for k, v in tk.DECODE_TUNING.items()}
    shipped_waves = tk.SPLIT_WAVES
    os.makedirs(args.out, exist_ok=True)
    bw = copy_tbps()
    print(f"{torch.cuda.get_device_name()}: copy {bw:.2f} TB/s (read + write)", flush=True)
    rows = []
    for point in args.points.split(","):
        batch, context = map(int, point.split("x"))
        gen = torch.Generator(device="cuda").manual_seed(0)
        k = torch.randn(batch, 8, context, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(batch, 8, context, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(batch, 32, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
        sdpa_us = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], k, v, scale=128**-0.5, enable_gqa=True))
        rows.append(dict(method="bf16_sdpa_gqa", batch=batch, context=context, us=round(sdpa_us, 1),
                         of_copy=round(2 * k.numel() * 2 / (sdpa_us * 1e-6) / 1e12 / bw, 4)))
        print(json.dumps(rows[-1]), flush=True)
        for name in args.methods.split(","):
            make, family = CACHES[name]
            cache = make()
            cache.update(k, v, 0)
            cache.update(k[:, :, :1], v[:, :, :1], 0)
            layer = cache.layers[0]
            fp = layer.memory_footprint()
            nbytes = fp["codes"] + fp["metadata"] + fp["window"]
            call = (layer, q, layer.num_quantized, layer.keys, layer.values, None, 128**-0.5)
            ref = kernels.decode_attention(*call, impl="reference").float()
            grid = [(shipped[family]["block_n"], shipped[family]["num_warps"], shipped[family]["num_stages"],
                     shipped_waves)]
            if not args.quick:
                grid = list(itertools.product(*(map(int, a.split(",")) for a in (
                    args.block_n, args.warps, args.stages, args.waves))))
            for block_n, warps, stages, waves in grid:
                tk.DECODE_TUNING[family] = dict(block_n=block_n, num_warps=warps, num_stages=stages)
                tk.SPLIT_WAVES = waves
                row = dict(method=name, batch=batch, context=context, block_n=block_n, warps=warps, stages=stages,
                           waves=waves)
                try:
                    out = kernels.decode_attention(*call, impl="triton").float()
                    row["rel_err"] = float((out - ref).norm() / ref.norm())
                    us = bench(lambda: kernels.decode_attention(*call, impl="triton"))
                    row.update(us=round(us, 1), mb=round(nbytes / 1e6, 1),
                               of_copy=round(nbytes / (us * 1e-6) / 1e12 / bw, 4),
                               vs_sdpa=round(us / sdpa_us, 3))
                except Exception as exc:  # noqa: BLE001 - a setting that does not compile (shared memory) is skipped
                    row["error"] = repr(exc)[:200]
                rows.append(row)
                print(json.dumps(row), flush=True)
            tk.DECODE_TUNING[family] = dict(shipped[family])
            tk.SPLIT_WAVES = shipped_waves
            del cache, layer
        del k, v
    with open(os.path.join(args.out, "tune_decode_kernels.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "copy_tbps": bw, "torch": torch.__version__, "rows": rows},
                  f, indent=1)
    print("\n| method | batch x context | best block_n/warps/stages/waves | us | of copy | vs SDPA bf16 | rel err |")
    print("|---|---|---|---|---|---|---|")
    for point in args.points.split(","):
        batch, context = map(int, point.split("x"))
        for name in args.methods.split(","):
            ok = [r for r in rows if r["method"] == name and r["batch"] == batch and r["context"] == context
                  and "us" in r and r["rel_err"] < 2e-2]
            if ok:
                r = min(ok, key=lambda r: r["us"])
                print(f"| {name} | {batch} x {context} | {r['block_n']}/{r['warps']}/{r['stages']}/{r['waves']} | "
                      f"{r['us']} | {r['of_copy']:.1%} | {r['vs_sdpa']} | {r['rel_err']:.1e} |")
    bad = [r for r in rows if "rel_err" in r and r["rel_err"] >= 2e-2]
    print(f"settings over the error bound: {len(bad)}; errors: {sum('error' in r for r in rows)}")


if __name__ == "__main__":
    main()
