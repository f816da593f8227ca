"""The attention's input projections of a decode step in one kernel launch, inside CUDA-graph steps only (put on by
``cuda_graphs.install``, with or without ``fuse``).

Why: in a graph-replayed decode step of Llama-3.1-8B, cuBLAS runs each of q_proj, k_proj, v_proj and o_proj as its
own GEMV, the 8 MiB k / v weights at 38% of the copy bandwidth and the 32 MiB q / o weights at 69%, with a split-K
reduce kernel after most of them (H200, docs/RESULTS.md "Where a graph-replayed decode step's GPU time goes"; session
15's profile). ``kernels.linear_group`` computes several ``x @ W_i.T`` of one input in one launch, without a split-K
reduce (``kernels.triton_gemv``).

Which modules (generic: no names): the direct children of exact type ``nn.Linear`` of each attention module (a module
with a ``layer_idx``) in the decoder layers (``fusion.decoder_layers``), with no instance-level forward of someone
else. Which of them form a group is learned, not assumed: in the first graph step the calls of each attention
module's projections are recorded, and those called one after another on the same input tensor (``is``, not equal)
form a group (q_proj, k_proj, v_proj of Llama; o_proj, called on the attention output, stays alone). From the next
graph step on, the first member called computes the whole group and keeps the others' outputs for their own calls on
that same input (a weak reference to it: any other input computes afresh). A projection alone runs through the same
kernel (``SINGLES``).

When: only inside ``fusion.graph_step`` (the graph runner's eager warm-up steps and its captures, fused or not; a
replay runs no Python), on inputs of at most 16 rows (a decode step's tokens) in the weight's dtype and device, with
weights of unit stride along K. The kernel runs where ``kernels.linear_group_supported`` (16-bit CUDA tensors);
elsewhere, e.g. on the CPU or in float32, ``linear_group`` is ``F.linear`` per weight: the modules' own result,
through the same grouping. Prefill, the runner's ordinary fallback forward, autocast, and a trace by someone's
``torch.compile`` run the class's forward. The first graph step compiles the kernel (one member at a time); the
groups of the later ones launch the same compiled kernel, so nothing compiles inside a capture.
"""

from __future__ import annotations

import copy
import types
import weakref

import torch
from torch import nn

from . import fusion, kernels
from .kernels.reference import GEMV_MAX_ROWS

__all__ = ["SINGLES", "group", "grouped_projections", "projection_groups", "ungroup"]

#: whether a projection that forms no group (o_proj) also runs through the grouped kernel in graph steps
SINGLES = True

_MARK = "_tq_grouped_projection"  # attribute of our instance-level forward functions
_SIBLINGS = "_tq_projection_siblings"  # attribute of a grouped nn.Linear: the _Siblings of its attention module


class _Siblings:
    """The grouped projections of one attention module: what the first graph step learned, and one group's outputs
    kept for the members not yet called."""

    def __init__(self, members: list[nn.Linear]):
        self.members = members
        self.log: list = []  # (module, input) of the first graph step's calls, while learning
        self.groups: dict | None = None  # module -> its group (a tuple in call order); None while learning
        self.kept_input = None  # weak reference to the input of the kept outputs
        self.kept: dict = {}  # module -> its output for kept_input

    def __deepcopy__(self, memo):
        """A deep copy of the model learns again, on its own modules."""
        return _Siblings(copy.deepcopy(self.members, memo))

    def learn(self) -> dict:
        """module -> its group: the runs of consecutive calls on one input tensor in the log (compatible weights)."""
        groups: dict = {}
        runs: list = []
        last = None
        for module, x in self.log:
            if runs and x is last and _compatible(runs[-1][0], module):
                runs[-1].append(module)
            else:
                runs.append([module])
            last = x
        for run in runs:
            groups.update({m: tuple(run) for m in run})
        self.log = []
        return groups

    def call(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.kept and self.kept_input is not None and self.kept_input() is x and module in self.kept:
            return self.kept.pop(module)
        if self.groups is None:
            if all(m is not module for m, _ in self.log):  # still the first graph step: record, run alone
                self.log.append((module, x))
                return _run((module,), x)[0]
            self.groups = self.learn()
        members = self.groups.get(module, (module,))
        if len(members) == 1 and not SINGLES:
            return type(module).forward(module, x)
        outputs = _run(members, x)
        self.kept = {m: y for m, y in zip(members, outputs) if m is not module}
        self.kept_input = weakref.ref(x)
        return outputs[members.index(module)]


def _compatible(a: nn.Linear, b: nn.Linear) -> bool:
    """Whether one launch can compute both (one dtype and input width, a bias on both or neither)."""
    return a.weight.dtype == b.weight.dtype and (a.bias is None) == (b.bias is None) and a.in_features == b.in_features


def _run(members, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The members' outputs for x ``[..., K]`` through one ``kernels.linear_group`` call."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    biases = None if members[0].bias is None else tuple(m.bias for m in members)
    outputs = kernels.linear_group(flat, tuple(m.weight for m in members), biases)
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outputs)


def _forward(self, x, *args, **kwargs):
    """The instance-level forward of a grouped projection (module docstring)."""
    if (
        args
        or kwargs
        or not fusion.in_graph_step()
        or torch.compiler.is_compiling()
        or not isinstance(x, torch.Tensor)
        or x.dim() < 2
        or x.shape[-1] != self.in_features
        or x.numel() > GEMV_MAX_ROWS * self.in_features
        or x.dtype != self.weight.dtype
        or x.device != self.weight.device
        or self.weight.stride(-1) != 1  # the kernel streams rows along K
        or torch.is_autocast_enabled(x.device.type)
    ):
        return type(self).forward(self, x, *args, **kwargs)
    return vars(self)[_SIBLINGS].call(self, x)


setattr(_forward, _MARK, True)


def _is_grouped(module: nn.Module) -> bool:
    return hasattr(getattr(vars(module).get("forward"), "__func__", None), _MARK)


def grouped_projections(model: nn.Module) -> list[list[nn.Linear]]:
    """Per attention module of the decoder layers, its projections that `group` takes (module docstring); [] where
    the model has no decoder layers."""
    layers = fusion.decoder_layers(model)
    if layers is None:
        return []
    found = []
    for layer in layers:
        for attention in (m for m in layer.modules() if hasattr(m, "layer_idx")):
            members = [c for c in attention.children()
                       if type(c) is nn.Linear and ("forward" not in vars(c) or _is_grouped(c))
                       and c.weight.dim() == 2]
            if members:
                found.append(members)
    return found


def group(model: nn.Module) -> int:
    """Put the grouped forward on the projections of `grouped_projections(model)` (idempotent: a grouped model keeps
    what it learned); returns how many modules have it."""
    count = 0
    for members in grouped_projections(model):
        if not all(_is_grouped(m) for m in members):
            siblings = _Siblings(members)
            for m in members:
                m.__dict__[_SIBLINGS] = siblings
                m.forward = types.MethodType(_forward, m)
        count += len(members)
    return count


def ungroup(model: nn.Module) -> nn.Module:
    """Undo `group`: every projection of `model` gets its class's forward back."""
    for module in model.modules():
        if _is_grouped(module):
            del module.__dict__["forward"]
            module.__dict__.pop(_SIBLINGS, None)
    return model


def projection_groups(model: nn.Module) -> list[list[str]]:
    """The groups the graph steps learned, as lists of qualified module names (empty before the first two graph
    steps, or without `group`)."""
    names = {m: n for n, m in model.named_modules()}
    seen, out = set(), []
    for module in model.modules():
        siblings = vars(module).get(_SIBLINGS)
        if siblings is None or siblings.groups is None or id(siblings) in seen:
            continue
        seen.add(id(siblings))
        done = set()
        for members in siblings.groups.values():
            if id(members) not in done:
                done.add(id(members))
                out.append([names[m] for m in members])
    return out
