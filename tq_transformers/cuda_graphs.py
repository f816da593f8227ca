"""CUDA-graph decoding: each decode step of `generate` replayed from one CUDA graph, the host out of the step.

    tq_transformers.enable(model, "turboquant", bits=4, fast=True, cuda_graphs=True)
    model.generate(**inputs)

    # or with your own cache:
    fast_attention.install(model); cuda_graphs.install(model)
    fast_attention.prepare_cache(cache, cuda_graphs=True)

Why: an eager decode step issues about 1,500 kernel launches from Python, and on a GPU the step's wall time is the
host's (docs/RESULTS.md). A graph replay issues them all at once.

How it fits transformers: `install(model)` wraps the model's ``forward`` on the instance (the class is untouched;
`uninstall` restores it). A call is a *graph step* when it is a plain decode step of a fast-path tq cache on CUDA:
keyword arguments only, among ``input_ids [B, 1]``, ``position_ids [B, 1]``, ``attention_mask [B, n + 1]``, the
cache (``past_key_values`` or ``cache``), ``use_cache``, ``return_dict=True`` and ``logits_to_keep``, exactly what
generate passes; the cache prepared by ``fast_attention.prepare_cache(cache, cuda_graphs=True)``, every one of its
layers quantized, holding packed tokens (and all their exact sink tokens, if any) and handled by the fused decode
kernel. Anything else runs the original forward, unchanged. Each cache has its own graph (kept while the cache
lives), so caches can alternate.

For graph steps of one cache:

1. the layers move into a static layout (``static_layout.StaticLayout``): packed storage preallocated to a capacity of
   the tokens held plus ``GROWTH`` (moved again, larger, when a flush would not fit), the window in a fixed buffer
   that begins with the exact sink tokens (the padding mask is written in the kernels' order of the tokens);
2. the first step after the layout is (re)built runs eagerly, as does the first step after it after which tokens
   leave the window (every ``flush_size`` tokens): warm-ups, so that Triton compiles and cached tables are built
   outside a capture;
3. the next step of each kind is captured, with the token counts, the window slot and the padding mask read on the
   device: one graph for plain steps, one for flushing steps (the flush encodes the block leaving the window and
   writes it at the packed offset read on the device, and the graph ends by moving the window to the front of its
   buffer); every later step of that kind copies its inputs into the graph's buffers, writes the counts, and
   replays.

The returned logits are a copy (the graph's own buffer is overwritten by the next replay). The output equals the
eager static step's exactly (same kernels, same grid), and the dynamic fast path's up to the split of the packed
tokens among thread blocks (tested on a GPU).

Fusion (``install(model, fuse=True)``, ``enable(..., fuse=True)``; off by default): the captured forward is the model's
eager one, in which every RMSNorm is about 8 kernels and the MLP's ``act(gate) * up`` two (about 480 small kernels per
step of Llama-3.1-8B). With ``fuse``, inside graph steps only (the eager warm-up steps of 2. and the captures of 3.;
never prefill, never the fallback forward above), the decoder layers' *pure* children run through ``torch.compile``
(inductor; ``fuse="eager"`` / ``"aot_eager"`` name another backend, for tests): an RMSNorm becomes one kernel, the
MLP its GEMMs (cuBLAS) and one ``act * up`` kernel. The rule (``tq_transformers.fusion``, no class names): the decoder
layers are the ``nn.ModuleList`` of the text config's ``num_hidden_layers`` modules each holding an attention module
(one with a ``layer_idx``); of each layer, every direct child with parameters, no attention module inside, and a
forward of one argument is compiled whole (``fullgraph=True``: a block that is not one graph, such as an MoE block
with data-dependent routing, fails its first compile and stays unfused, with a warning). The compile happens in the
first warm-up step (outside any capture; one compiled graph serves all layers, a new batch size compiles once more),
and a capture runs under ``torch.compiler.set_stance("fail_on_recompile")``, so nothing compiles inside it. The
modules get an instance-level ``forward`` (classes untouched); `uninstall` deletes it. A cache's graphs are captured
again at its next step when the runner's ``fuse`` changed since they were captured.

Grouped projections (with or without ``fuse``): in graph steps, each attention module's projections that read one
input (q, k, v) run as one kernel launch, o_proj through the same kernel (``tq_transformers.projections``; the groups
are learned in the first graph step; `install` puts them on, `uninstall` and ``projections.ungroup`` take them off).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import types
import weakref

import torch

from . import fusion, projections
from .cache import QuantizedKVCache
from .generation import CACHE_KWARG
from .layer import QuantizedKVLayer
from .static_layout import StaticShared

__all__ = ["GROWTH", "install", "runner_of", "uninstall"]

GROWTH = 1024  # packed tokens reserved beyond those held when the static layout is (re)built

_GRAPH_KWARGS = {"input_ids", "position_ids", "attention_mask", "past_key_values", "cache", "use_cache", "return_dict",
                 "logits_to_keep"}


@dataclasses.dataclass
class _Graph:
    """One captured step and its buffers."""

    graph: torch.cuda.CUDAGraph
    signature: tuple
    inputs: dict  # the graph's input buffers
    output: dict  # the graph's output fields, the cache left out (logits buffer inside)
    output_class: type
    cache_fields: tuple  # the output fields that hold the cache


@dataclasses.dataclass
class _State:
    """One cache's graphs (nothing here refers to the cache: it is a weak key of the runner's table)."""

    shared: StaticShared
    layouts: list  # the layers' StaticLayout objects the graphs were built for
    warm: dict = dataclasses.field(default_factory=dict)  # flushes (bool) -> whether that kind of step ran eagerly
    graphs: dict = dataclasses.field(default_factory=dict)  # flushes (bool) -> _Graph
    fuse: str | None = None  # the fusion backend the warm-ups and graphs ran with (None: unfused)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _on_graph_device(layer: QuantizedKVLayer) -> bool:
    """Whether the layer's tensors are where CUDA graphs and the Triton kernels run."""
    from . import kernels

    return layer.keys.is_cuda and kernels.triton_available()


def _capture_graph(fn):
    """Capture `fn()` into a CUDA graph; returns (graph, fn's output). Its buffers live in the graph's own pool."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    return graph, output


def _kernel_covers(layer: QuantizedKVLayer) -> bool:
    """Whether the fused decode kernel reads this layer's packed tokens (a graph step never falls back)."""
    from . import kernels

    keys, values = layer.packed()
    return keys is not None and values is not None and kernels.decode_supported(keys, values, layer.dtype)


def _graph_layers(cache, verified: list | None = None) -> list[QuantizedKVLayer] | None:
    """The cache's layers when every one can run a graph step, else None. `verified`: the static layouts of the
    runner's state for this cache, whose layers' kernel coverage was checked when they were built (a layer's formats
    do not change while it stays in one layout), so a replayed step does not check it again."""
    verified = verified or []

    if not isinstance(cache, QuantizedKVCache) or not cache.cuda_graphs or not cache.layers:
        return None
    layers = cache.layers
    if not all(isinstance(layer, QuantizedKVLayer) for layer in layers):
        return None  # sliding-window layers keep transformers' own (dynamically shaped) layer
    first = layers[0]
    if not first.is_initialized or not _on_graph_device(first):
        return None
    for i, layer in enumerate(layers):
        if (
            layer.fast_path is None
            or not layer.is_initialized
            or layer.keys.device != first.keys.device  # one counts tensor for all layers (no pipeline over GPUs)
            or layer.num_quantized == 0
            or layer.cumulative_length != first.cumulative_length
            or not (i < len(verified) and layer.static is verified[i] or _kernel_covers(layer))
        ):
            return None
    return layers


class _Runner:
    """The wrapped forward of one model (see the module docstring)."""

    def __init__(self, forward, replaced=None, fuse: str | None = None):
        self.forward = forward  # the forward wrapped (a bound method, or an instance-level one such as accelerate's)
        self.replaced = replaced  # the instance-level forward that `uninstall` puts back, or None
        self.fuse = fuse  # the compile backend of the fused modules in graph steps, or None (fusion.check_fuse)
        self.states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> _State
        self.stats = collections.Counter()  # steps by kind: "eager", "capture", "replay"; and "layout" (re)builds

    def __deepcopy__(self, memo):
        """A deep copy of the model gets a runner of its own around the copy's forward (no graphs: captured graphs
        belong to the original's buffers)."""
        return _Runner(copy.deepcopy(self.forward, memo), copy.deepcopy(self.replaced, memo), self.fuse)

    # ------------------------------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if CACHE_KWARG == "cache" and "past_key_values" in kwargs and "cache" not in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")  # the name this transformers takes without a warning
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        input_ids = kwargs.get("input_ids")
        if (
            args
            or not set(kwargs) <= _GRAPH_KWARGS
            or not isinstance(input_ids, torch.Tensor)
            or input_ids.dim() != 2
            or input_ids.shape[1] != 1
            or kwargs.get("return_dict") is not True
            or kwargs.get("use_cache", True) is not True
            or not isinstance(kwargs.get("position_ids"), torch.Tensor)
            or not isinstance(kwargs.get("logits_to_keep", 0), int)
        ):
            return self.forward(*args, **kwargs)
        known = self.states.get(cache) if isinstance(cache, QuantizedKVCache) else None
        layers = _graph_layers(cache, known.layouts if known is not None else None)
        mask = kwargs.get("attention_mask")  # generate's: [B, tokens held + 1]
        if layers is None or (
            mask is not None and tuple(mask.shape) != (input_ids.shape[0], layers[0].cumulative_length + 1)
        ):
            return self.forward(**kwargs)
        state = self._state_for(cache, layers, input_ids)
        if state.fuse != self.fuse:  # `install` switched fusion: warm up and capture again
            state.graphs, state.warm, state.fuse = {}, {}, self.fuse
        first = layers[0]
        flushes = first.static.flushes_next(first)
        if flushes and first.num_quantized + first.cfg.flush_size > first.static.capacity:
            self._layout(layers, state, first.num_quantized + first.cfg.flush_size)
        if not state.warm.get(False) or not state.warm.get(flushes):
            state.warm[False] = state.warm[flushes] = True
            self.stats["eager"] += 1
            with fusion.graph_step(state.fuse):  # fused modules compile here, outside any capture
                return self.forward(**kwargs)
        state.shared.write_mask(mask, first.num_sinks, first.num_quantized)  # in the kernels' order of the tokens
        for layer in layers:
            layer.settle()
        signature = (tuple(input_ids.shape), tuple(kwargs["position_ids"].shape), kwargs.get("logits_to_keep"),
                     "cache" in kwargs)
        step = state.graphs.get(flushes)
        if step is None or step.signature != signature:
            step = state.graphs[flushes] = self._capture(state, layers, kwargs, signature, flushes)
            self.stats["capture"] += 1
        for name in ("input_ids", "position_ids"):
            step.inputs[name].copy_(kwargs[name])
        first.write_step_counts()  # all layers hold the same counts and share the tensor
        step.graph.replay()
        self.stats["replay_flush" if flushes else "replay"] += 1
        for layer in layers:  # what the captured step's Python did on the host
            layer.advance_flush() if flushes else layer.advance_one()
        fields = {k: (v.clone() if k == "logits" else v) for k, v in step.output.items()}
        return step.output_class(**fields, **{k: cache for k in step.cache_fields})

    # ------------------------------------------------------------------------------------------------------------------
    def _state_for(self, cache, layers, input_ids) -> _State:
        state = self.states.get(cache)
        if state is not None and all(layer.static is layout for layer, layout in zip(layers, state.layouts)):
            return state
        self.states.pop(cache, None)  # frees the old graph before the new layout is allocated
        first = layers[0]
        device = first.keys.device
        shared = StaticShared(
            lengths=torch.zeros(3, dtype=torch.int64, device=device),
            key_mask=torch.ones(input_ids.shape[0], 0, dtype=torch.bool, device=device),
        )
        state = _State(shared, [], fuse=self.fuse)
        self._layout(layers, state, first.num_quantized)
        self.states[cache] = state
        return state

    def _layout(self, layers, state: _State, need: int) -> None:
        """(Re)build the static layout with room for `need` packed tokens; the graph is captured again after it."""
        cfg = layers[0].cfg
        capacity = _round_up(need + GROWTH, cfg.flush_size)
        state.graphs, state.warm = {}, {}  # the old graphs are freed before the new buffers are allocated
        total = capacity + cfg.sink_tokens + cfg.residual_length + cfg.flush_size
        if state.shared.key_mask.shape[1] < total:
            state.shared.key_mask = torch.ones(state.shared.key_mask.shape[0], total, dtype=torch.bool,
                                               device=state.shared.key_mask.device)
        for layer in layers:
            layer.enter_static(capacity, state.shared)
        self.stats["layout"] += 1
        state.layouts = [layer.static for layer in layers]

    def _capture(self, state: _State, layers, kwargs, signature, flushes: bool) -> _Graph:
        """Capture one step (a flushing one ends by settling every layer's window) into a graph of its own."""
        state.graphs.pop(flushes, None)
        inputs = {name: kwargs[name].clone() for name in ("input_ids", "position_ids")}
        call = dict(kwargs, **inputs)
        call["attention_mask"] = None  # the mask comes from the layout (building one would sync the host)
        fuse = state.fuse

        def step():
            with fusion.graph_step(fuse, capturing=True):  # the code compiled in the warm-up; nothing compiles here
                output = self.forward(**call)
            if flushes:
                for layer in layers:
                    layer.settle()
            return output

        saved = state.shared.host_state(layers)
        state.shared.graph_step = True
        try:
            graph, output = _capture_graph(step)
        finally:
            state.shared.graph_step = False
            state.shared.restore_host_state(layers, saved)  # the capture ran no step: undo its host side
        cache = call.get("past_key_values", call.get("cache"))
        return _Graph(graph, signature, inputs, {k: v for k, v in output.items() if v is not cache}, type(output),
                      tuple(k for k, v in output.items() if v is cache))


_RUNNER_ATTR = "_tq_graph_runner"


def _graph_forward(cls_forward):
    """The model's forward while the graph runner is installed: a function bound to the model (a deep copy of the
    model rebinds it to the copy, with a runner of its own), with the signature of the class's forward (generate
    reads it, e.g. to pass ``logits_to_keep``)."""

    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        return vars(self)[_RUNNER_ATTR](*args, **kwargs)

    return forward


def install(model, fuse: bool | str = False):
    """Wrap `model.forward` so that decode steps of fast-path tq caches replay a CUDA graph (module docstring).

    Args:
        model: a transformers model.
        fuse: in graph steps only, run the decoder layers' pure modules (norms, MLP) through ``torch.compile``
            (module docstring, "Fusion"): False (default), True (inductor), or the name of another ``torch.compile``
            backend ("eager", "aot_eager": for tests). A ValueError if the model has no module to fuse. (The
            projections are grouped either way: module docstring, "Grouped projections".)
    Returns:
        the model (idempotent; called again on an installed model, it switches ``fuse``).
    """
    backend = fusion.check_fuse(fuse)
    if backend is not None:
        fusion.fusible(model)  # raises (nothing changed yet) when there is nothing to fuse
    runner = runner_of(model)
    if runner is None:
        replaced = vars(model).get("forward")  # an instance-level forward (accelerate's hooks), or None
        runner = _Runner(model.forward, replaced)
        setattr(model, _RUNNER_ATTR, runner)
        model.forward = types.MethodType(_graph_forward(type(model).forward), model)
    if backend is None:
        fusion.unfuse(model)
    else:
        fusion.fuse(model)
    projections.group(model)
    runner.fuse = backend
    return model


def runner_of(model) -> _Runner | None:
    """The graph runner `install` put on `model` (its ``stats`` count the steps by kind), or None."""
    return vars(model).get(_RUNNER_ATTR)


def uninstall(model):
    """Undo `install`: the forward the model had before (its class's, or an instance-level one such as accelerate's
    hooks put there), and the fused modules' own forward (``fuse``); the graphs and their buffers are freed.

    Args:
        model: a transformers model.
    Returns:
        the model.
    """
    runner = runner_of(model)
    if runner is not None:
        fusion.unfuse(model)
        projections.ungroup(model)
        del model.__dict__[_RUNNER_ATTR]
        if runner.replaced is None:
            del model.forward
        else:
            model.forward = runner.replaced
    return model
