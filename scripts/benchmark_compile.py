#!/usr/bin/env python
"""torch.compile of the decode step (issue 12, item 1): warm-up and ms per token, against our graph runner and
transformers' StaticCache + auto-compile, on the Llama-3.1-8B config with random bf16 weights.

    python scripts/benchmark_compile.py --quick --out results/compile_quick          # about a minute: it runs
    python scripts/benchmark_compile.py --batches 1 --out results/compile_b1         # one H200: ~6 min
    # batch 8 in two parts (below)

Configurations, each through the ``generate`` a user calls (greedy, ``min_new_tokens`` = ``max_new_tokens``):

- ``runner-<method>``: ``tq_transformers.enable(model, method, fast=True, cuda_graphs=True)``: our CUDA-graph runner;
- ``compiled-<method>``: a fixed-capacity cache, ``<Cache>(model.config, max_cache_len=..., **settings)``, passed to
  ``generate`` with "tq_fused" attention installed: transformers' own auto-compile (its default ``CompileConfig``:
  inductor, mode "reduce-overhead", i.e. CUDA graphs), no other user code;
- ``static-compile``: transformers' StaticCache, same auto-compile.

Every cache has the capacity of the longer call, so both lengths share one compiled graph. Warm-up: the first call of
each configuration (compilation, Triton autotuning, graph capture) minus a later call of the same length. Per-token
decode time = (t(long) - t(short)) / (long - short), so the prefill cancels. The configurations run in alternation,
round after round (docs/METHODS.md, "Measurement rules"); medians over rounds. Dynamo's recompile limit is raised so
that all configurations keep their compiled graphs, and automatic dynamic shapes are off (each shape its own graph,
as generate's static caches expect). Results are printed and written to ``--out``/compile.json after each shape.

Time on one H200 (estimated from the measured StaticCache warm-ups of 66 s / 99 s and 32K prefills of about 2 s /
15 s; each configuration makes 3 calls): ``--batches 1`` with everything about 6 minutes; at batch 8 split it, each
part under 9 minutes (``--out`` apart, the JSON is per run)::

    python scripts/benchmark_compile.py --batches 8 --methods turboquant-4 --out results/compile_b8_tq
    python scripts/benchmark_compile.py --batches 8 --methods kivi-2,bonsai-1 --kinds runner,compiled \
        --out results/compile_b8_kivi_bonsai
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_generate import LENGTHS, LLAMA31_8B, OURS, build_model  # noqa: E402
from transformers import StaticCache  # noqa: E402

import tq_transformers  # noqa: E402
from tq_transformers import fast_attention  # noqa: E402
from tq_transformers.generation import CACHE_KWARG  # noqa: E402
from tq_transformers.registry import get_method  # noqa: E402

KINDS = ("runner", "compiled", "static")
QUICK = dict(layers=2, context=1024, lengths=(4, 20))  # --quick: checks that every configuration runs
RECOMPILE_LIMIT = 64  # dynamo graphs kept per code object: 3 methods x 2 batch sizes x compiled/static, with room


def configurations(methods: list[str], kinds: list[str]) -> list[str]:
    names = [f"{kind}-{m}" for m in methods for kind in ("runner", "compiled") if kind in kinds]
    return names + (["static-compile"] if "static" in kinds else [])


def run_generate(model, name: str, ids: torch.Tensor, new_tokens: int, capacity: int) -> float:
    """One generate call of configuration `name`; returns its seconds."""
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False)
    kind, _, method = name.partition("-")
    previous = None
    if name == "static-compile":
        kwargs[CACHE_KWARG] = StaticCache(config=model.config, max_cache_len=capacity)
    elif kind == "runner":
        tq_transformers.enable(model, OURS[method][0], fast=True, cuda_graphs=True, **OURS[method][1])
    else:
        previous = fast_attention.install(model)
        kwargs[CACHE_KWARG] = get_method(OURS[method][0])(model.config, max_cache_len=capacity, **OURS[method][1])
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)  # (the CPU: the script's own test)
    sync()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(ids, **kwargs)
        sync()
    finally:
        if kind == "runner":
            tq_transformers.disable(model)
        elif previous is not None:
            fast_attention.uninstall(model, previous)
    seconds = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "results/compile"))
    ap.add_argument("--context", type=int, default=32768, help="prompt length")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--methods", default=",".join(OURS), help=f"comma-separated, of {list(OURS)}")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {list(KINDS)}")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the alternating timing (median reported)")
    ap.add_argument("--layers", type=int, default=LLAMA31_8B["num_hidden_layers"])
    ap.add_argument("--quick", action="store_true", help=f"a check that it runs: {QUICK}")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the figures are GPU timings)")
    methods = args.methods.split(",")
    kinds = args.kinds.split(",")
    for m in methods:
        if m not in OURS:
            ap.error(f"--methods: {m!r} is not one of {list(OURS)}")
    for k in kinds:
        if k not in KINDS:
            ap.error(f"--kinds: {k!r} is not one of {list(KINDS)}")
    layers, context = (QUICK["layers"], QUICK["context"]) if args.quick else (args.layers, args.context)
    torch._dynamo.config.cache_size_limit = RECOMPILE_LIMIT
    torch._dynamo.config.accumulated_cache_size_limit = RECOMPILE_LIMIT * 4
    torch._dynamo.config.automatic_dynamic_shapes = False
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    model = build_model(layers)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": __import__("transformers").__version__, "layers": layers, "context": context,
               "runs": []}
    names = configurations(methods, kinds)
    for batch in (int(b) for b in args.batches.split(",")):
        short, long = QUICK["lengths"] if args.quick else LENGTHS.get(batch, (8, 72))
        capacity = context + long
        ids = torch.randint(0, LLAMA31_8B["vocab_size"], (batch, context), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(context + batch))
        first = {}
        for name in names:  # warm-up: the first call of each configuration compiles / captures
            first[name] = run_generate(model, name, ids, short, capacity)
            print(f"  {batch} x {context} {name}: first call {first[name]:.1f} s", flush=True)
        timings = {name: {"short": [], "long": []} for name in names}
        for _ in range(args.rounds):
            for name in names:
                for key, n in (("short", short), ("long", long)):
                    timings[name][key].append(run_generate(model, name, ids, n, capacity))
        print(f"\n{batch} x {context}: ms per token, warm-up s (first call - a later short call)")
        print("| configuration | ms/token | warm-up s | first call s |")
        print("| --- | --- | --- | --- |")
        for name in names:
            per_round = [(b - a) / (long - short) for a, b in zip(timings[name]["short"], timings[name]["long"])]
            per_token = statistics.median(per_round)
            warmup = first[name] - statistics.median(timings[name]["short"])
            row = {"name": name, "batch": batch, "context": context, "ms_per_token": 1e3 * per_token,
                   "warmup_s": warmup, "first_call_s": first[name], "per_round_ms": [1e3 * x for x in per_round],
                   "lengths": [short, long]}
            results["runs"].append(row)
            print(f"| {name} | {row['ms_per_token']:.2f} | {warmup:.1f} | {first[name]:.1f} |")
        results["dynamo_counters"] = {k: dict(v) for k, v in torch._dynamo.utils.counters.items()
                                      if k in ("stats", "graph_break")}
        with open(os.path.join(args.out, "compile.json"), "w") as f:
            json.dump(results, f, indent=1)
        del ids
        torch.cuda.empty_cache()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
