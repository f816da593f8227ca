#!/usr/bin/env python
"""The grouped skinny GEMM (``kernels.triton_gemv``) against cuBLAS on a decode step's projections, and its tuning.

    python scripts/tune_gemv.py --out results/gemv      # a CUDA GPU; Llama-3.1-8B shapes, batch 1 and 8

Each operation is timed the way a graph-replayed decode step runs it: captured in a CUDA graph over enough copies of
its weights that no copy is still in L2 when it is read again (more than 4x the L2 in all), the replay's time divided
by the copies. Operations: the attention's q / k / v projections (cuBLAS: three F.linear; ours: one launch), o_proj
alone, and, for reference, the MLP's gate / up pair and down. Printed: us per operation, the share of the copy
bandwidth measured in the same run (a device-to-device copy of 1 GiB), and the sweep of GEMV_TUNING's keys on the
q / k / v group (each variant checked against float32 math first). Writes `--out`/gemv.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

from tq_transformers.kernels import reference, triton_gemv

HIDDEN, HEADS_DIM, KV_DIM, FFN = 4096, 4096, 1024, 14336  # Llama-3.1-8B
OPS = {  # name -> (output widths of the members, K)
    "qkv": ((HEADS_DIM, KV_DIM, KV_DIM), HIDDEN),
    "o": ((HIDDEN,), HEADS_DIM),
    "gate_up": ((FFN, FFN), HIDDEN),
    "down": ((HIDDEN,), FFN),
}
SWEEP = {"block_n": (16, 32, 64), "block_k": (128, 256, 512), "num_warps": (4, 8), "num_stages": (3, 5)}
L2_MULTIPLE = 4  # the copies of the weights hold at least this many times the L2


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (read + write counted), best of 5."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(6):
        torch.cuda.synchronize()
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() / best


def graph_time(fn, copies: int, replays: int = 20) -> float:
    """Seconds per copy of `fn(i)` for i in range(copies), captured in one CUDA graph (after a warm-up)."""
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / replays / copies


def weights_for(widths, k, dtype):
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    one = sum(widths) * k * 2
    copies = max(2, -(-L2_MULTIPLE * l2 // one))
    gen = torch.Generator(device="cuda").manual_seed(0)
    sets = [[torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) / k**0.5 for n in widths]
            for _ in range(copies)]
    return sets, one


def check(x, ws, tuning) -> float:
    """Largest error of the kernel against float32 math, in units of the output dtype's rounding."""
    outs = triton_gemv.linear_group(x, ws, tuning=tuning)
    worst = 0.0
    for out, w in zip(outs, ws):
        want = x.float() @ w.float().T
        ulp = torch.finfo(x.dtype).eps * want.abs().clamp_min(1.0)
        worst = max(worst, ((out.float() - want).abs() / ulp).max().item())
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "results/gemv"))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_gemv.py needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    dtype = torch.bfloat16
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s; GEMV_TUNING {triton_gemv.GEMV_TUNING}")
    rows = []
    sweep_rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for op, (widths, k) in OPS.items():
            sets, nbytes = weights_for(widths, k, dtype)
            x = torch.randn(batch, k, device="cuda", dtype=dtype)
            assert check(x, sets[0], None) <= 1.0
            cublas = graph_time(lambda i, x=x, sets=sets: [torch.nn.functional.linear(x, w) for w in sets[i]],
                                len(sets))
            ours = graph_time(lambda i, x=x, sets=sets: triton_gemv.linear_group(x, sets[i]), len(sets))
            for impl, t in (("cublas", cublas), ("triton_gemv", ours)):
                rows.append({"op": op, "batch": batch, "impl": impl, "us": t * 1e6, "bytes": nbytes,
                             "of_copy": nbytes / t / bw})
            print(f"  {op:8s} b{batch}: cuBLAS {cublas * 1e6:7.1f} us ({nbytes / cublas / bw:5.1%}), "
                  f"ours {ours * 1e6:7.1f} us ({nbytes / ours / bw:5.1%})", flush=True)
            if args.no_sweep or op not in ("qkv", "o"):
                del sets
                continue
            for values in itertools.product(*SWEEP.values()):
                tuning = dict(zip(SWEEP, values))
                try:
                    err = check(x, sets[0], tuning)
                    t = graph_time(lambda i, tn=tuning, x=x, sets=sets: triton_gemv.linear_group(x, sets[i], tuning=tn),
                                   len(sets))
                except Exception as exc:  # noqa: BLE001  (shared memory out of range etc.: reported, skipped)
                    print(f"    {tuning}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
                    continue
                sweep_rows.append({"op": op, "batch": batch, **tuning, "us": t * 1e6, "of_copy": nbytes / t / bw,
                                   "err_ulp": err})
            best = sorted((r for r in sweep_rows if r["op"] == op and r["batch"] == batch), key=lambda r: r["us"])[:5]
            for r in best:
                print(f"    best {op} b{batch}: {r}")
            del sets
    json.dump({"card": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_tbs": bw / 1e12,
               "tuning": triton_gemv.GEMV_TUNING, "rows": rows, "sweep": sweep_rows,
               "max_rows": reference.GEMV_MAX_ROWS}, open(os.path.join(args.out, "gemv.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
