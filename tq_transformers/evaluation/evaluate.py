"""Run an evaluation config end to end: memory, attention fidelity, perplexity, needle retrieval, greedy agreement and
the RULER-style suite."""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .. import estimate_cache_bytes
from . import metrics
from .config import method_specs
from .data import load_text, tokenize_text
from .models import PYPI_MODELS, load_model_and_tokenizer
from .progress import Overall
from .ruler import SUITE_KEY, ruler_units, run_ruler
from .runner import (
    REFERENCE,
    MethodSpec,
    greedy_pass,
    greedy_units,
    quality_pass,
    quality_units,
    reference_label,
)

logger = logging.getLogger(__name__)

MIB = 2**20

#: Perplexity-change interval: paired moving-block bootstrap over scored tokens (see metrics).
BOOTSTRAP = {"resamples": 2000, "block": 8, "level": 0.95, "seed": 0}


def reference_bytes(config, seq_len: int, batch_size: int, dtype: torch.dtype) -> int:
    """Bytes of the full-precision cache (a DynamicCache in `dtype`), from the library's estimate."""
    try:
        return estimate_cache_bytes(config, seq_len, batch_size, method=REFERENCE, dtype=dtype)["total"]
    except ValueError:  # a library release that still names the baseline "fp16"
        return estimate_cache_bytes(config, seq_len, batch_size, method="fp16", dtype=dtype)["total"]


def setting_bytes(spec: MethodSpec, config, seq_len: int, batch_size: int, dtype: torch.dtype) -> int:
    """Bytes the cache of `spec` holds after `seq_len` tokens (analytic)."""
    if spec.method == REFERENCE:
        return reference_bytes(config, seq_len, batch_size, dtype)
    return estimate_cache_bytes(config, seq_len, batch_size, spec.method, dtype=dtype, **spec.kwargs)["total"]


def llama31_8b_config():
    """Llama-3.1-8B's published configuration (32 layers, 8 KV heads of 128), for memory projections; no hub
    needed."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )


def projection(spec: MethodSpec, seq_len: int, batch_size: int) -> dict[str, float]:
    """Projected Llama-3.1-8B cache at `seq_len` tokens, fp16 model: MiB, saving against the fp16 cache and bits a
    stored value (analytic, not measured)."""
    cfg = llama31_8b_config()
    total = setting_bytes(spec, cfg, seq_len, batch_size, torch.float16)
    fp16 = reference_bytes(cfg, seq_len, batch_size, torch.float16)
    values = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * seq_len * batch_size
    return {"mib": total / MIB, "saving_pct": 100.0 * (1 - total / fp16), "bits_per_value": 8.0 * total / values}


# ----------------------------------------------------------------------------------------------------------------
def _snap(ids: list[int], pos: int, tokenizer, window: int = 64) -> int:
    """Move `pos` forward to just after a token that ends a line or sentence (within `window` tokens)."""
    for i in range(pos, min(pos + window, len(ids))):
        text = tokenizer.decode([ids[i]])
        if text.endswith(("\n", ".", ". ")):
            return i + 1
    return pos


def needle_prompts(tokenizer, haystack: str, length: int, depths: list[float], ncfg: dict) -> torch.Tensor:
    """[len(depths), length] prompts: intro, real text with the needle at each depth, question, answer prefix."""
    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    intro = enc("Below is a long text. Somewhere in it a secret passcode is stated. Remember it.\n\n")
    needle = enc(" " + ncfg["needle"] + "\n")
    tail = enc(f"\n\nQuestion: {ncfg['question']}\nAnswer: {ncfg['answer_prefix']}")
    n_hay = length - len(intro) - len(needle) - len(tail)
    if n_hay < 16:
        raise ValueError(f"needle lengths must leave room for real text (> {length - n_hay + 16} tokens), got {length}")
    hay = tokenize_text(tokenizer, haystack, max_tokens=n_hay).tolist()
    rows = []
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"needle depths must be in [0, 1], got {depth!r}")
        pos = min(_snap(hay, round(depth * n_hay), tokenizer), n_hay)
        rows.append(intro + hay[:pos] + needle + hay[pos:] + tail)
    return torch.tensor(rows, dtype=torch.long)


def run_needle(model, tokenizer, specs, ncfg: dict, overall: Overall | None = None) -> dict[str, Any]:
    """Accuracy per length and depth of each setting; the generated answers are kept for inspection."""
    haystack = load_text(ncfg["haystack"])
    out = {s.name: {"found": {}, "answers": {}} for s in specs}
    for length in ncfg["lengths"]:
        prompts = needle_prompts(tokenizer, haystack, length, ncfg["depths"], ncfg)
        tokens = greedy_pass(model, prompts, specs, ncfg["max_new_tokens"],
                             desc=f"needle {length} tokens x {len(ncfg['depths'])} depths", overall=overall)
        for i, spec in enumerate(specs):
            for j, depth in enumerate(ncfg["depths"]):
                text = tokenizer.decode(tokens[i, j].tolist(), skip_special_tokens=True)
                key = f"{length}@{depth:g}"
                out[spec.name]["found"][key] = metrics.needle_found(text, ncfg["answer"])
                out[spec.name]["answers"][key] = text
    for res in out.values():
        res["accuracy"] = sum(res["found"].values()) / max(len(res["found"]), 1)
    return out


def run_agreement(model, tokenizer, specs, acfg: dict, overall: Overall | None = None) -> dict[str, Any]:
    """Greedy tokens identical to the reference before the first divergence, per prompt, and their mean."""
    n, length = acfg["num_prompts"], acfg["prompt_length"]
    ids = tokenize_text(tokenizer, load_text(acfg["data"]), max_tokens=2 * n * length)
    prompts = torch.stack([ids[2 * i * length:(2 * i + 1) * length] for i in range(n)])
    tokens = greedy_pass(model, prompts, specs, acfg["new_tokens"],
                         desc=f"greedy agreement {n} x {length} tokens", overall=overall)
    out = {}
    for i, spec in enumerate(specs):
        prefix = [metrics.common_prefix_length(tokens[i, j].tolist(), tokens[0, j].tolist()) for j in range(n)]
        out[spec.name] = {
            "prefix_tokens": prefix,
            "mean_prefix": sum(prefix) / n,
            "full_match": sum(p == acfg["new_tokens"] for p in prefix) / n,
        }
    return out


def run_perplexity(model, tokenizer, specs, pcfg: dict, overall: Overall | None = None) -> dict[str, Any]:
    ctx, cont, segs = pcfg["context_length"], pcfg["continuation_length"], pcfg["segments"]
    seg_len = ctx + cont + 1
    ids = tokenize_text(tokenizer, load_text(pcfg["data"]), max_tokens=segs * seg_len)
    if len(ids) < segs * seg_len:
        raise ValueError(f"perplexity data must hold {segs * seg_len} tokens, got {len(ids)} from {pcfg['data']!r}")
    segments = [ids[i * seg_len:(i + 1) * seg_len] for i in range(segs)]
    return quality_pass(model, segments, specs, ctx, pcfg["chunk_size"], overall=overall)


def work_plan(cfg: dict, n_specs: int) -> dict[str, int]:
    """Work of each enabled phase, in the units of `progress.Overall` (for the overall time estimate)."""
    plan = {}
    p, nd, a = cfg["perplexity"], cfg["needle"], cfg["agreement"]
    if p.get("enabled", True):
        plan["perplexity"] = quality_units(n_specs, p["segments"], p["context_length"], p["continuation_length"],
                                           p["chunk_size"])
    if nd.get("enabled", True):
        plan["needle"] = sum(greedy_units(n_specs, len(nd["depths"]), n, nd["max_new_tokens"]) for n in nd["lengths"])
    if a.get("enabled", True):
        plan["agreement"] = greedy_units(n_specs, a["num_prompts"], a["prompt_length"], a["new_tokens"])
    if cfg["ruler"].get("enabled", False):
        plan["ruler"] = ruler_units(cfg["ruler"], n_specs)
    return plan


def model_label(spec) -> str:
    """A short name of the evaluated model: the registry entry's name, else the folder, file or hub id."""
    spec = str(spec)
    if spec in PYPI_MODELS:
        return spec
    path = Path(spec).expanduser()
    return path.name if path.exists() else spec


# ----------------------------------------------------------------------------------------------------------------
def run_evaluation(cfg: dict, only: list[str] | None = None, partial_path: str | Path | None = None) -> dict[str, Any]:
    """Run every enabled part of `cfg`; returns the results dict (see `report` for the table and files).

    Args:
        cfg: a validated config (``config.load_config``).
        only: setting names to run (None: all).
        partial_path: if given, a JSON file rewritten with the results of every finished part, and within the RULER
            suite after every task and length, so that a run cut short (a time limit) keeps what it measured.
    """
    specs = method_specs(cfg, only)
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(cfg["model"], device=cfg["device"], dtype=cfg["dtype"])
    load_s = time.perf_counter() - start
    timings = {"load_model": load_s}
    results: dict[str, Any] = {
        "config": cfg,
        "model": {
            "spec": str(cfg["model"]),
            "name": model_label(cfg["model"]),
            "description": PYPI_MODELS[cfg["model"]].description if cfg["model"] in PYPI_MODELS else None,
            "dtype": str(model.dtype).removeprefix("torch."),
            "device": str(model.device),
        },
        "machine": {
            "platform": platform.platform(), "device": str(model.device), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() and model.device.type == "cuda" else None,
        },
        "model_config": {k: getattr(model.config, k, None) for k in (
            "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")},
        "methods": {s.name: {"method": s.method, "kwargs": s.kwargs,
                             "label": reference_label(model.dtype) if s.method == REFERENCE else s.name}
                    for s in specs},
    }
    import transformers

    results["machine"]["transformers"] = transformers.__version__
    pcfg = cfg["projection"]
    for spec in specs:
        results["methods"][spec.name]["projection"] = projection(spec, pcfg["seq_len"], pcfg["batch_size"])
    labels = ", ".join(m["label"] for m in results["methods"].values())
    logger.info("Settings, run side by side in one batch: %s", labels)
    plan = work_plan(cfg, len(specs))
    overall = Overall(plan)

    def save_partial(extra: dict | None = None) -> None:
        if partial_path is not None:
            Path(partial_path).parent.mkdir(parents=True, exist_ok=True)
            Path(partial_path).write_text(json.dumps({**results, "timings_s": timings, **(extra or {})}, default=str))

    # each part with the extra keyword arguments it takes (the RULER suite reports after every task)
    parts = [("perplexity", run_perplexity, {}), ("needle", run_needle, {}), ("agreement", run_agreement, {}),
             ("ruler", run_ruler, {"on_task": lambda part: save_partial({"ruler_partial": part})})]
    for key, fn, kwargs in parts:
        if key not in plan:
            continue
        t = time.perf_counter()
        part = fn(model, tokenizer, specs, cfg[key], overall=overall, **kwargs)
        timings[key] = time.perf_counter() - t
        if SUITE_KEY in part:  # what the RULER suite asked (prompt lengths, expected values)
            results["ruler"] = part.pop(SUITE_KEY)
        for name, value in part.items():
            results["methods"][name][key] = value
        save_partial()
    if "perplexity" in plan:
        ref = results["methods"][REFERENCE]["perplexity"]
        for spec in specs:
            res = results["methods"][spec.name]["perplexity"]
            res["perplexity_change_pct"] = metrics.relative_change(res["perplexity"], ref["perplexity"])
            if spec.method == REFERENCE:
                res["perplexity_change_ci_pct"] = None
                res["change_interval_includes_zero"] = None
            else:
                lo, hi = metrics.bootstrap_perplexity_change(res["token_nll"], ref["token_nll"], **BOOTSTRAP)
                res["perplexity_change_ci_pct"] = [lo, hi]
                res["change_interval_includes_zero"] = lo <= 0.0 <= hi
            if res["held_tokens"]:
                res["estimated_bytes"] = setting_bytes(spec, model.config, res["held_tokens"], 1, model.dtype)
        results["scored"] = {
            "context_length": cfg["perplexity"]["context_length"],
            "continuation_length": cfg["perplexity"]["continuation_length"],
            "segments": cfg["perplexity"]["segments"],
            "scored_tokens": ref["scored_tokens"],
            "held_tokens": ref["held_tokens"],
        }
    results["bootstrap"] = dict(BOOTSTRAP)
    timings["total"] = time.perf_counter() - start
    results["timings_s"] = timings
    return results
