#!/usr/bin/env python
"""CPU decode speed of the default caches against DynamicCache, on the real model (Qwen2.5-Coder-1.5B bf16).

    python scripts/benchmark_cpu_decode.py --out results/cpu_decode                # 2K and 8K context
    python scripts/benchmark_cpu_decode.py --contexts 2048 --rounds 3 --lengths 2,10

What is timed: ``model.generate`` (greedy, ``min_new_tokens`` = ``max_new_tokens``) continuing a cache that already
holds the context, for DynamicCache and for ``tq_transformers.enable(model, method, fast=True)`` with TurboQuant-4,
KIVI-2 and Bonsai-1 at their default settings (``--plain`` also times the reference path, ``fast=False``).

- The context: the first ``--prefill-tokens`` tokens of a real text (the Debian handbook of the shared data) are
  prefilled once with the model in ``--prefill-dtype`` (float32 by default: on a CPU without bf16 instructions a
  bf16 prefill of 2K tokens takes tens of minutes), and their keys and values (cast to the model dtype) are saved in
  ``--out``, reused by later runs. A longer context repeats those keys and values (and ids): decode time does not
  depend on the values held, only on how many. Every configuration starts from the same context: the states are
  handed to a fresh cache with ``cache.update`` (what a prefill does: our caches quantize them there).
- Per-token decode time = (t(long) - t(short)) / (long - short) generated tokens (``--lengths``), so the time to
  fill the cache and the first step cancel. The configurations run in alternation, round after round, after one
  warm-up call of each; the median over rounds is reported, and each cache's ratio to DynamicCache is the median
  of the per-round ratios (the machine may be shared: ratios within one round share its load).

``--profile``: one more generate call of each configuration under torch.profiler, split into the attention
(SDPA, or the CPU attention on the packed codes), the cache updates (``update`` of the cache layers: storing, and on
the reference path dequantizing) and the rest (the model), in ms per call.

Prints a table per context and writes ``--out``/cpu_decode.json after every context.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from transformers import DynamicCache  # noqa: E402

import tq_transformers  # noqa: E402
from tq_transformers.evaluation.data import load_text, tokenize_text  # noqa: E402
from tq_transformers.evaluation.models import default_cache_dir, load_model_and_tokenizer  # noqa: E402
from tq_transformers.generation import CACHE_KWARG  # noqa: E402
from tq_transformers.registry import get_method  # noqa: E402

MODEL_DIR = "qwen2.5-coder-1.5b-bf16"  # under tq_transformers' cache folder (tq-eval's default model)
TEXT = "debian-handbook"  # a name of tq_transformers.evaluation.data.KNOWN_TEXTS
OURS = {  # name -> (method, settings): the default caches
    "turboquant-4": ("turboquant", {"bits": 4}),
    "kivi-2": ("kivi", {"bits": 2}),
    "bonsai-1": ("bonsai", {}),
}
PREFILL_CHUNK = 512  # prompt tokens per forward of the one-time prefill


def prefill_states(model, tokenizer, tokens: int, dtype: torch.dtype, out: Path):
    """(ids [1, tokens], [(keys, values)] per layer in the model's dtype) of the real text, saved in `out`."""
    path = out / f"prefill_{tokens}.pt"
    if path.exists():
        saved = torch.load(path)
        print(f"prefill: {tokens} tokens loaded from {path}")
        return saved["ids"], saved["kv"]
    text = load_text(TEXT)
    ids = tokenize_text(tokenizer, text, max_tokens=tokens)
    ids = ids.reshape(1, -1)
    model_dtype = model.dtype
    start = time.perf_counter()
    model.to(dtype)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for s in range(0, ids.shape[1], PREFILL_CHUNK):
            model(input_ids=ids[:, s: s + PREFILL_CHUNK], use_cache=True, **{CACHE_KWARG: cache})
            print(f"  prefill {min(s + PREFILL_CHUNK, ids.shape[1])}/{ids.shape[1]} tokens, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    model.to(model_dtype)
    kv = [(layer.keys.to(model_dtype).contiguous(), layer.values.to(model_dtype).contiguous())
          for layer in cache.layers]
    torch.save({"ids": ids, "kv": kv}, path)
    print(f"prefill: {ids.shape[1]} tokens in {dtype} in {time.perf_counter() - start:.0f} s, saved to {path}")
    return ids, kv


def tiled(ids, kv, context: int):
    """The context of `context` + 1 ids and the states of the first `context` (the prefill repeated)."""
    reps = -(-(context + 1) // ids.shape[1])
    ids = ids.repeat(1, reps)[:, : context + 1]
    kv = [(k.repeat(1, 1, reps, 1)[:, :, :context].contiguous(), v.repeat(1, 1, reps, 1)[:, :, :context].contiguous())
          for k, v in kv]
    return ids, kv


def filled_cache(model, name: str, ids, kv):
    """A fresh cache of configuration `name` holding the context's states (its first len(ids) - 1 tokens)."""
    if name == "dynamic":
        cache = DynamicCache(config=model.config)
    else:
        method, settings = OURS[name]
        cache = get_method(method)(model.config, **settings)
        cache.token_ids = ids[:, :-1]
    for i, (k, v) in enumerate(kv):
        cache.update(k.clone(), v.clone(), i)
    return cache


def run_generate(model, name: str, ids, kv, new_tokens: int, fast: bool) -> float:
    """Seconds of one generate call continuing the context with `new_tokens` new tokens."""
    if name != "dynamic":
        method, settings = OURS[name]
        tq_transformers.enable(model, method, fast=fast, **settings)
    try:
        cache = filled_cache(model, name, ids, kv)
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      do_sample=False)
        kwargs[CACHE_KWARG] = cache
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, **kwargs)
        seconds = time.perf_counter() - start
    finally:
        if name != "dynamic":
            tq_transformers.disable(model)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return seconds


PROFILED = {  # profiler label -> (owner, attribute) wrapped in a record_function while profiling
    "cpu_attention": ("tq_transformers.cpu_attention", "decode_attention"),
    "layer_update": ("tq_transformers.layer", "QuantizedKVLayer.update"),
    "dynamic_update": ("transformers.cache_utils", "DynamicLayer.update"),
}


def profile_call(model, name, ids, kv, new_tokens, fast) -> dict:
    """ms per call of one generate call in attention, cache updates and the rest (``--profile``)."""
    import importlib

    from torch.profiler import ProfilerActivity, profile, record_function

    originals = []
    for label, (module, attr) in PROFILED.items():
        owner = importlib.import_module(module)
        *path, last = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        fn = getattr(owner, last)

        def wrapped(*a, _fn=fn, _label=label, **kw):
            with record_function(_label):
                return _fn(*a, **kw)

        originals.append((owner, last, fn))
        setattr(owner, last, wrapped)
    try:
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_generate(model, name, ids, kv, new_tokens, fast)
        wall = time.perf_counter() - start
    finally:
        for owner, last, fn in originals:
            setattr(owner, last, fn)
    totals = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages()}
    attention = totals.get("cpu_attention", 0.0) + totals.get("aten::scaled_dot_product_attention", 0.0)
    update = totals.get("layer_update", 0.0) + totals.get("dynamic_update", 0.0)
    return {"wall_ms": 1e3 * wall, "attention_ms": attention, "cache_update_ms": update,
            "rest_ms": 1e3 * wall - attention - update}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/cpu_decode", help="folder of cpu_decode.json and the saved prefill")
    ap.add_argument("--model", default=None, help="model folder (default: the cached Qwen2.5-Coder-1.5B bf16)")
    ap.add_argument("--contexts", default="2048,8192", help="comma-separated context lengths")
    ap.add_argument("--lengths", default="2,10", help="short,long generated tokens")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the alternating timing (median reported)")
    ap.add_argument("--prefill-tokens", type=int, default=2048, help="real tokens prefilled (longer contexts tile)")
    ap.add_argument("--prefill-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--plain", action="store_true", help="also time the reference path (fast=False)")
    ap.add_argument("--profile", action="store_true", help="also profile one call of each configuration")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = ap.parse_args()
    try:
        short, long = (int(x) for x in args.lengths.split(","))
        contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        ap.error(f"--lengths must be two integers and --contexts integers, got {args.lengths!r}, {args.contexts!r}")
    if not 0 < short < long:
        ap.error(f"--lengths must be short,long with 0 < short < long, got {args.lengths!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or str(default_cache_dir() / MODEL_DIR)
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype="bfloat16")
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.generation_config.eos_token_id = None  # every call generates exactly its length
    ids0, kv0 = prefill_states(model, tokenizer, args.prefill_tokens, getattr(torch, args.prefill_dtype), out)
    names = ["dynamic", *OURS]
    configs = [(n, True) for n in names] + ([(n, False) for n in OURS] if args.plain else [])
    results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "load_avg_start": os.getloadavg(),
               "torch": torch.__version__, "transformers": __import__("transformers").__version__,
               "model": model_dir, "dtype": str(model.dtype), "lengths": [short, long], "rounds": args.rounds,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": []}
    print(f"torch threads {results['torch_threads']}, load average {results['load_avg_start']}")
    for ctx in contexts:
        ids, kv = tiled(ids0, kv0, ctx)
        label = {c: c[0] + ("" if c[1] else " (plain)") for c in configs}
        for c in configs:  # warm-up
            run_generate(model, c[0], ids, kv, short, c[1])
        times = {c: {"short": [], "long": []} for c in configs}
        for r in range(args.rounds):
            for c in configs:
                for key, n in (("short", short), ("long", long)):
                    times[c][key].append(run_generate(model, c[0], ids, kv, n, c[1]))
            print(f"  {ctx}: round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.1f}", flush=True)
        per_round = {c: [(b - a) / (long - short) for a, b in zip(times[c]["short"], times[c]["long"])]
                     for c in configs}
        base = per_round[("dynamic", True)]
        print(f"\ncontext {ctx}: ms per generated token (median of {args.rounds} rounds), x DynamicCache "
              "(median of the per-round ratios)")
        print("| cache | ms/token | x DynamicCache | per-round ms |")
        print("| --- | --- | --- | --- |")
        for c in configs:
            ratio = statistics.median(x / y for x, y in zip(per_round[c], base))
            row = {"name": label[c], "context": ctx, "ms_per_token": 1e3 * statistics.median(per_round[c]),
                   "x_dynamic": ratio, "per_round_ms": [1e3 * x for x in per_round[c]]}
            results["runs"].append(row)
            print(f"| {row['name']} | {row['ms_per_token']:.1f} | {ratio:.3f} | "
                  f"{', '.join(f'{x:.0f}' for x in row['per_round_ms'])} |")
        if args.profile:
            print(f"\ncontext {ctx}: one generate call of {long} tokens under torch.profiler, ms")
            print("| cache | wall | attention | cache updates | rest (model) |")
            print("| --- | --- | --- | --- | --- |")
            for c in configs:
                prof = profile_call(model, c[0], ids, kv, long, c[1])
                results["runs"].append({"name": label[c], "context": ctx, "profile": prof})
                print(f"| {label[c]} | {prof['wall_ms']:.0f} | {prof['attention_ms']:.0f} | "
                      f"{prof['cache_update_ms']:.0f} | {prof['rest_ms']:.0f} |")
        results["load_avg_end"] = os.getloadavg()
        with open(out / "cpu_decode.json", "w") as f:
            json.dump(results, f, indent=1)
    print(f"\nwritten to {out / 'cpu_decode.json'}")


if __name__ == "__main__":
    main()
