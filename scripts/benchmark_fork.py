"""Prefix reuse and persistence at Llama-3.1-8B's KV shape (32 layers, 8 KV heads, head_dim 128, bf16).

Mode ``fork`` (no model: random keys and values through the cache): N forks of a `--tokens` prefix, by
``cache.fork()`` and by ``copy.deepcopy``, against N full copies (every tensor copied: what ``copy.deepcopy`` did
before forks shared the history); time to make them, and the memory the group holds (``fork.distinct_bytes``: each
tensor counted once) right after forking and after each copy appends `--new-tokens` more tokens (flushes included;
the storage as the reference path leaves it: on the fused-kernel path a decoding fork holds a copy of its own history
from its first flush on, see ``tq_transformers.fork``).

Mode ``persist``: a random-weight Llama-3.1-8B-shaped model prefills `--tokens` random ids through the cache (timed,
the re-prefill a saved cache saves), the cache is saved (time, file bytes against ``memory_footprint``) and loaded
onto the device (time; the file is then in the page cache), and the loaded cache's next greedy tokens are checked
against the original's. A short prefill runs first, untimed (CUDA and the Triton kernels set up).

    python scripts/benchmark_fork.py --mode fork --tokens 8192 --out results/fork_cpu                  # CPU
    python scripts/benchmark_fork.py --mode fork --tokens 32768 --device cuda --out results/fork_gpu   # GPU
    python scripts/benchmark_fork.py --mode persist --tokens 32768 --device cuda --out results/persist_gpu
    python scripts/benchmark_fork.py --mode persist --tokens 1024 --layers 2 --vocab 4096 --out results/persist_cpu

Prints a table and writes ``<out>/fork.json`` or ``<out>/persist.json``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_speed import LLAMA31_8B, fill, sync, sync_time  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tq_transformers import estimate_cache_bytes, fast_attention, make_cache  # noqa: E402
from tq_transformers.fork import distinct_bytes  # noqa: E402
from tq_transformers.generation import CACHE_KWARG  # noqa: E402
from tq_transformers.memory import MIB  # noqa: E402

METHODS = {"turboquant4": ("turboquant", {"bits": 4}), "kivi2": ("kivi", {"bits": 2}), "bonsai1": ("bonsai", {})}
WARMUP_TOKENS = 1024
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def llama_config(layers: int, vocab: int | None = None) -> LlamaConfig:
    cfg = LlamaConfig(**{**LLAMA31_8B, "num_hidden_layers": layers, **({"vocab_size": vocab} if vocab else {})})
    cfg._attn_implementation = "sdpa"
    return cfg


def full_copy(cache):
    """A copy that shares nothing: what ``copy.deepcopy`` made before forks shared the history."""
    out = copy.deepcopy(cache)
    for layer in out.quantized_layers:
        layer.storage = {name: t.clone() for name, t in layer.full_storage().items()}
        layer.shared = []
    return out


def _window_only(layer, window_k, window_v):
    return window_k, window_v


def decode(cache, cfg, tokens: int, device, dtype, seed: int) -> None:
    """`tokens` single-token updates of random keys and values in every layer (the window flushes as in decoding).
    What each update returns is left out (a hook returns the window alone instead of dequantizing the whole history
    for an attention that does not run here): the storage ends exactly as on the reference path."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (1, cfg.num_key_value_heads, 1, cfg.head_dim)
    layers = cache.quantized_layers
    hooks = [layer.fast_path for layer in layers]
    for layer in layers:
        layer.fast_path = _window_only
    for _ in range(tokens):
        for layer in range(cfg.num_hidden_layers):
            cache.update(torch.randn(shape, generator=gen, device=device, dtype=dtype),
                         torch.randn(shape, generator=gen, device=device, dtype=dtype), layer)
    for layer, hook in zip(layers, hooks):
        layer.fast_path = hook


def run_fork(args, device, dtype) -> dict:
    cfg = llama_config(args.layers)
    method, settings = METHODS[args.method]
    prefix = make_cache(method, cfg, **settings)
    fill(prefix, cfg, 1, args.tokens, device=device, dtype=dtype)
    footprint = prefix.memory_footprint()
    out = {"method": args.method, "tokens": args.tokens, "layers": args.layers, "forks": args.forks,
           "new_tokens": args.new_tokens, "device": str(device), "dtype": str(dtype),
           "prefix_bytes": footprint["total"], "prefix_window_bytes": footprint["window"], "ways": {}}
    for way, make in (("full_copy", full_copy), ("deepcopy", copy.deepcopy), ("fork", lambda c: c.fork())):
        gc.collect()
        sync()
        start = time.perf_counter()
        copies = [make(prefix) for _ in range(args.forks)]
        sync()
        seconds = time.perf_counter() - start
        held = distinct_bytes(prefix, *copies)
        for i, c in enumerate(copies):
            decode(c, cfg, args.new_tokens, device, dtype, seed=10 + i)
        after = distinct_bytes(prefix, *copies)
        split = copies[0].memory_sharing()
        out["ways"][way] = {"seconds": seconds, "ms_each": 1e3 * seconds / args.forks,
                            "group_bytes_after_forking": held, "group_bytes_after_decoding": after,
                            "added_bytes_after_forking": held - footprint["total"],
                            "one_copy_after_decoding": split}
        del copies
    full = estimate_cache_bytes(cfg, 32768, method=method, dtype=dtype, **settings)
    out["estimate_32k"] = {"one_cache": full["total"], "window": full["window"],
                           "forks_shared": full["total"] + args.forks * full["window"],
                           "full_copies": (1 + args.forks) * full["total"]}
    return out


@torch.no_grad()
def run_persist(args, device, dtype) -> dict:
    cfg = llama_config(args.layers, args.vocab)
    method, settings = METHODS[args.method]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(1)).to(device)
    fast = device.type == "cuda"  # the Triton compress kernels for the prefill, the fused decode for the check
    if fast:
        fast_attention.install(model)
    warm = make_cache(method, cfg, **settings)  # a short prefill first: CUDA and Triton set up outside the timing
    model(ids[:, : min(args.tokens, WARMUP_TOKENS)], **{CACHE_KWARG: fast_attention.prepare_cache(warm) if fast
                                                         else warm, "use_cache": True, "logits_to_keep": 1})
    del warm
    cache = make_cache(method, cfg, **settings)
    if fast:
        fast_attention.prepare_cache(cache)
    kwargs = {CACHE_KWARG: cache, "use_cache": True, "logits_to_keep": 1}
    prefill_s = sync_time(lambda: model(ids, **kwargs))
    cache.token_ids = ids
    folder = args.save_dir or tempfile.mkdtemp()
    path = os.path.join(folder, "cache.tqkv")
    save_s = sync_time(lambda: cache.save(path))
    holder = []
    load_s = sync_time(lambda: holder.append(type(cache).load(path, model, device=device)))
    loaded = holder[0]
    if fast:
        fast_attention.prepare_cache(loaded)
    size = os.path.getsize(path)

    def steps(c, n=4):
        """`n` greedy tokens through `c`, from the same first token for both caches."""
        tok, got = ids[:, :1], []
        for _ in range(n):
            out = model(tok, **{CACHE_KWARG: c, "use_cache": True})
            tok = out.logits[:, -1:].argmax(-1)
            got.append(int(tok))
        return got

    footprint = cache.memory_footprint()["total"]
    same = steps(loaded) == steps(cache)
    if not args.save_dir:
        os.remove(path)
    return {"method": args.method, "tokens": args.tokens, "layers": args.layers, "vocab": cfg.vocab_size,
            "device": str(device), "dtype": str(dtype), "prefill_s": prefill_s, "save_s": save_s, "load_s": load_s,
            "file_bytes": size, "footprint_bytes": footprint, "header_and_token_ids_bytes": size - footprint,
            "fp16_kv_bytes": estimate_cache_bytes(cfg, args.tokens, dtype=dtype)["total"],
            "continuation_matches": same}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("fork", "persist"), default="fork")
    ap.add_argument("--method", choices=tuple(METHODS), default="turboquant4")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=LLAMA31_8B["num_hidden_layers"])
    ap.add_argument("--forks", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=130, help="tokens each fork decodes after forking (fork mode)")
    ap.add_argument("--vocab", type=int, default=None, help="a smaller vocabulary for a CPU run (persist mode)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    ap.add_argument("--save-dir", default=None, help="keep the saved cache there (persist mode; default: a temp dir)")
    ap.add_argument("--out", default=os.environ.get("OUT", "results/fork"))
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    os.makedirs(args.out, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result = run_fork(args, device, dtype) if args.mode == "fork" else run_persist(args, device, dtype)
    result["date"] = started
    result["machine"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{os.cpu_count()}"
    with open(os.path.join(args.out, f"{args.mode}.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "ways"}, indent=2))
    for way, row in result.get("ways", {}).items():
        print(f"{way:>10}: {row['ms_each']:9.2f} ms a copy | group after forking "
              f"{row['group_bytes_after_forking'] / MIB:9.1f} MiB (+{row['added_bytes_after_forking'] / MIB:8.1f}) | "
              f"after {args.new_tokens} tokens each {row['group_bytes_after_decoding'] / MIB:9.1f} MiB | one copy "
              f"own {row['one_copy_after_decoding']['own'] / MIB:7.1f} MiB, shared "
              f"{row['one_copy_after_decoding']['shared'] / MIB:7.1f} MiB")


if __name__ == "__main__":
    main()
