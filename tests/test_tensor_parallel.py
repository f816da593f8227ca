"""Tensor parallelism with our caches (issue 13): transformers' ``tp_plan="auto"`` over two gloo processes on the CPU.

One ``torchrun`` launch per architecture runs ``scripts/tp_check.py`` (every variant below, greedy, on a tiny random
model saved to a temporary directory); the same script's ``run_variant`` then runs each variant in this process on the
unsharded model, and the tests compare: each rank's layers hold its shard of the KV heads, the ranks' footprints sum
to the single-process footprint, ``estimate_cache_bytes(tp_size=2)`` is each rank's footprint, greedy output equals
the single-process output, a rank's saved cache loads back on that rank (and a clear error without the model).

Why the quantized output is exact too: every method quantizes each KV head independently (per-head norms, scales,
rotations seeded per layer and shared by the heads), so a rank's codes are the single-process codes of its heads.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tq_transformers import estimate_cache_bytes, kv_heads_per_rank
from tq_transformers.memory import FULL

from cases import CASES, FAST, PLUMBING, build_tiny, one_thread

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
tp_check = pytest.importorskip("tp_check")

#: the marks of a test that launches torchrun (slow: ~70-100 s for the module on a shared 2-core machine)
TP_MARKS = (
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="torch.distributed with the gloo backend is not available"),
)


def tp_test(fn):
    """Decorator: ``TP_MARKS``."""
    for mark in TP_MARKS:
        fn = mark(fn)
    return fn

TP_SIZE = 2  # two CPU processes: the most the 2-core test machine runs side by side
#: how long one torchrun launch may take (it runs in ~30 s on an idle 2-core machine; the machine is shared)
LAUNCH_TIMEOUT_S = 600
#: |TP - single-process| logits of the full cache and the lossless windows: the all-reduce of the row-wise o_proj /
#: down_proj sums partial products in another order (seen: <= 2.2e-6 on logits of magnitude ~6 in float32)
FLOAT_NOISE_ATOL = 1e-5
#: the same for the quantized variants: the codes are bit-identical (but for a rare one the noise moves across a
#: rounding boundary, on some processors), but a float16 scale can round one ulp apart
#: (2^-10 relative) from noise in its K/V, which moves every value it scales, and later layers' K/V with it. Seen on
#: AMD EPYC (AVX2): 3.6e-5 for KIVI-2 on the tiny Qwen2, <= 3.1e-6 for the other variants; on Intel Xeon (AVX-512),
#: 6.9e-4 on logits and 1.8e-4 on a later layer's window keys for KIVI-4 on the tiny Llama (2026-12-02; was 1e-4)
TP_QUANTIZED_ATOL = 2e-3
#: relative tolerance of the quantized variants' float tensors (scales, norms, windows): two float16 ulps
TP_QUANTIZED_RTOL = 2 * torch.finfo(torch.float16).eps
#: the dtypes of packed codes in a saved cache (compared bit for bit)
CODE_DTYPES = (torch.uint8,)
ARCHS = ("llama", "qwen2")


def _variants(arch: str, config) -> list[dict]:
    """The variants of `arch` (``tp_check`` spec): the full baseline; each case quantizing (its small window) and at
    its defaults; the plumbing cases lossless; the fast-path cases on the fast path. Qwen2: the plumbing cases."""
    all_cases = list(CASES) if arch == "llama" else list(PLUMBING)
    out = [{"id": FULL, "method": FULL, "settings": {}}]
    for window, ids in (("small", all_cases), ("default", PLUMBING), ("lossless", PLUMBING)):
        out += [{"id": f"{i}/{window}", "method": CASES[i].method, "settings": CASES[i].kwargs(config, window)}
                for i in ids]
    if arch == "llama":
        out += [{"id": f"{i}/small/fast", "method": CASES[i].method, "settings": CASES[i].kwargs(config, "small"),
                 "fast": True} for i in FAST]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(model_dir: Path, spec: Path, out: Path) -> list[dict]:
    """``tp_check`` over `TP_SIZE` gloo processes; returns the ranks' reports."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={TP_SIZE}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(ROOT / "scripts" / "tp_check.py"), "--model", str(model_dir),
           "--spec", str(spec), "--out", str(out), "--keep-saved"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(TP_SIZE)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(arch)``: (the ranks' reports, {variant id: the single-process result}), computed once per arch."""
    done: dict = {}

    def get(arch: str, dirs: bool = False):
        """(ranks, single, config); with `dirs`: (the single-process directory, the ranks' directory)."""
        if arch not in done:
            root = tmp_path_factory.mktemp(f"tp_{arch}")
            build_tiny(arch).save_pretrained(root / "model")
            model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32).eval()
            variants = _variants(arch, model.config)
            (root / "spec.json").write_text(json.dumps(variants))
            ranks = _launch(root / "model", root / "spec.json", root / "out")
            ids = torch.randint(1, model.config.vocab_size, (1, tp_check.PROMPT_TOKENS),
                                generator=torch.Generator().manual_seed(tp_check.DEFAULT_SEED))
            single = {}
            for v in variants:
                if v.get("fast"):
                    previous = tp_check.fast_attention.install(model)
                single[v["id"]] = tp_check.run_variant(model, v, ids, tp_check.DEFAULT_NEW_TOKENS, root, 0,
                                                       keep_saved=True)
                if v.get("fast"):
                    tp_check.fast_attention.uninstall(model, previous)
            done[arch] = ranks, single, model.config
            done[arch, "dirs"] = root, root / "out"
        return done[arch, "dirs"] if dirs else done[arch]

    threads = one_thread()
    next(threads)
    yield get
    next(threads, None)


def _ids(arch: str, quantized_only: bool = False) -> list:
    config = build_tiny(arch).config
    return [pytest.param(arch, v["id"], id=f"{arch}-{v['id']}") for v in _variants(arch, config)
            if not (quantized_only and v["method"] == FULL)]


ALL = [p for arch in ARCHS for p in _ids(arch)]
QUANTIZED = [p for arch in ARCHS for p in _ids(arch, quantized_only=True)]


@tp_test
@pytest.mark.parametrize("arch", ARCHS)
def test_ranks_are_sharded_and_keep_the_config(runs, arch):
    ranks, _, config = runs(arch)
    assert [r["rank"] for r in ranks] == list(range(TP_SIZE))
    assert all(r["world_size"] == TP_SIZE and r["tp_size"] == TP_SIZE for r in ranks)
    # transformers leaves the config model-wide: anything sized from it must divide by tp_size itself
    assert all(r["config_kv_heads"] == config.num_key_value_heads for r in ranks)


@tp_test
@pytest.mark.parametrize(("arch", "variant"), ALL)
def test_each_rank_caches_its_share_of_the_kv_heads(runs, arch, variant):
    ranks, single, config = runs(arch)
    share = kv_heads_per_rank(config.num_key_value_heads, TP_SIZE)
    assert share < config.num_key_value_heads
    assert set(single[variant]["layer_heads"]) == {config.num_key_value_heads}
    for r in ranks:
        heads = r["variants"][variant]["layer_heads"]
        assert heads and set(heads) == {share}, (r["rank"], heads)


@tp_test
@pytest.mark.parametrize(("arch", "variant"), ALL)
def test_footprints_of_the_ranks_sum_to_the_single_process_one(runs, arch, variant):
    ranks, single, _ = runs(arch)
    per_rank = [r["variants"][variant]["footprint"] for r in ranks]
    assert per_rank[0] == per_rank[1]  # the same layout on every rank
    want = single[variant]["footprint"]
    assert {k: sum(f[k] for f in per_rank) for k in want} == want
    assert want["total"] > 0


@tp_test
@pytest.mark.parametrize(("arch", "variant"), ALL)
def test_estimate_per_rank_is_each_ranks_footprint(runs, arch, variant):
    ranks, single, _ = runs(arch)
    for r in ranks:
        got = r["variants"][variant]
        if "codes" in got["footprint"]:
            assert got["estimate"] == got["footprint"]
        else:  # the full baseline: the footprint is the K and V bytes
            assert got["estimate"]["total"] == got["footprint"]["total"]
    assert single[variant]["estimate"]["total"] == TP_SIZE * ranks[0]["variants"][variant]["estimate"]["total"]


@tp_test
@pytest.mark.parametrize(("arch", "variant"), ALL)
def test_greedy_output_equals_the_single_process_output(runs, arch, variant):
    ranks, single, _ = runs(arch)
    for r in ranks:
        assert r["variants"][variant]["sequences"] == single[variant]["sequences"], (r["rank"], variant)


@tp_test
@pytest.mark.parametrize(("arch", "variant"), QUANTIZED)
def test_a_ranks_saved_cache_loads_on_that_rank_and_names_tensor_parallelism_otherwise(runs, arch, variant):
    ranks, single, _ = runs(arch)
    assert single[variant]["load"] == {"with_model": True, "with_config_error": None}
    for r in ranks:
        load = r["variants"][variant]["load"]
        assert load["with_model"] is True
        assert "tensor-parallel ranks" in load["with_config_error"] and "kv_heads=1" in load["with_config_error"]


@tp_test
@pytest.mark.parametrize(("arch", "variant"), QUANTIZED)
def test_each_rank_holds_the_single_process_codes_of_its_heads(runs, arch, variant):
    ranks, _, config = runs(arch)
    single_dir, ranks_dir = runs(arch, dirs=True)
    share = kv_heads_per_rank(config.num_key_value_heads, TP_SIZE)
    name = variant.replace("/", "_")
    want = load_file(single_dir / f"rank0_{name}.safetensors")
    codes = 0
    for r in range(TP_SIZE):
        got = load_file(ranks_dir / f"rank{r}_{name}.safetensors")
        assert got.keys() == want.keys()
        for key, t in got.items():
            heads = want[key].narrow(1, r * share, share)  # every stored tensor is [B, H, ...]
            if t.dtype in CODE_DTYPES:  # the codes: bit for bit, but for a rare value that the noise moves
                flipped = (heads != t).sum().item()  # across a rounding boundary (KIVI-4 on Intel Xeon: 1 byte)
                assert flipped <= max(1, t.numel() // 1000), (r, key, flipped, t.numel())
                codes += t.numel()
            else:  # norms, scales, windows: the projections' float noise, through a float16 scale's ulp
                torch.testing.assert_close(t, heads, atol=TP_QUANTIZED_ATOL, rtol=TP_QUANTIZED_RTOL,
                                           msg=lambda m, r=r, key=key: f"rank {r}, {key}: {m}")
    if not variant.endswith("/lossless"):
        assert codes > 0, "the variant quantized nothing: the comparison would be empty"


@tp_test
@pytest.mark.parametrize(("arch", "variant"), ALL)
def test_logits_are_the_single_process_logits_within_float_noise(runs, arch, variant):
    ranks, single, _ = runs(arch)
    atol = FLOAT_NOISE_ATOL if variant == FULL or variant.endswith("/lossless") else TP_QUANTIZED_ATOL
    want = torch.tensor(single[variant]["scores"])
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["variants"][variant]["scores"]), want, atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Model-free: the per-rank projection's validation
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tp_size", [0, -1], ids=["zero", "negative"])
def test_tp_size_below_one_is_refused(tp_size):
    with pytest.raises(ValueError, match="tp_size must be a positive integer"):
        estimate_cache_bytes(build_tiny("llama").config, 64, tp_size=tp_size)


@pytest.mark.parametrize("tp_size", [2.0, True, "2"], ids=["float", "bool", "str"])
def test_tp_size_of_another_type_is_refused(tp_size):
    with pytest.raises(TypeError, match="tp_size must be a positive integer"):
        estimate_cache_bytes(build_tiny("llama").config, 64, tp_size=tp_size)


def test_tp_size_that_does_not_divide_the_kv_heads_is_refused():
    with pytest.raises(ValueError, match=r"tp_size must divide the model's 2 KV heads.*got tp_size=4"):
        estimate_cache_bytes(build_tiny("llama").config, 64, method="turboquant", tp_size=4)




#: the Llama-3.1-8B attention shape (8 KV heads of 128, 32 layers): the projections issue 13 measures on GPUs
LLAMA_8B_SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256)


@pytest.mark.parametrize("method", [FULL, "turboquant", "kivi", "bonsai"])
@pytest.mark.parametrize("tp_size", [2, 4, 8], ids=lambda n: f"tp{n}")
def test_estimate_per_rank_is_the_single_device_estimate_split_evenly(method, tp_size):
    from transformers import LlamaConfig

    config = LlamaConfig(**LLAMA_8B_SHAPE)
    whole = estimate_cache_bytes(config, 32768, batch_size=8, method=method, dtype=torch.bfloat16)
    rank = estimate_cache_bytes(config, 32768, batch_size=8, method=method, dtype=torch.bfloat16, tp_size=tp_size)
    assert {k: tp_size * v for k, v in rank.items()} == whole
    assert rank["total"] > 0
