"""The grouped skinny GEMM (``kernels.linear_group``, ``kernels.triton_gemv``) and the projections it groups in graph
steps (``tq_transformers.projections``).

Tiers: the kernel against its reference (CUDA, or Triton's CPU interpreter: ``TRITON_INTERPRET=1``, as CI runs it);
the argument checks and the grouping logic, model-free or on tiny random models, on the CPU (where ``linear_group`` is
its reference, so grouped outputs equal the modules' own exactly)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from tq_transformers import cuda_graphs, fusion, kernels, projections
from tq_transformers.kernels import reference

from cases import build_tiny

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRETED else None)
needs_kernel = pytest.mark.skipif(KERNEL_DEVICE is None, reason="needs a CUDA GPU or TRITON_INTERPRET=1")
# bfloat16 has no numpy type: the interpreter runs float16 only
KERNEL_DTYPES = [torch.float16] if KERNEL_DEVICE != "cuda" else [torch.float16, torch.bfloat16]

# (id, rows of x, K, output widths of the members): Llama-3.1-8B's q / k / v at batch 1 and 8 (CUDA only, too slow
# interpreted), widths that are not a multiple of the column block, K not a multiple of the K tile, four members
SHAPES = {
    "one-row-three-members": (1, 256, (64, 32, 32)),
    "ragged-widths": (3, 256, (40, 24, 8)),
    "ragged-k": (5, 200, (48,)),
    "four-members-16-rows": (16, 128, (16, 32, 48, 64)),
    "llama8b-qkv-b1": (1, 4096, (4096, 1024, 1024)),
    "llama8b-qkv-b8": (8, 4096, (4096, 1024, 1024)),
}
LARGE = {"llama8b-qkv-b1", "llama8b-qkv-b8"}


def _reference_f32(x, weights, biases):
    bs = biases if biases is not None else [None] * len(weights)
    return [x.float() @ w.float().T + (0 if b is None else b.float()) for w, b in zip(weights, bs)]


@needs_kernel
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_linear_group_kernel_matches_float32_within_one_rounding(shape, dtype, bias):
    """The kernel's outputs against float32 math on the same 16-bit inputs: within one rounding of the output dtype
    (float32 accumulation, one cast), like cuBLAS's; the shapes and dtype of the reference."""
    if shape in LARGE and KERNEL_DEVICE != "cuda":
        pytest.skip("the 8B shapes take minutes under the interpreter")
    from tq_transformers.kernels import triton_gemv

    m, k, widths = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(dtype).to(KERNEL_DEVICE)
    weights = [(torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(KERNEL_DEVICE) for n in widths]
    biases = [torch.randn(n, generator=gen).to(dtype).to(KERNEL_DEVICE) for n in widths] if bias else None
    outs = triton_gemv.linear_group(x, weights, biases)
    refs = reference.linear_group(x, weights, biases)
    exact = _reference_f32(x, weights, biases)
    for out, ref, want in zip(outs, refs, exact):
        assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
        ulp = torch.finfo(dtype).eps * want.abs().clamp_min(1.0)
        assert ((out.float() - want).abs() <= ulp).all(), (out.float() - want).abs().max()


@needs_kernel
def test_linear_group_kernel_tuning_variants_agree():
    """Other column blocks, K tiles and pipeline depths (what the tuning script sweeps) give the same outputs as the
    default launch, within one rounding."""
    from tq_transformers.kernels import triton_gemv

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 512, generator=gen).half().to(KERNEL_DEVICE)
    weights = [(torch.randn(n, 512, generator=gen) / 16).half().to(KERNEL_DEVICE) for n in (96, 32)]
    base = triton_gemv.linear_group(x, weights)
    for tuning in ({"block_n": 16, "block_k": 128, "num_stages": 2}, {"block_n": 64, "block_k": 64, "num_warps": 8}):
        for a, b in zip(base, triton_gemv.linear_group(x, weights, tuning=tuning)):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("call, match", [
    (lambda x, w: reference.linear_group(x, []), "weights must hold 1 to 4 matrices, got 0"),
    (lambda x, w: reference.linear_group(x, [w] * 5), "weights must hold 1 to 4 matrices, got 5"),
    (lambda x, w: reference.linear_group(x.expand(17, 8), [w]), r"x must be \[M, K\] with 1 <= M <= 16"),
    (lambda x, w: reference.linear_group(x, [w[:, :4]]), r"weights\[0\] must be \[N, 8\]"),
    (lambda x, w: reference.linear_group(x, [w.double()]), r"weights\[0\] must be .* in torch.float32"),
    (lambda x, w: reference.linear_group(x, [w, w], [None, None]), "biases must be None or one tensor per weight"),
], ids=["no-weight", "five-weights", "17-rows", "wrong-k", "wrong-dtype", "none-bias"])
def test_linear_group_rejects_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(1, 8), torch.randn(4, 8))


def test_linear_group_on_the_cpu_is_its_reference():
    """Without a kernel for the input (the CPU, float32), ``kernels.linear_group`` is ``F.linear`` per weight,
    bit for bit."""
    x = torch.randn(2, 16)
    weights = [torch.randn(8, 16), torch.randn(4, 16)]
    biases = [torch.randn(8), torch.randn(4)]
    if not INTERPRETED:
        assert not kernels.linear_group_supported(x)
    for out, w, b in zip(kernels.linear_group(x, weights, biases), weights, biases):
        assert torch.equal(out, nn.functional.linear(x, w, b))


# ----------------------------------------------------------------------------------------------------------------------
# The grouping: learned from the first graph step's calls
# ----------------------------------------------------------------------------------------------------------------------
class _CountingGroups:
    """Stands in for ``kernels.linear_group``: the reference, counting the launches and their sizes."""

    def __init__(self):
        self.sizes = []

    def __call__(self, x, weights, biases=None):
        self.sizes.append(len(weights))
        return reference.linear_group(x, weights, biases)


def _attention_step(attention, x, y):
    """What a Llama-style attention does with its projections in one step: q, k, v of x, then o of y."""
    return [attention.q_proj(x), attention.k_proj(x), attention.v_proj(x), attention.o_proj(y)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"], ids=["llama-no-bias", "qwen2-qkv-bias"])
def test_projections_sharing_an_input_run_as_one_launch_from_the_second_graph_step(arch, monkeypatch):
    """First graph step: each projection alone (recorded); from the second: q, k, v in one launch (o alone), their
    outputs exactly the modules' own; a call on another input computes afresh; outside graph steps the class's forward
    runs (no launch of ours)."""
    counting = _CountingGroups()
    monkeypatch.setattr(kernels, "linear_group", counting)
    model = build_tiny(arch)
    assert projections.group(model) == 4 * model.config.num_hidden_layers
    attention = model.model.layers[0].self_attn
    hidden = model.config.hidden_size
    with torch.no_grad():
        x, y = torch.randn(2, 1, hidden), torch.randn(2, 1, attention.o_proj.in_features)
        want = [type(m).forward(m, v) for m, v in zip(
            (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj), (x, x, x, y))]
        assert all(torch.equal(a, b) for a, b in zip(_attention_step(attention, x, y), want))
        assert counting.sizes == []  # not in a graph step
        with fusion.graph_step("eager"):
            first = _attention_step(attention, x, y)
        assert counting.sizes == [1, 1, 1, 1]
        with fusion.graph_step("eager"):
            second = _attention_step(attention, x, y)
            assert counting.sizes[4:] == [3, 1]
            alone = attention.k_proj(torch.randn(2, 1, hidden))  # another input: no kept output fits
            assert counting.sizes[6:] == [3]
    for got in (first, second):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert alone.shape == want[1].shape
    names = projections.projection_groups(model)
    assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj"] in names and ["model.layers.0.self_attn.o_proj"] in names


def test_projections_of_different_inputs_or_dtypes_are_not_grouped(monkeypatch):
    """Calls on distinct (if equal) input tensors form no group, nor do weights of another dtype."""
    counting = _CountingGroups()
    monkeypatch.setattr(kernels, "linear_group", counting)
    model = build_tiny("llama")
    projections.group(model)
    attention = model.model.layers[0].self_attn
    x = torch.randn(1, 1, model.config.hidden_size)
    with torch.no_grad():
        for _ in range(2):
            with fusion.graph_step("eager"):
                attention.q_proj(x), attention.k_proj(x.clone()), attention.v_proj(x.clone())
    assert counting.sizes == [1] * 6
    projections.ungroup(model)
    attention.v_proj.half()
    projections.group(model)
    with torch.no_grad():
        for _ in range(2):
            with fusion.graph_step("eager"):
                attention.q_proj(x), attention.k_proj(x)
                attention.v_proj(x.half())
    assert counting.sizes[6:] == [1, 1, 1, 2, 1]


def test_group_is_instance_level_and_ungroup_restores_it():
    """group puts a forward on the projections' instances (nn.Linear untouched); a deep copy is grouped on its own
    modules and learns again; ungroup restores the modules' dicts exactly; cuda_graphs.install groups (with or
    without fuse) and uninstall ungroups."""
    model = build_tiny("llama")
    before = {name: dict(vars(m)) for name, m in model.named_modules()}
    class_forward = nn.Linear.forward
    projections.group(model)
    assert nn.Linear.forward is class_forward
    copied = copy.deepcopy(model)
    q, q2 = model.model.layers[0].self_attn.q_proj, copied.model.layers[0].self_attn.q_proj
    assert vars(q)["forward"].__self__ is q and vars(q2)["forward"].__self__ is q2
    siblings = vars(q2)[projections._SIBLINGS]
    assert siblings is not vars(q)[projections._SIBLINGS] and siblings.members[0] is q2 and siblings.groups is None
    projections.ungroup(model)
    after = {name: dict(vars(m)) for name, m in model.named_modules()}
    assert before.keys() == after.keys() and all(before[n].keys() == after[n].keys() for n in before)
    for fuse in (False, "eager"):  # the graph runner groups them, fused or not, and uninstall ungroups them
        cuda_graphs.install(model, fuse=fuse)
        assert all("forward" in vars(m) for m in (q, model.model.layers[1].self_attn.o_proj))
        cuda_graphs.uninstall(model)
        assert "forward" not in vars(q) and projections._SIBLINGS not in vars(q)


def test_a_projection_with_a_strided_weight_runs_its_own_forward(monkeypatch):
    """A weight that is not contiguous along K (a transposed view) is not handed to the kernel: the class's forward
    runs, in graph steps too, with its own result."""
    counting = _CountingGroups()
    monkeypatch.setattr(kernels, "linear_group", counting)
    model = build_tiny("llama")
    attention = model.model.layers[0].self_attn
    weight = attention.k_proj.weight
    attention.k_proj.weight = nn.Parameter(weight.detach().t().contiguous().t())  # same values, strides (1, out)
    assert attention.k_proj.weight.stride(-1) != 1
    projections.group(model)
    x = torch.randn(1, 1, model.config.hidden_size)
    with torch.no_grad(), fusion.graph_step(None):
        got = attention.k_proj(x)
    assert counting.sizes == [] and torch.equal(got, nn.functional.linear(x, attention.k_proj.weight))
    torch.testing.assert_close(got, nn.functional.linear(x, weight))
