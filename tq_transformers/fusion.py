"""The decoder layers' pure modules through ``torch.compile``, inside CUDA-graph steps only
(``cuda_graphs.install(model, fuse=True)``, ``enable(..., fuse=True)``).

Why: the graph runner captures the model's eager forward, in which every RMSNorm is about 8 kernels (two casts, pow,
mean, add, rsqrt, two multiplies) and the MLP's ``act(gate) * up`` two: about 15 small kernels per layer, 480 per
decode step of Llama-3.1-8B, of the ~900 small kernels that cost 1.8-2.1 ms of a 7.9 ms step (docs/RESULTS.md, "Where
a graph-replayed decode step's GPU time goes"). Compiled (inductor), an RMSNorm is one kernel and the MLP its three
GEMMs (cuBLAS, as before) plus one fused ``act * up`` kernel.

Which modules (generic: no class names):

- the decoder layers are the ``nn.ModuleList`` of ``config.get_text_config().num_hidden_layers`` modules of which each
  holds an attention module, i.e. a module with a ``layer_idx`` attribute (what transformers' attention modules, and
  the other cache users such as Mamba mixers, carry for the cache: Llama, Qwen2/3, Mistral, Gemma 1-3, Phi/Phi3, OLMo2,
  Cohere, Granite, StarCoder2, GPT-NeoX, Falcon, Mixtral, Qwen2/3-MoE, DeepSeek-V3, gpt-oss in transformers 5.x);
- in each layer, a direct child is fused when its subtree holds parameters (a dropout or identity has nothing to
  fuse), holds no attention module, its class's ``forward`` takes exactly one argument (no ``*args`` / ``**kwargs``),
  and it has no instance-level ``forward`` of someone else (accelerate's hooks). For the dense models above: the
  RMSNorms / LayerNorms and the MLP; the attention (rope, the cache, our decode kernels) and the residual adds (in the
  layer's own forward) stay eager;
- each is compiled whole (``fullgraph=True``), so that a forward that is not one static graph is never half-fused: an
  MoE block with eager experts (``nonzero`` and a loop over the experts hit: data-dependent shapes and control flow)
  makes dynamo raise at its first compile, in a warm-up step; that class then runs its own forward in graph steps (a
  ``RuntimeWarning`` says so). Such a block cannot be captured in a CUDA graph anyway (it syncs the host); one whose
  routing is static (``grouped_mm`` experts) compiles, and is fused;
- a call with anything else than one tensor argument runs the module's own forward.

When: a fused module runs its compiled forward only inside `graph_step` (the graph runner's eager warm-up steps and
its captures, see ``cuda_graphs``); prefill, the runner's ordinary fallback forward and any call outside the runner
run the module's own forward (the compiled one is reached through an instance-level ``forward``; the classes are
untouched, `unfuse` deletes it again, a deep copy of the model rebinds it to the copy).

Compiles: one compiled graph serves every layer's instance (dynamo inlines built-in modules and treats their parameters
as inputs), so a model compiles once per fused class: in the first warm-up step of its first graph step, outside any
capture (the capture then reuses the compiled code; a replay runs no Python). A new batch size compiles once more (the
batch dimension becomes dynamic), as does another dtype or backend; dynamo's per-function recompile limit (8) is far.
A capture runs under ``torch.compiler.set_stance("fail_on_recompile")``: code that would compile there is refused
instead of compiling inside the capture; the module then runs its own forward in that capture and in every later
graph step (a ``RuntimeWarning`` says so), so a model whose guards differ between the warm-up step and the capture
still decodes, unfused.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import types
import warnings

import torch
from torch import nn

from .validation import short_repr

__all__ = ["DEFAULT_BACKEND", "RECOMPILE_REFUSED", "check_fuse", "decoder_layers", "fuse", "fused_modules", "fusible",
           "graph_step", "in_graph_step", "unfusable", "unfuse"]

#: the backend that ``fuse=True`` means
DEFAULT_BACKEND = "inductor"
#: how ``torch.compiler.set_stance("fail_on_recompile")`` begins the RuntimeError it raises (torch 2.6 on)
RECOMPILE_REFUSED = "Detected recompile when torch.compile stance is 'fail_on_recompile'"

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("tq_fusion_step", default=None)  # (backend, capturing)
_COMPILED: dict = {}  # (class forward, backend) -> its torch.compile'd function (one per process: one guard cache)
_UNFUSABLE: dict = {}  # (class forward, backend) -> why its compile failed (it then runs its own forward)
_MARK = "_tq_fused_forward"  # attribute of our instance-level forward functions: the class forward they wrap


def check_fuse(value) -> str | None:
    """The compile backend that `fuse` names (None: no fusion). False: none; True: ``DEFAULT_BACKEND``; a string: a
    registered ``torch.compile`` backend ("inductor"; "eager" and "aot_eager" for tests). Raises a TypeError or a
    ValueError naming ``fuse`` otherwise."""
    if value is False:
        return None
    if value is True:
        return DEFAULT_BACKEND
    if not isinstance(value, str):
        raise TypeError(f"fuse must be a bool or the name of a torch.compile backend, got {type(value).__name__} "
                        f"{short_repr(value)}")
    backends = torch.compiler.list_backends(exclude_tags=())
    if value not in backends:
        raise ValueError(f"fuse must be a bool or the name of a torch.compile backend (one of {backends}), got "
                         f"{short_repr(value)}")
    return value


def _is_attention(module: nn.Module) -> bool:
    return hasattr(module, "layer_idx")


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's decoder layers (module docstring), or None."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(text, "num_hidden_layers", None)
    if not isinstance(count, int) or count <= 0:
        return None
    for module in model.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) == count
            and all(any(_is_attention(m) for m in layer.modules()) for layer in module)
        ):
            return module
    return None


def _takes_one_argument(forward) -> bool:
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]  # after self
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _is_fused(module: nn.Module) -> bool:
    forward = vars(module).get("forward")
    return hasattr(getattr(forward, "__func__", None), _MARK)


def _is_fusible(module: nn.Module) -> bool:
    if _is_fused(module):
        return True
    return (
        "forward" not in vars(module)  # someone else's instance-level forward (accelerate's hooks): left alone
        and next(module.parameters(), None) is not None
        and not any(_is_attention(m) for m in module.modules())
        and _takes_one_argument(type(module).forward)
    )


def fusible(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every module `fuse` compiles (module docstring). Raises a ValueError when there is
    none (no decoder layers found, or none of their children qualifies)."""
    layers = decoder_layers(model)
    if layers is None:
        raise ValueError(f"fuse: found no decoder layers in {type(model).__name__} (an nn.ModuleList of "
                         "config.num_hidden_layers modules, each holding an attention module with a layer_idx)")
    prefix = next(name for name, m in model.named_modules() if m is layers)
    found = [(f"{prefix}.{i}.{name}", child) for i, layer in enumerate(layers) for name, child in layer.named_children()
             if _is_fusible(child)]
    if not found:
        raise ValueError(f"fuse: no child of {type(model).__name__}'s decoder layers can be fused (each holds the "
                         "attention, has no parameters, takes more than one argument or has an instance-level forward)")
    return found


@functools.cache
def _fused_forward(cls_forward):
    """The instance-level forward of a fused module of the class whose forward is `cls_forward` (one function per
    class: bound to each instance)."""

    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        step = None if torch.compiler.is_compiling() else _ACTIVE.get()  # traced by someone's compile: inline it
        if step is None or step[0] is None or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            return cls_forward(self, *args, **kwargs)
        return _compiled_call(cls_forward, step, self, args[0])

    setattr(forward, _MARK, cls_forward)
    return forward


def _compiled_call(cls_forward, step, module, x):
    """`cls_forward(module, x)` through its compiled function (compiled at the first call, outside a capture)."""
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

    backend, capturing = step
    key = (cls_forward, backend)
    if key in _UNFUSABLE:
        return cls_forward(module, x)
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = torch.compile(cls_forward, backend=backend, fullgraph=True)
    if capturing:  # no compile can happen here (set_stance in graph_step)
        try:
            return compiled(module, x)
        except RuntimeError as exc:  # it would compile again: its guards differ from the warm-up step's
            if not str(exc).startswith(RECOMPILE_REFUSED):
                raise
            _give_up(key, "its compiled code does not fit the capture (it would compile again there: "
                     f"{_first_line(exc)})")
            return cls_forward(module, x)  # eager kernels are captured as they are
    try:
        return compiled(module, x)
    except (TorchDynamoException, FailOnRecompileLimitHit) as exc:  # not one graph: runs unfused from now on
        _give_up(key, f"its forward does not compile to one graph with backend {backend!r}: "
                      f"{type(exc).__name__}: {_first_line(exc)}")
        return cls_forward(module, x)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _give_up(key, why: str) -> None:
    """Run the class of `key` unfused from now on (this process), with a warning saying `why`."""
    cls_forward, _ = key
    _UNFUSABLE[key] = why
    warnings.warn(f"fuse: {cls_forward.__qualname__} runs unfused in CUDA-graph steps ({why})", RuntimeWarning,
                  stacklevel=3)


def fuse(model: nn.Module) -> list[str]:
    """Put the instance-level forward on every module of `fusible(model)` (idempotent); returns their names. They
    run compiled only inside `graph_step`."""
    names = []
    for name, module in fusible(model):
        if not _is_fused(module):
            module.forward = types.MethodType(_fused_forward(type(module).forward), module)
        names.append(name)
    return names


def unfuse(model: nn.Module) -> nn.Module:
    """Undo `fuse`: every module of `model` with our instance-level forward gets its class's forward back."""
    for module in model.modules():
        if _is_fused(module):
            del module.__dict__["forward"]
    return model


def fused_modules(model: nn.Module) -> list[str]:
    """Qualified names of the modules of `model` that `fuse` put its forward on."""
    return [name for name, module in model.named_modules() if _is_fused(module)]


def unfusable() -> dict:
    """(class forward's qualified name, backend) -> why it runs unfused (its compile failed), for this process."""
    return {(fn.__qualname__, backend): why for (fn, backend), why in _UNFUSABLE.items()}


def in_graph_step() -> bool:
    """Whether the caller runs inside `graph_step` (a CUDA-graph step of the runner: its warm-up or its capture)."""
    return _ACTIVE.get() is not None


@contextlib.contextmanager
def graph_step(backend: str | None, capturing: bool = False):
    """A CUDA-graph step of the runner: inside the block fused modules run compiled with `backend` (None: their own
    forward) and `in_graph_step()` is True. `capturing`: inside a CUDA-graph capture, where nothing may compile
    (``torch.compiler.set_stance("fail_on_recompile")``, with a backend)."""
    token = _ACTIVE.set((backend, capturing))
    try:
        if capturing and backend is not None:
            with torch.compiler.set_stance("fail_on_recompile"):
                yield
        else:
            yield
    finally:
        _ACTIVE.reset(token)
