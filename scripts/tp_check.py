"""Tensor parallelism with our caches: greedy generation per rank, under ``torchrun`` (issue 13).

Each rank loads `--model` with transformers' tensor parallelism (``tp_plan="auto"``: q/k/v projections column-wise,
so a rank's attention hands its cache ``num_key_value_heads / tp_size`` heads) and, for each variant of `--spec`
(a JSON list of ``{"id", "method", "settings", "fast"}``: ``method`` "full" for a DynamicCache), generates greedily
from the same random prompt, then writes ``rank{r}.json`` under `--out`::

    {"rank", "world_size", "tp_size", "config_kv_heads",
     "variants": {id: {"sequences" [B][T] ints, "scores" [steps][B][vocab] the logits of each greedy step,
                       "footprint" memory_footprint(), "estimate" estimate_cache_bytes
                       per rank, "layer_heads" [heads of each quantized layer], "load" {"with_model": bool equal after
                       a save and load on this rank, "with_config_error": the ValueError of a load given only the
                       config, or None}}}}

CPU (two gloo processes)::

    torchrun --nproc_per_node 2 scripts/tp_check.py --model DIR --spec SPEC.json --out OUT

GPU (NCCL; keep the device notes' NCCL_NVLS_ENABLE=0): the same with ``--device cuda``. Without `--spec`, the
variants are ``DEFAULT_SPEC``. Without torchrun the script runs once, unsharded (``rank0.json``: the reference);
``--compare TP_OUT SINGLE_OUT`` then prints, per variant, whether the greedy tokens are equal, the largest logit
difference, and whether the ranks' footprints sum to the single-process one.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, DynamicCache

from tq_transformers import estimate_cache_bytes, fast_attention, get_method
from tq_transformers.cache import QuantizedKVCache
from tq_transformers.generation import CACHE_KWARG
from tq_transformers.memory import FULL

#: prompt of the check: past every method's default window (128 + a 128-token flush), so the defaults quantize too
PROMPT_TOKENS = 300
DEFAULT_NEW_TOKENS = 12  # greedy steps: enough to cross a 16-token flush while decoding
DEFAULT_SEED = 1
_LOSSLESS = {"residual_length": 10**9}  # a window longer than any sequence (a multiple of every group size)
#: the variants without --spec: the full cache, each method at its defaults (reference and fast path) and lossless
DEFAULT_SPEC = [
    {"id": "full", "method": FULL, "settings": {}},
    *({"id": f"{m}/default{'/fast' if fast else ''}", "method": m, "settings": s, "fast": fast}
      for m, s in (("turboquant", {"bits": 4}), ("kivi", {"bits": 2}), ("bonsai", {})) for fast in (False, True)),
    *({"id": f"{m}/lossless", "method": m, "settings": {**s, **_LOSSLESS}}
      for m, s in (("turboquant", {"bits": 4}), ("kivi", {"bits": 2}), ("bonsai", {}))),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved model directory (save_pretrained)")
    parser.add_argument("--spec", help="JSON file: the variants (module docstring; default DEFAULT_SPEC)")
    parser.add_argument("--out", help="directory for rank{r}.json")
    parser.add_argument("--compare", nargs=2, metavar=("TP_OUT", "SINGLE_OUT"), help="compare two runs' --out")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--keep-saved", action="store_true", help="keep each rank's saved caches under --out")
    return parser.parse_args(argv)


def load_tp_model(path: str, dtype: torch.dtype, device: str = "cpu"):
    """The model of `path`, sharded over the torchrun ranks (``tp_plan="auto"``: deprecated in favour of a
    DistributedConfig from transformers 5.18 on, the one spelling 5.17 and 5.24 both accept); unsharded on `device`
    outside torchrun."""
    if "RANK" not in os.environ:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tp_plan.*", category=FutureWarning)
        return AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=dtype).eval()


def run_variant(model, variant: dict, ids: torch.Tensor, new_tokens: int, out_dir: Path, rank: int,
                keep_saved: bool = False) -> dict:
    """Greedy generation of one variant on this rank (module docstring: the fields returned); the saved cache stays
    in `out_dir` (``rank{rank}_{id with "/" as "_"}.safetensors``) with `keep_saved`."""
    method, settings = variant["method"], variant["settings"]
    cache = DynamicCache(config=model.config) if method == FULL else get_method(method)(model.config, **settings)
    if variant.get("fast"):
        fast_attention.prepare_cache(cache)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, **{CACHE_KWARG: cache})
    seq = out.sequences
    tp = getattr(model, "tp_size", None) or 1  # a public property of PreTrainedModel (None without TP)
    result = {"sequences": seq.tolist(), "scores": torch.stack(out.scores).float().tolist(), "layer_heads": [],
              "load": None,
              "estimate": estimate_cache_bytes(model.config, cache.get_seq_length(), ids.shape[0], method=method,
                                               dtype=model.dtype, tp_size=tp, **settings)}
    if isinstance(cache, QuantizedKVCache):
        result["footprint"] = cache.memory_footprint()
        result["layer_heads"] = [layer.keys.shape[1] for layer in cache.quantized_layers]
        path = out_dir / f"rank{rank}_{variant['id'].replace('/', '_')}.safetensors"
        cache.save(path)
        loaded = QuantizedKVCache.load(path, model, device=ids.device)
        try:
            QuantizedKVCache.load(path, model.config, device=ids.device)
            error = None
        except ValueError as err:
            error = str(err)
        result["load"] = {"with_model": loaded.memory_footprint() == result["footprint"],
                          "with_config_error": error}
        if not keep_saved:
            path.unlink()
    else:
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        result["footprint"] = {"total": held}
        result["layer_heads"] = [layer.keys.shape[1] for layer in cache.layers]
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.compare:
        compare(*args.compare)
        return
    if not (args.model and args.out):
        raise SystemExit("--model and --out are needed (or --compare TP_OUT SINGLE_OUT)")
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    model = load_tp_model(args.model, dtype, args.device)
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else "cpu"
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (args.batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(args.seed))
    ids = ids.to(device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast_installed = False
    report = {"rank": rank, "world_size": world, "tp_size": getattr(model, "tp_size", None),
              "config_kv_heads": model.config.num_key_value_heads, "variants": {}}
    for variant in json.loads(Path(args.spec).read_text()) if args.spec else DEFAULT_SPEC:
        if variant.get("fast") and not fast_installed:
            previous = fast_attention.install(model)
            fast_installed = True
        elif not variant.get("fast") and fast_installed:
            fast_attention.uninstall(model, previous)
            fast_installed = False
        report["variants"][variant["id"]] = run_variant(model, variant, ids, args.new_tokens, out_dir, rank,
                                                         args.keep_saved)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def compare(tp_out: str, single_out: str) -> None:
    """Print, per variant, the TP run (`tp_out`) against the unsharded one (`single_out`): equal greedy tokens, the
    largest |logit difference| over the ranks, and whether the ranks' footprint totals sum to the single one."""
    single = json.loads((Path(single_out) / "rank0.json").read_text())["variants"]
    ranks = [json.loads(p.read_text())["variants"] for p in sorted(Path(tp_out).glob("rank*.json"))]
    for vid, want in single.items():
        ref = torch.tensor(want["scores"])
        diff = max(float((torch.tensor(r[vid]["scores"]) - ref).abs().max()) for r in ranks)
        tokens = all(r[vid]["sequences"] == want["sequences"] for r in ranks)
        summed = sum(r[vid]["footprint"]["total"] for r in ranks) == want["footprint"]["total"]
        print(f"{vid:32s} ranks={len(ranks)} tokens_equal={tokens} max_logit_diff={diff:.3g} "
              f"footprint_sums={summed} per_rank_total={ranks[0][vid]['footprint']['total']}")


if __name__ == "__main__":
    main()
