"""Attention fidelity of many cache settings from one model pass (a screening tool for quantizer variants).

tq-eval measures attention fidelity inside its perplexity pass, which runs every setting's cache through the model
side by side. Fidelity itself needs no model forward per setting: the reference run's post-RoPE queries, keys and
values are all it reads. This script runs the model once (the reference cache only), records every attention call of
the scored continuation, then replays the recorded calls into ``runner.FidelityProbe`` for each setting: the same
probe, prefill, chunks and numbers as ``tq-eval``'s "attn fidelity" column (the same config keys), in seconds a
setting. Perplexity, top-1 and KL still need tq-eval.

``--pre-rope a,b`` adds, for each named setting, a diagnostic setting "<name>-prerope": the same cache, receiving
keys with the rotary embedding undone (positions 0, 1, ... of the sequence) and returning keys with it applied again,
i.e. the cache quantizes pre-RoPE keys. transformers hands caches post-RoPE keys; this measures what quantizing before
RoPE would change without building it into a cache.

Run:
    python scripts/fidelity_sweep.py --config configs/kivi_fidelity_cpu.yaml --out results/kivi_fidelity.json
    (on a shared CPU, OMP_NUM_THREADS=1: two threads among other jobs' ran 7x slower here)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tq_transformers.evaluation.config import load_config, method_specs  # noqa: E402
from tq_transformers.evaluation.data import load_text, tokenize_text  # noqa: E402
from tq_transformers.evaluation.models import load_model_and_tokenizer  # noqa: E402
from tq_transformers.evaluation.runner import (  # noqa: E402
    FidelityProbe,
    build_caches,
    capture_attention,
    forward,
    replay_prefill,
)

#: the name suffix of a setting whose keys are quantized before RoPE (``--pre-rope``)
PRE_ROPE_SUFFIX = "-prerope"


class Recorder:
    """Stands in for a `FidelityProbe` under `capture_attention`: keeps each attention call's layer, scaling, the
    reference row's queries and its new keys and values (the last q_len positions)."""

    def __init__(self):
        self.calls: list[tuple[int, float | None, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def observe(self, module, query, key, value) -> None:
        n = query.shape[-2]
        self.calls.append((module.layer_idx, getattr(module, "scaling", None), query[:1].clone(),
                           key[:1, :, -n:].clone(), value[:1, :, -n:].clone()))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PreRopeShadow:
    """A cache wrapper: keys enter `inner` with RoPE undone and leave it with RoPE applied again (module docstring).

    Args:
        inner: the cache quantizing the keys.
        rotary: the model's rotary embedding module, ``rotary(x, position_ids) -> (cos, sin)`` ``[1, T, D]``.
    """

    def __init__(self, inner, rotary):
        self.inner, self.rotary = inner, rotary
        self.seen: dict[int, int] = {}

    def _cos_sin(self, start: int, n: int, like: torch.Tensor):
        pos = torch.arange(start, start + n, device=like.device)[None]
        cos, sin = self.rotary(like.float(), pos)
        return cos[:, None].float(), sin[:, None].float()  # [1, 1, n, D]

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int):
        start, n = self.seen.get(layer_idx, 0), keys.shape[-2]
        cos, sin = self._cos_sin(start, n, keys)
        k = keys.float()
        pre = (k * cos - _rotate_half(k) * sin).to(keys.dtype)  # the inverse rotation: angle -theta
        self.seen[layer_idx] = start + n
        ks, vs = self.inner.update(pre, values, layer_idx)
        cos, sin = self._cos_sin(0, ks.shape[-2], ks)
        k = ks.float()
        return (k * cos + _rotate_half(k) * sin).to(ks.dtype), vs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a tq-eval config (its methods and perplexity keys)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--methods", default=None, help="comma-separated setting names of the config (default: all)")
    parser.add_argument("--pre-rope", default=None,
                        help="comma-separated setting names of the config to add with pre-RoPE keys (a diagnostic)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    known = [m.get("name", m["method"]) for m in cfg["methods"]]
    for flag, value in (("--methods", args.methods), ("--pre-rope", args.pre_rope)):
        unknown = sorted(set(value.split(",")) - set(known)) if value else []
        if unknown:
            raise ValueError(f"{flag} must name settings of the config {known}, got unknown {unknown}")
    if args.methods:
        names = args.methods.split(",")
        cfg["methods"] = [m for m in cfg["methods"] if m["method"] == "full" or m.get("name", m["method"]) in names]
    pre_rope = set()
    for name in args.pre_rope.split(",") if args.pre_rope else []:
        entry = next(m for m in load_config(args.config)["methods"] if m.get("name", m["method"]) == name)
        entry["name"] = name + PRE_ROPE_SUFFIX
        cfg["methods"].append(entry)
        pre_rope.add(entry["name"])
    specs = method_specs(cfg)
    pcfg = cfg["perplexity"]
    if pcfg["segments"] != 1:
        raise ValueError(f"perplexity.segments must be 1 for this script, got {pcfg['segments']}")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(cfg["model"], device=cfg["device"], dtype=cfg["dtype"])
    ctx, cont, chunk = pcfg["context_length"], pcfg["continuation_length"], pcfg["chunk_size"]
    seg = tokenize_text(tokenizer, load_text(pcfg["data"]), max_tokens=ctx + cont + 1).to(model.device)
    caches, _, prefill = build_caches(model, specs[:1], seg[None, :ctx])
    recorder = Recorder()
    rest = seg[ctx:]
    with capture_attention(model, recorder):
        for start in range(0, len(rest) - 1, chunk):
            forward(model, rest[start:min(start + chunk, len(rest) - 1)][None], caches[0])
    t_model = time.perf_counter() - t0
    print(f"model pass: {t_model:.1f} s, {len(recorder.calls)} attention calls recorded", flush=True)

    results = {}
    rotary = model.model.rotary_emb
    for spec in specs[1:]:
        t1 = time.perf_counter()
        probe = FidelityProbe([spec], model.config, prefill)  # its shadow holds the prefill, as in tq-eval
        if spec.name in pre_rope:  # the diagnostic: the same cache behind the RoPE wrapper, filled the same way
            wrapped = PreRopeShadow(spec.make(model.config), rotary)
            replay_prefill(prefill, wrapped)
            probe.shadows[spec.name] = wrapped
        exact_k = {i: layer.keys[:1] for i, layer in enumerate(prefill.layers)}
        exact_v = {i: layer.values[:1] for i, layer in enumerate(prefill.layers)}
        probe.active = True
        with torch.no_grad():
            for layer_idx, scaling, q, k_new, v_new in recorder.calls:
                exact_k[layer_idx] = torch.cat([exact_k[layer_idx], k_new], dim=-2)
                exact_v[layer_idx] = torch.cat([exact_v[layer_idx], v_new], dim=-2)
                probe.observe(SimpleNamespace(layer_idx=layer_idx, scaling=scaling), q, exact_k[layer_idx],
                              exact_v[layer_idx])
        summary = probe.summary()[spec.name]
        results[spec.name] = {"kwargs": spec.kwargs, "pre_rope": spec.name in pre_rope, **summary}
        print(f"{spec.name:32s} fidelity {100 * summary['mean']:.2f}%  worst layer L{summary['worst_layer']} "
              f"{100 * summary['worst_layer_mean']:.2f}%  worst head {summary['worst_head']} "
              f"{100 * summary['worst_head_value']:.2f}%  ({time.perf_counter() - t1:.1f} s)", flush=True)
    out = {"config": args.config, "context_length": ctx, "continuation_length": cont, "chunk_size": chunk,
           "data": pcfg["data"], "model": cfg["model"], "dtype": cfg["dtype"], "model_pass_s": t_model,
           "settings": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
