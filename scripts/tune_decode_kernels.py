#!/usr/bin/env python
"""Check and time the decode kernels on the Llama-3.1-8B attention shape, and sweep the CUDA split kernel's plan.

One layer: 32 query heads, 8 KV heads, head_dim 128, bf16 queries, random keys and values packed by the compress
kernels (TurboQuant-4 centered; KIVI-2, group 32; Bonsai-1, group 128; as the caches' defaults), a 64-token window.
For every batch x context point: a device-to-device copy (bytes read + written) gives the bandwidth ceiling; flash
SDPA on the bf16 cache (each KV head read once, ``enable_gqa``) is the anchor; each method's decode step is timed
with ``triton.testing.do_bench`` (median, L2 flushed before every repetition) on the Triton split kernel
(``impl="triton_only"``) and on the default GPU path (``impl="triton"``: the CUDA split kernel where it covers the
pair), and checked against the reference at the points named by --check. Bytes read = codes + metadata + window.

    python scripts/tune_decode_kernels.py --out $OUT                       # table + sweep (one H200: ~2 minutes)
    python scripts/tune_decode_kernels.py --points 8x32768 --no-sweep      # one point

Self-contained on ``tq_transformers.kernels`` and ``formats`` (no caches, no model). Writes tune_decode_kernels.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tq_transformers import kernels  # noqa: E402
from tq_transformers.codebooks import codebook  # noqa: E402
from tq_transformers.formats import ChannelAffinePacked, CodebookPacked, SplitCodebookPacked, TokenAffinePacked  # noqa: E402,E501
from tq_transformers.kernels import cuda_split, triton_reduce  # noqa: E402
from tq_transformers.rotation import random_rotation  # noqa: E402

HQ, HKV, D, WINDOW = 32, 8, 128, 64
# Full-precision window tokens of each method's defaults, near the middle of their range (TurboQuant-4 0-127, Bonsai-1
# 128-255; KIVI-2 128-159 at 128, so that the packed part stays whole key groups): what the reduce kernel attends at a
# typical step. WINDOW (64) is the --fixed-window.
METHOD_WINDOWS = {"turboquant4": 64, "kivi2": 128, "bonsai1": 192}
# TurboQuant at other rates (issue 14): 3 bits and the two-rate splits, decoded a coordinate at a time
OTHER_RATES = {"turboquant3": 3, "turboquant3.5": 3.5, "turboquant2.5": 2.5}
METHOD_WINDOWS.update({name: METHOD_WINDOWS["turboquant4"] for name in OTHER_RATES})
METHODS = ("turboquant4", "kivi2", "bonsai1")
META = torch.float16  # stored metadata dtype
# The CUDA plan's sweep (CUDA_PLAN keys): the launch bound's blocks per SM, waves of resident blocks, the fewest tokens
# a split takes, warps per block (8 measured 4-10% faster than 4 on session 11's cp.async variant, docs/RESULTS.md),
# the accumulators rescaled only when a running max moved, tiles loaded ahead, the cp.async staging ring's stages
# (codebook kernel), the one-side table of pairs whose tables are equal (TurboQuant-4; off unless named, e.g.
# --sweep "shared_table=0,1;ring=2,3;warps=8,16": cuda_split.plan_for switches it off for the other pairs, as it
# does a ring that does not fit); SWEEP_TAGS names a variant's values
SWEEP = {"min_blocks": (0, 4), "waves": (1, 2), "min_tokens": (256, 512), "warps": (4, 8), "lazy_rescale": (0, 1),
         "depth": (1, 2), "ring": (0, 3), "shared_table": (0,)}
SWEEP_TAGS = {"min_blocks": "b", "waves": "v", "min_tokens": "t", "warps": "w", "lazy_rescale": "z", "depth": "d",
              "ring": "r", "shared_table": "s"}


def bench(fn, graph: bool = True) -> float:
    """Median microseconds of `fn` (do_bench: warm-up, L2 flushed before every repetition). With `graph`, `fn` is
    captured in a CUDA graph and its replays are timed: the GPU time of the step as the caches' CUDA-graph decoding
    runs it, without the host's launch overhead (which an idle GPU would otherwise add to the event timing)."""
    import triton.testing

    if graph:
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 4 GiB device-to-device copy."""
    src = torch.empty(2**31, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src), graph=False)
    return 2 * 2**31 / (us * 1e-6)


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def pack(method: str, k: torch.Tensor, v: torch.Tensor):
    """(keys, values, bytes of codes + metadata) of `method` from bf16 [B, H, N, D] keys and values."""
    dev = k.device
    if method == "turboquant4":
        out = []
        for i, x in enumerate((k, v)):
            mean = x.float().mean(2, keepdim=True).to(META)
            rot, levels = random_rotation(D, 7 + i, dev), codebook(4, D, dev)
            codes, norms = kernels.turboquant_compress(x, mean, rot, levels, 4)
            out.append(CodebookPacked(codes, norms, levels, 4, rot, mean))
        return out[0], out[1], nbytes(out[0].codes, out[0].scale, out[1].codes, out[1].scale)
    if method in OTHER_RATES:
        from tq_transformers.methods.turboquant import rate_split, turboquant_encode_split

        out, split, total = [], rate_split(OTHER_RATES[method], D), 0
        for i, x in enumerate((k, v)):
            mean = x.float().mean(2, keepdim=True).to(META)
            rot = random_rotation(D, 7 + i, dev)
            levels = tuple(codebook(b, D, dev) for b, _ in split)
            codes, norms = turboquant_encode_split(x, mean, rot, levels, split)
            total += nbytes(*codes, norms)
            parts = tuple(CodebookPacked(c, norms, lv, b) for c, lv, (b, _) in zip(codes, levels, split))
            out.append(SplitCodebookPacked(parts, rot, mean) if len(parts) > 1 else
                       CodebookPacked(codes[0], norms, levels[0], split[0][0], rot, mean))
        return out[0], out[1], total
    if method == "kivi2":
        keys = ChannelAffinePacked(*kernels.kivi_compress_keys(k, 2, 32), 2, 32)
        values = TokenAffinePacked(*kernels.kivi_compress_values(v, 2, 32), 2, 32)
        return keys, values, nbytes(keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero)
    from tq_transformers.methods.bonsai import sign_levels

    levels = sign_levels(dev)
    sides = [CodebookPacked(*kernels.bonsai_compress(x, None, None, 128), levels, 1) for x in (k, v)]
    return sides[0], sides[1], nbytes(sides[0].codes, sides[0].scale, sides[1].codes, sides[1].scale)


def rel_err(got, want) -> float:
    return float((got.float() - want.float()).abs().amax() / want.float().abs().amax().clamp_min(1.0))


@torch.no_grad()
def point(batch: int, context: int, check: bool, sweep: bool, copy_bw: float, methods, fixed_window: bool = False,
          reduce_sweep: bool = False):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(batch, HKV, context, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, HKV, context, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, HQ, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    rows = []
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        t = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, scale=D**-0.5,
                                                                           enable_gqa=True))
    flash_us = t
    rows.append({"method": "bf16_flash", "impl": "sdpa", "batch": batch, "context": context, "us": t,
                 "bytes": nbytes(k, v)})
    for method in methods:
        window = WINDOW if fixed_window else METHOD_WINDOWS[method]
        wk, wv = k[:, :, -window:].contiguous(), v[:, :, -window:].contiguous()
        keys, values, packed = pack(method, k[:, :, :context - window], v[:, :, :context - window])
        args = {"q": q, "keys": keys, "values": values, "window_k": wk, "window_v": wv, "key_mask": None,
                "scaling": D**-0.5}
        total = packed + nbytes(wk, wv)
        want = kernels.decode_attention(**args, impl="reference") if check else None
        impls = ["triton_only"] + (["triton"] if cuda_split.supported(q, keys, values) else [])
        for impl in impls:
            err = rel_err(kernels.decode_attention(**args, impl=impl), want) if check else None
            t = bench(lambda a=args, i=impl: kernels.decode_attention(**a, impl=i))
            eager = bench(lambda a=args, i=impl: kernels.decode_attention(**a, impl=i), graph=False)
            rows.append({"method": method, "impl": "cuda" if impl == "triton" else "triton", "batch": batch,
                         "context": context, "us": t, "eager_us": eager, "bytes": total, "err": err})
        if sweep and "triton" in impls:
            saved, overrides = dict(cuda_split.CUDA_PLAN), cuda_split.PLAN_OVERRIDES
            cuda_split.PLAN_OVERRIDES = {}  # each variant as swept, whatever the format's measured overrides
            for values in itertools.product(*SWEEP.values()):
                variant = dict(zip(SWEEP, values))
                cuda_split.CUDA_PLAN.update(variant)
                t = bench(lambda a=args: kernels.decode_attention(**a, impl="triton"))
                name = " ".join(f"{SWEEP_TAGS[k]}{int(v)}" for k, v in variant.items())
                rows.append({"method": method, "impl": f"cuda {name}", "batch": batch, "context": context, "us": t,
                             "bytes": total, "sweep": True})
            cuda_split.CUDA_PLAN.update(saved)
            cuda_split.PLAN_OVERRIDES = overrides
        if reduce_sweep:
            saved = dict(triton_reduce.REDUCE_TUNING)
            for chunk, block_w, warps in itertools.product((32, 64, 128), (64, 128), (4, 8)):
                triton_reduce.REDUCE_TUNING.update(chunk=chunk, block_w=block_w, num_warps=warps)
                t = bench(lambda a=args: kernels.decode_attention(**a, impl="triton"))
                rows.append({"method": method, "impl": f"reduce c{chunk} w{block_w} n{warps}", "batch": batch,
                             "context": context, "us": t, "bytes": total, "sweep": True})
            triton_reduce.REDUCE_TUNING.update(saved)
        del keys, values, want
    for r in rows:
        r["of_copy"] = r["bytes"] / (r["us"] * 1e-6) / copy_bw
        r["vs_flash"] = r["us"] / flash_us
    return rows


@torch.no_grad()
def profile(batch: int = 8, context: int = 32768):
    """torch.profiler's CUDA kernel times of one decode step of each method (default path), as a table."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(batch, HKV, context, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, HQ, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    out = []
    for method in METHODS:
        keys, values, _ = pack(method, k, k)
        args = {"q": q, "keys": keys, "values": values, "window_k": k[:, :, -WINDOW:], "window_v": k[:, :, -WINDOW:],
                "key_mask": None, "scaling": D**-0.5}
        for _ in range(3):
            kernels.decode_attention(**args)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                kernels.decode_attention(**args)
            torch.cuda.synchronize()
        out.append(f"{method}:\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=6))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "results/tune"))
    ap.add_argument("--points", default="1x4096,1x32768,8x32768,1x131072,8x131072")
    ap.add_argument("--check", default="1x4096,8x32768", help="points checked against the reference")
    ap.add_argument("--sweep-points", default="1x32768,8x32768,1x131072")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep", default=None, help="the plan sweep's axes instead of SWEEP's, e.g. "
                    "'warps=4,8;min_blocks=0' (CUDA_PLAN keys; every key of SWEEP not named keeps its values)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's kernel times at 8x32768")
    ap.add_argument("--fixed-window", action="store_true", help=f"a {WINDOW}-token window for every method "
                    "(sessions 1-5's setting) instead of METHOD_WINDOWS")
    ap.add_argument("--reduce-sweep", action="store_true", help="sweep the reduce kernel's window tile and warps at "
                    "the sweep points")
    args = ap.parse_args()
    for axis in (args.sweep or "").split(";"):
        if axis:
            key, values = axis.split("=")
            if key not in SWEEP:
                ap.error(f"--sweep: {key!r} is not one of {sorted(SWEEP)}")
            SWEEP[key] = tuple(int(v) for v in values.split(","))
    os.makedirs(args.out, exist_ok=True)
    bw = copy_bandwidth()
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "command": " ".join(sys.argv),
           "date": time.strftime("%Y-%m-%d"), "copy_bandwidth_tbs": bw / 1e12, "rows": [], "errors": []}
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    for p in args.points.split(","):
        batch, context = map(int, p.split("x"))
        try:
            at_sweep = p in args.sweep_points.split(",")
            rows = point(batch, context, p in args.check.split(","), not args.no_sweep and at_sweep, bw,
                         args.methods.split(","), args.fixed_window, args.reduce_sweep and at_sweep)
        except torch.cuda.OutOfMemoryError:
            res["errors"].append(f"{p}: out of memory")
            continue
        res["rows"].extend(rows)
        for r in rows:
            err = "" if r.get("err") is None else f" err {r['err']:.2e}"
            err += "" if r.get("eager_us") is None else f" eager {r['eager_us']:.1f} us"
            print(f"{p:>9} {r['method']:>12} {r['impl']:>20} {r['us']:9.1f} us {r['bytes'] / 1e6:8.1f} MB "
                  f"{100 * r['of_copy']:5.1f}% of copy {r['vs_flash']:5.2f}x flash{err}", flush=True)
        torch.cuda.empty_cache()
        with open(os.path.join(args.out, "tune_decode_kernels.json"), "w") as f:
            json.dump(res, f, indent=1)
    print("\n| point | method | impl | us | MB | % of copy | x flash |")
    print("|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        if not r.get("sweep"):
            print(f"| {r['batch']}x{r['context']} | {r['method']} | {r['impl']} | {r['us']:.1f} | "
                  f"{r['bytes'] / 1e6:.1f} | {100 * r['of_copy']:.1f} | {r['vs_flash']:.2f} |")
    best = {}
    for r in res["rows"]:
        if r.get("sweep"):
            key = (r["method"], r["batch"], r["context"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    for key, r in best.items():
        print(f"best plan {key}: {r['impl']} {r['us']:.1f} us ({100 * r['of_copy']:.1f}% of copy)")
    for e in res["errors"]:
        print("error:", e)
    if args.profile:
        res["profile"] = profile()
        print(res["profile"])
    res["cuda_build_failures"] = {str(k): v for k, v in cuda_split._FAILED.items()}
    print("CUDA build failures:", res["cuda_build_failures"] or "none")
    with open(os.path.join(args.out, "tune_decode_kernels.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
