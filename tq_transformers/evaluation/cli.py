"""`tq-eval`: the evaluation's command line (also `python scripts/evaluate.py`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from .config import apply_max_length, apply_quick, load_config, validate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tq-eval",
        description="Memory, attention fidelity, perplexity, needle retrieval and greedy agreement of quantized KV "
        "caches against the full-precision cache, on a real model and real text.",
    )
    p.add_argument("--config", default="default", help="YAML file or a name in configs/ (default: default)")
    p.add_argument("--model", help="registry name (qwen2.5-coder-1.5b), local folder / .gguf file, or HF model id")
    p.add_argument("--data", help="perplexity text: shared name (wikitext2-test), a text file, or hf:name[:config]:split")
    p.add_argument("--haystack", help="needle haystack text (same forms as --data)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (model and full-precision cache)")
    p.add_argument("--max-length", type=int, help="cap every sequence at this many tokens")
    p.add_argument("--methods", help="comma-separated setting names from the config (or method names); fp16 is "
                   "always run as the reference")
    p.add_argument("--quick", action="store_true", help="apply the config's quick overrides (small, minutes)")
    p.add_argument("--output-dir", help="results folder (default: results/<config name>)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config)
    for key in ("model", "device", "dtype"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)
    if args.data:
        cfg["perplexity"]["data"] = args.data
    if args.haystack:
        cfg["needle"]["haystack"] = args.haystack
    if args.quick:
        cfg = apply_quick(cfg)
    if args.max_length is not None:
        cfg = apply_max_length(cfg, args.max_length)
    return validate(cfg)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    cfg = build_config(args)
    from .evaluate import run_evaluation
    from .report import needle_table, table, write_outputs

    only = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    results = run_evaluation(cfg, only)
    out_dir = Path(args.output_dir or Path("results") / cfg["name"])
    paths = write_outputs(results, out_dir)
    print(table(results))
    print()
    print(needle_table(results))
    print()
    print("timings (s):", json.dumps({k: round(v, 1) for k, v in results["timings_s"].items()}))
    print("written:", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
