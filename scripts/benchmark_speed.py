#!/usr/bin/env python
"""Decode and prefill speed, and GPU memory, on the Llama-3.1-8B config with random bf16 weights.

    python scripts/benchmark_speed.py --out results/speed            # full run (one H200: about 8 minutes)
    python scripts/benchmark_speed.py --quick --out /tmp/speed        # small contexts, 4 layers
    python scripts/benchmark_speed.py --kernels-only --out /tmp/speed # the per-layer kernel table alone

Caches: DynamicCache (bf16, SDPA), transformers' QuantizedCache (quanto backend, when optimum-quanto imports),
TurboQuant-4, KIVI-2 and Bonsai-1 on the reference path (dequantize + SDPA), on the fast path ("tq_fused") and on
the fast path with decode steps replayed from CUDA graphs (`tq_transformers.cuda_graphs`, "_graph"), also with the
decoder layers' norms and MLPs compiled inside the graph steps ("_graph_fused": ``cuda_graphs.install(model,
fuse=True)``, inductor; the compile runs in the warm-up pass and in each configuration's untimed first steps).

Method (the first configuration timed in a process runs slow: docs/RESULTS.md, "Speed (GPU)"): a whole prefill +
decode pass is run before anything is timed, and every configuration is timed twice in a row; the second timing is
reported.

- decode: the cache is filled with `context` tokens of random keys and values per layer (the contents do not
  change the speed; it avoids a prefill per configuration), then `--decode-steps` greedy steps of the full model
  are timed (ms per token). Peak memory is the peak allocated during fill + decode, and during decode alone,
  weights included.
- decode, in alternation (the headline context, 32K): every cache is filled, then `--rounds` rounds time
  `--decode-steps` steps of each cache in turn; the median per-round ratio to DynamicCache is reported. On a host
  whose speed drifts (eager decoding is host-bound: `scripts/profile_decode_step.py`), this is the like-for-like
  comparison; the isolated runs above give the peak memory.
- prefill: one forward over the whole prompt through each cache (logits of the last token only), seconds.
- kernel: one layer's decode attention alone (``scripts/tune_decode_kernels.py``'s table: flash SDPA on the bf16
  cache and each method's fused kernel on each GPU path, CUDA-graph replays, L2 flushed), with the bytes it must read
  (codes, metadata, window) over its time, against the copy bandwidth measured here (bytes read + written by a
  device-to-device copy); ``--kernels-only`` runs this table alone (no model).

Everything is printed as tables and written to `--out`/speed.json (rewritten after every measurement, so a run cut
short keeps what it measured). Work runs in priority order: kernels, decode at 32K, prefill, the other contexts.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tune_decode_kernels: the kernel table

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from tq_transformers import BonsaiCache, KIVICache, TurboQuantCache, cuda_graphs, fast_attention, projections  # noqa: E402
from tq_transformers.generation import CACHE_KWARG  # noqa: E402  (forward takes `cache` from transformers 5.24)

LLAMA31_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)

OURS = {
    "turboquant4": lambda cfg: TurboQuantCache(cfg, bits=4),
    "kivi2": lambda cfg: KIVICache(cfg, bits=2, group_size=32, residual_length=128),
    "bonsai1": lambda cfg: BonsaiCache(cfg),
}
#: the README's presets with exact sink tokens (issue 14), measured only when named in ``--caches`` (e.g.
#: ``tq_k4v2.875_s4_f64_graph_fused``): not in the default run
PRESETS = {
    "tq_k4v2.875_s4_f64": lambda cfg: TurboQuantCache(cfg, key_bits=4, value_bits=2.875, sink_tokens=4, flush_size=64),
    "tq_k2v1_s4": lambda cfg: TurboQuantCache(cfg, key_bits=2, value_bits=1, sink_tokens=4),
}


def quanto_available() -> str | None:
    """None when transformers' QuantizedCache (quanto backend) can run here, else why not."""
    try:
        from optimum.quanto import MaxOptimizer, qint4  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"optimum-quanto does not import: {exc!r}"
    return None


def cache_factories(include_hf: bool, only: list[str] | None = None):
    """name -> (cache factory, attention mode), in the order they are measured. Modes: "sdpa" (transformers' SDPA
    attention, PyTorch choosing the backend), "flash" (the same, SDPA held to its flash backend), "fast" (ours),
    "graph" (ours, decode steps replayed from CUDA graphs), "graph_fused" (the same, the norms and MLPs compiled in
    the graph steps and the attention's input projections as one grouped GEMM: ``fuse=True``), "graph_fused_cublas"
    (``fuse=True`` with cuBLAS for every projection: ``projections.ungroup``, for the comparison)."""
    out = {"dynamic": (lambda cfg: DynamicCache(config=cfg), "sdpa"),
           "dynamic_flash": (lambda cfg: DynamicCache(config=cfg), "flash")}
    ours = OURS if only is None else {**OURS, **PRESETS}  # the presets only when named
    modes = ("graph", "graph_fused", "graph_fused_cublas", "fast")
    for suffix, mode in (*((m, m) for m in modes), ("ref", "sdpa")):
        for name, make in ours.items():
            out[f"{name}_{suffix}"] = (make, mode)
    if include_hf:
        from transformers import QuantizedCache

        out["hf_quanto4"] = (lambda cfg: QuantizedCache(backend="quanto", config=cfg, nbits=4), "sdpa")
        out["hf_quanto2"] = (lambda cfg: QuantizedCache(backend="quanto", config=cfg, nbits=2), "sdpa")
    return {k: v for k, v in out.items() if only is None or k in only}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sync_time(fn, repeat: int = 1) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


def build_model(layers: int):
    cfg = LlamaConfig(**{**LLAMA31_8B, "num_hidden_layers": layers})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def use_path(model, cache, mode: str):
    """Switch `model` to the attention of `mode`; returns the context manager to run its steps in."""
    if mode in ("fast", "graph", "graph_fused", "graph_fused_cublas"):
        fast_attention.install(model)
        # stays installed: it runs only caches prepared with cuda_graphs=True; `fuse` is switched per configuration (a
        # cache's graphs keep the kind they were captured with while the runner's fuse is that kind)
        cuda_graphs.install(model, fuse=mode.startswith("graph_fused"))
        if mode == "graph_fused_cublas":
            projections.ungroup(model)
        fast_attention.prepare_cache(cache, cuda_graphs=mode != "fast")
    else:
        model.set_attn_implementation("sdpa")
    if mode == "flash":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    return contextlib.nullcontext()


def greedy_step(model, cache, tok: torch.Tensor) -> torch.Tensor:
    """One greedy decode step of `model` through `cache` from tokens `tok` [B, 1]; returns the next tokens. The
    arguments are generate's (position ids, return_dict), for every cache alike."""
    position_ids = torch.full_like(tok, cache.get_seq_length())
    out = model(input_ids=tok, position_ids=position_ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1,
                return_dict=True)
    return out.logits[:, -1:].argmax(-1)


def fill(cache, cfg, batch: int, context: int, device="cuda", dtype=torch.bfloat16):
    """Put `context` tokens of random keys and values into every layer of `cache`."""
    gen = torch.Generator(device=device).manual_seed(1)
    shape = (batch, cfg.num_key_value_heads, context, cfg.head_dim)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        v = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        cache.update(k, v, layer)
        del k, v


@torch.no_grad()
def decode_run(model, make, mode, batch, context, steps, warmup=2):
    cfg = model.config
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cache = make(cfg)
    backend = use_path(model, cache, mode)
    fill(cache, cfg, batch, context)
    peak_fill = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()  # decode-only peak from here
    tok = torch.randint(0, cfg.vocab_size, (batch, 1), device="cuda")

    def step():
        nonlocal tok
        tok = greedy_step(model, cache, tok)

    with backend:
        for _ in range(warmup):
            step()
        seconds = sync_time(step, steps)
    peak_decode = torch.cuda.max_memory_allocated()
    held = cache.memory_footprint()["total"] if hasattr(cache, "memory_footprint") else None
    if held is None and isinstance(cache, DynamicCache):
        held = sum(layer.keys.numel() * 2 * layer.keys.element_size() for layer in cache.layers)
    cache = None  # noqa: F841 - freed before the next configuration
    return {"ms_per_token": seconds * 1e3, "peak_gib": max(peak_fill, peak_decode) / 2**30,
            "peak_decode_gib": peak_decode / 2**30, "cache_mib": None if held is None else held / 2**20}


@torch.no_grad()
def prefill_run(model, make, mode, batch, context):
    cfg = model.config
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, cfg.vocab_size, (batch, context), device="cuda")
    cache = make(cfg)
    with use_path(model, cache, mode):
        seconds = sync_time(lambda: model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1))
    peak = torch.cuda.max_memory_allocated()
    cache = None  # noqa: F841 - freed before the next configuration
    return {"prefill_s": seconds, "peak_gib": peak / 2**30}


@torch.no_grad()
def decode_interleaved(model, factories, batch, context, steps, rounds):
    """Per-token decode time of several caches, measured in alternation: every cache is filled first, then each round
    times `steps` greedy steps of every cache in turn (the order rotating from round to round). A host whose speed
    drifts during the run (a shared VM: the same configuration measured 34 to 124 ms a token in different runs) then
    slows all caches of a round alike, and the per-round ratio to the first cache is what is reported (median over
    rounds), beside each cache's median ms per token. One warm-up round is not counted."""
    cfg = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    names = list(factories)
    state = {}
    for name in names:
        make, mode = factories[name]
        cache = make(cfg)
        use_path(model, cache, mode)  # installs the attention function / prepares the cache; switched per turn below
        fill(cache, cfg, batch, context, device, dtype)
        state[name] = [cache, torch.randint(0, cfg.vocab_size, (batch, 1), device=device)]

    def turn(name):
        cache, tok = state[name]
        backend = use_path(model, cache, factories[name][1])
        with backend:
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                tok = greedy_step(model, cache, tok)
            sync()
        state[name][1] = tok
        return (time.perf_counter() - start) / steps * 1e3

    times = {name: [] for name in names}
    for r in range(rounds + 1):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            ms = turn(name)
            if r > 0:
                times[name].append(ms)
    base = names[0]
    rows = []
    for name in names:
        ratios = [t / b for t, b in zip(times[name], times[base])]
        rows.append({"cache": name, "batch": batch, "context": context, "ms_median": statistics.median(times[name]),
                     "ms_rounds": times[name], f"ratio_vs_{base}": statistics.median(ratios)})
    state.clear()
    return rows


def twice(fn, *args):
    """Time a configuration twice and keep the second (the first timing of a process runs slow)."""
    fn(*args)
    return fn(*args)


# ----------------------------------------------------------------------------------------------------------------------
def copy_bandwidth() -> float:
    """Device-to-device copy of 4 GiB: bytes read + written per second."""
    src = torch.empty(2**31, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = min(sync_time(lambda: dst.copy_(src), 10) for _ in range(3))
    return 2 * 2**31 / seconds


@torch.no_grad()
def kernel_table(batch, context, copy_bw: float):
    """One layer's decode attention at batch x context: flash SDPA on the bf16 cache, and per method the fused
    kernel on each GPU path (``tune_decode_kernels.point``: CUDA-graph replays, L2 flushed, bytes of codes +
    metadata + window, % of the copy bandwidth, ratio to flash)."""
    import tune_decode_kernels

    return tune_decode_kernels.point(batch, context, check=False, sweep=False, copy_bw=copy_bw,
                                     methods=tune_decode_kernels.METHODS)


def profile_fused(batch, context):
    """torch.profiler's CUDA-kernel times of one fused decode attention call per method (split vs reduce vs glue)."""
    import tune_decode_kernels

    return tune_decode_kernels.profile(batch, context)


# ----------------------------------------------------------------------------------------------------------------------
def print_table(title, rows, cols):
    print(f"\n## {title}")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "results/speed"))
    ap.add_argument("--contexts", default="4096,16384,32768,65536,131072",
                    help="the longest that fits is measured; out-of-memory points are recorded as such")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting new measurements after this")
    ap.add_argument("--quick", action="store_true", help="4 layers, contexts 1K and 4K")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' QuantizedCache")
    ap.add_argument("--caches", default=None, help="comma-separated subset of the cache names (default: all)")
    ap.add_argument("--skip-kernels", action="store_true", help="no kernel table and no kernel profile")
    ap.add_argument("--kernels-only", action="store_true", help="the kernel table alone (no model; about a minute)")
    ap.add_argument("--kernel-points", default="1x4096,1x32768,8x32768,1x131072,8x131072",
                    help="batch x context points of the kernel table")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the interleaved timing at the headline context")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.contexts = 4, "1024,4096"
    t0 = time.time()
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    os.makedirs(args.out, exist_ok=True)
    hf_reason = "skipped (--no-hf)" if args.no_hf else quanto_available()
    results = {
        "card": torch.cuda.get_device_name(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "triton": __import__("triton").__version__,
        "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "layers": args.layers,
        "hf_quantized_cache": hf_reason or "quanto backend", "decode": [], "interleaved": [], "prefill": [],
        "kernel": [],
        "errors": [],
    }

    def save():
        with open(os.path.join(args.out, "speed.json"), "w") as f:
            json.dump(results, f, indent=1)

    def guarded(label, fn, *a):
        if time.time() - t0 > args.budget_s:
            results["errors"].append(f"{label}: not run (time budget)")
            return None
        try:
            return fn(*a)
        except torch.cuda.OutOfMemoryError:
            results["errors"].append(f"{label}: out of memory")
        except Exception as exc:  # noqa: BLE001 - record and go on with the other configurations
            results["errors"].append(f"{label}: {exc!r}")
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        return None

    results["copy_bandwidth_tbs"] = copy_bandwidth() / 1e12
    print(f"copy bandwidth {results['copy_bandwidth_tbs']:.2f} TB/s (read + write)")
    kernel_points = [tuple(map(int, p.split("x"))) for p in args.kernel_points.split(",")]
    if args.skip_kernels:
        kernel_points = []
    for b, c in kernel_points:
        rows = guarded(f"kernel b{b} c{c}", kernel_table, b, c, results["copy_bandwidth_tbs"] * 1e12)
        for r in rows or []:
            r["tbs"] = r["bytes"] / (r["us"] * 1e-6) / 1e12
            results["kernel"].append(r)
        save()
    print_table("kernel: one layer's decode attention (GPU time of CUDA-graph replays, L2 flushed)", results["kernel"],
                ["method", "impl", "batch", "context", "us", "bytes", "tbs", "of_copy", "vs_flash"])
    prof = guarded("profile", profile_fused, 8, 32768) if kernel_points else None
    if prof:
        print(prof)
        results["profile"] = prof
    if args.kernels_only:
        save()
        print(f"done in {time.time() - t0:.0f} s; wrote {os.path.join(args.out, 'speed.json')}")
        return

    model = build_model(args.layers)
    factories = cache_factories(hf_reason is None, args.caches.split(",") if args.caches else None)
    # a whole prefill + decode pass before anything is timed
    guarded("warmup", prefill_run, model, factories["dynamic"][0], "sdpa", 1, min(contexts))
    for name, (make, mode) in factories.items():
        guarded(f"warmup {name}", decode_run, model, make, mode, 1, min(contexts), 2, 1)

    order = [c for c in contexts if c == 32768] + [c for c in contexts if c != 32768]
    first = True
    for c in order:
        for b in sorted(batches, reverse=True):
            for name, (make, mode) in factories.items():
                if name.startswith("hf_") and c != 32768:
                    continue  # measured where the anchors are; it dequantizes the whole history every step
                r = guarded(f"decode {name} b{b} c{c}", twice, decode_run, model, make, mode, b, c,
                            args.decode_steps)
                if r:
                    results["decode"].append({"cache": name, "batch": b, "context": c, **r})
                    save()
        if first:  # the headline context: caches timed in alternation (the ratios the targets are judged on)
            timed = {n: f for n, f in factories.items() if not n.endswith("_ref")}  # ref: seconds a step at 32K
            for b in sorted(batches, reverse=True):
                rows = guarded(f"interleaved b{b} c{c}", decode_interleaved, model, timed, b, c, args.decode_steps,
                               args.rounds)
                results["interleaved"].extend(rows or [])
                save()
            print_table("decode, caches timed in alternation (median ms per token; median per-round ratio)",
                        results["interleaved"], ["cache", "batch", "context", "ms_median", "ratio_vs_dynamic"])
        if first:  # prefill right after the headline context
            for pc in [x for x in contexts if x <= 32768]:
                for name, (make, mode) in factories.items():
                    if name.startswith("hf_"):
                        continue
                    r = guarded(f"prefill {name} b1 c{pc}", twice, prefill_run, model, make, mode, 1, pc)
                    if r:
                        results["prefill"].append({"cache": name, "batch": 1, "context": pc, **r})
                        save()
            first = False
    print_table("decode (ms/token, peak GiB incl. weights over fill + decode and over decode only, cache MiB)",
                results["decode"], ["cache", "batch", "context", "ms_per_token", "peak_gib", "peak_decode_gib",
                                    "cache_mib"])
    print_table("prefill", results["prefill"], ["cache", "batch", "context", "prefill_s", "peak_gib"])
    for e in results["errors"]:
        print("error:", e)
    save()
    print(f"done in {time.time() - t0:.0f} s; wrote {os.path.join(args.out, 'speed.json')}")


if __name__ == "__main__":
    main()
