"""CUDA C++ split-K decode kernels, compiled at first use with NVRTC: codebook keys and values (TurboQuant, Bonsai;
source ``cuda_source``) and affine keys and values (KIVI; source ``cuda_affine_source``, same lane layout).

Same contract as ``triton_split.split_partials`` (the Triton reduce merges its partials). Built through PyTorch's
own NVRTC binding (``torch.cuda._compile_kernel``): no compiler is needed, and a CPU install never gets here. If the
binding is missing or the build fails, ``supported`` answers False and the Triton split kernel runs instead.

Why a CUDA kernel: the Triton split kernel is bound by the L1/shared-memory unit (docs/RESULTS.md, second pass: its
decoded tiles go through shared memory into the tensor-core operand layout, with bank conflicts, and its byte-table
gathers use few of the bytes of each sector). Here each warp decodes straight into the ``mma.m16n8k16`` operand
registers:

- keys, S^T = K Q^T: M = 16 tokens, N = 8 query heads of one KV head (G <= 8; padding rows load head 0 and are never
  written out), K = 16 dims. Lane (gid = lane / 4, tid = lane % 4) loads tokens gid and gid + 8, coordinates
  [tid*D/4, (tid+1)*D/4) (16 contiguous bytes at D = 128, 4 bits): the A fragment's k index maps to those
  coordinates (``cuda_prelude.key_coord``), and the query's B fragment uses the same map (a dot product does not care
  about the order of its terms);
- values, O^T = V^T P^T: M = 16 coordinates, K = 16 tokens; lane gid owns coordinates [gid*D/8, (gid+1)*D/8) of
  tokens 2tid, 2tid+1, 2tid+8, 2tid+9;
- P^T's B fragment is the transpose of S^T's accumulator fragment: one ``movmatrix.trans`` per 8 tokens;
- decoding: a byte of codes -> its 8/b codes as 16-bit pairs through a 256-entry table in shared memory, one copy
  per bank-lane, so every lookup of a warp is conflict-free: one LDS per byte instead of a gather from L1. Each
  byte value owns 256 bytes, both sides' copies, so the lookup's offset is one byte-permute (the byte lands in bits
  8..15, the lane's copy in bits 0..7) and the LDS adds the table's base for free::

      offset = byte << 8 | side << 7 | copy * 4 * WORDS | word * 4          (TABLE_BYTES = 256 * 256 = 64 KiB)
      byte 0x00: [key copy 0 .. REPL-1 (128 B)][value copy 0 .. REPL-1 (128 B)]
      byte 0x01: [key copies                  ][value copies                  ]  ...

  The shared table (CUDA_PLAN's ``shared_table``, for codebook pairs whose two word tables are equal: one width, the
  value side's code slots in the natural order, one codebook, as TurboQuant-4's; ``plan_for`` decides it on the
  host) stores one side for both, at one more integer op a lookup (a byte-permute, then byte * 128 + copy; the
  ``lookup`` comment in ``cuda_prelude`` says why this form)::

      offset = byte << 7 | copy * 4 * WORDS | word * 4                  (SHARED_TABLE_BYTES = 256 * 128 = 32 KiB)
      byte 0x00: [copy 0 .. REPL-1 (128 B)]   byte 0x01: [copies]  ...  (keys and values look up the same copy)

  Why: the kernels are latency-bound and their residency is capped by shared memory (docs/RESULTS.md eleventh
  pass): the shipped codebook plan (8 warps, a 3-stage ring: 64 KiB + 49.5 KiB at D = 128) fits one block an SM, the
  shared table (32 KiB + 49.5 KiB) two (at 128 registers a thread, what ptxas gives it). Checked on the host: the
  layout, its banks and the decoders emulated on the shared layout's offsets (tests/test_kernels.py), and offline
  SASS (scripts/inspect_cuda_sass.py, 2026-12-03: every head dim, width and dtype builds, no spills at 4 or 8
  warps; TurboQuant-4 at D = 128, 8 warps, ring 3: 367 -> 433 instructions a tile for its 64 lookups, 126 -> 128
  registers; with ring 2 ptxas rematerializes lane values to stay under 128 registers, 367 -> 476); on an H200
  (2026-12-03) the plan-variant tests pass with it, and the driver's occupancy gives that plan 2 blocks an SM with
  the shared table, 1 without. Measured (H200, scripts/tune_decode_kernels.py, 2026-12-03, docs/RESULTS.md
  "twelfth pass"): twice the resident warps gained 2.5% at 8 x 32K (118.2 -> 115.2 us) and 1% at 1 x 32K, and
  at equal residency (ring 2: two blocks either way) its extra instructions cost 5.5% (112.2 -> 118.4 us):
  residency is not what limits these kernels, so PLAN_OVERRIDES leaves it off.

- index bytes interleave several tokens' codes (two bitwise ops per 4 bytes, ``cuda_prelude.interleave``) so that
  each lookup lands in its fragment register: no byte-permute per value fragment and no register moves to build
  2- and 1-bit fragments (``decode_keys``, ``decode_values``; the value side's table orders its code slots for it,
  VALUE_SLOTS).

Before 2026-12-03 (byte * 128 + copy, fragments assembled after the lookups) a TurboQuant-4 tile took 525 warp
instructions, 336 now (KIVI-2 601 -> 370, Bonsai-1 336 -> 244; ncu at 8 x 32K, docs/RESULTS.md eleventh pass); the
kernels are now bound by latency, the 64 KiB table a block capping residency at 12 warps an SM.
"""

from __future__ import annotations

import ctypes

import torch

from ..formats import ChannelAffinePacked, CodebookPacked, TokenAffinePacked
from .cuda_affine_source import AFFINE_SPLIT_SOURCE
from .cuda_source import CODEBOOK_SPLIT_SOURCE
from .triton_common import cdiv, derived, partials, sm_count

# Launch plan, from sweeps on an H200 with scripts/tune_decode_kernels.py on 2026-12-01 (docs/RESULTS.md, "Speed
# (GPU), fifth pass"): warps per block (one split each, sharing the decode tables); full waves of resident blocks the
# splits fill; the fewest tokens a split takes (256 best at 1 x 32K, where more splits cost the reduce more than they
# hide latency); the key mma steps as two chains (up to 4% faster); the output accumulators rescaled only in tiles
# where a running max moved; the launch bound's blocks per SM (0: none; 4 caps registers at 128, mixed results).
# The next tile is always loaded while this one is decoded (1.7x faster at 8 x 32K than without, fifth pass); `depth`
# 2 loads two ahead (more bytes in flight, about 40 more registers; not better, eleventh pass); `ring` > 0 stages the
# codebook kernel's tiles through a cp.async ring of that many tiles in shared memory instead (``cuda_source``);
# `shared_table` 1 keeps one side's table for both sides of a codebook pair whose key and value tables are equal
# (TurboQuant-4: 32 KiB instead of 64 KiB a block, one more integer op a lookup; module docstring; measured no
# better, twelfth pass).
CUDA_PLAN = {"warps": 4, "waves": 1, "min_tokens": 256, "two_chains": True, "lazy_rescale": False, "depth": 1,
             "ring": 0, "min_blocks": 0, "shared_table": 0}
#: CUDA_PLAN's values that measured better for one key format and width (H200, 8 x 32K / 1 x 32K, Llama-3.1-8B
#: attention shape, scripts/tune_decode_kernels.py, 2026-12-03, docs/RESULTS.md "eleventh pass", third lease): 4-bit
#: codebook keys (TurboQuant-4) 136.7 / 48.4 -> 118.0 / 39.9 us with 8 warps, the lazy rescale and a 3-stage ring;
#: 1-bit codebook keys (Bonsai-1) 102.1 / 40.5 -> 88.4 / 37.6 us the same; KIVI-2 is best on CUDA_PLAN itself
_CODEBOOK_PLAN = {"warps": 8, "lazy_rescale": True, "ring": 3}
PLAN_OVERRIDES = {(CodebookPacked, 4): _CODEBOOK_PLAN, (CodebookPacked, 1): _CODEBOOK_PLAN}
#: the CUDA_PLAN keys compiled into the source (``_source``); the others only shape the launch (``plan``)
COMPILED_PLAN_KEYS = ("warps", "two_chains", "lazy_rescale", "depth", "ring", "min_blocks", "shared_table")
TILE = 16  # tokens per mma step
MAX_GROUP = 8  # query heads per KV head: the mma's N
HEAD_DIMS = (64, 128, 256)
BITS = (1, 2, 4)
HALF_DTYPES = (torch.float16, torch.bfloat16)  # the kernels' mma operand types
TABLE_BYTES = 256 * 256  # 256 byte values x (key + value side) x 32 banks' copies of 4 bytes (module docstring)
SHARED_TABLE_BYTES = 256 * 128  # the same, one side for both (CUDA_PLAN's shared_table)
#: the code slots of a value-side table entry, by bits, in word order: the value decoder's index byte holds several
#: tokens' codes (``cuda_prelude.decode_values``) and each word must be one coordinate of two tokens. 2 bits: slots
#: [A c0, A c1, B c0, B c1] -> words (A c0, B c0), (A c1, B c1); 1 bit: [A p, B p, C p, D p] (p = two codes) ->
#: (A, B) and (C, D) at each of the pair's coordinates; 4 bits: [A c, B c], in order.
VALUE_SLOTS = {4: (0, 1), 2: (0, 2, 1, 3), 1: (0, 2, 1, 3, 4, 6, 5, 7)}
VECTOR_BYTES = 16  # the widest load of a lane
# Below this many packed tokens (the grid's bound) the Triton split kernel runs instead, by key format. Codebook: at
# 1 x 4K it measured 26.9 against 34.8 us here (H200, scripts/tune_decode_kernels.py, 2026-12-01: the table fill and
# the fixed costs dominate). Affine: 26.5 (Triton) against 35.9 us at 1 x 4K, 117.6 against 46.4 us at 1 x 32K (H200,
# the same script, 2026-12-01, docs/RESULTS.md "seventh pass").
MIN_TOKENS = {CodebookPacked: 8192, ChannelAffinePacked: 8192}


_KERNELS: dict = {}
_FAILED: dict = {}
_RESIDENT: dict = {}
_SHARED_LIMIT: dict = {}


def plan_for(keys, values=None) -> dict:
    """CUDA_PLAN with the overrides measured for the keys' format and width (PLAN_OVERRIDES); the staging ring
    ("ring") off where the pair's tiles cannot be copied as 16-byte chunks (``_ring_fits``) or the rings do not fit
    the block's shared memory; the shared table ("shared_table") off unless the pair's key and value word tables are
    known to be equal (``_tables_equal``; host-side facts, no device sync once cached).

    Args:
        keys: the packed keys (a ``formats`` view).
        values: the packed values (needed to check the ring's alignment and the shared table; None: the ring's
            alignment is not checked, and the shared table is off).

    Returns:
        A new dict with CUDA_PLAN's keys.
    """
    cfg = {**CUDA_PLAN, **PLAN_OVERRIDES.get((type(keys), keys.bits), {})}
    if cfg["shared_table"] and (values is None or not _tables_equal(keys, values)):
        cfg["shared_table"] = 0
    if cfg["ring"] and (not isinstance(keys, CodebookPacked) or (values is not None and not _ring_fits(keys, values))):
        cfg["ring"] = 0
    if cfg["ring"] and values is not None and keys.codes.is_cuda:  # the rings must fit the block's shared memory
        limit = _shared_limit(keys.codes.device)
        if limit and shared_bytes(keys.head_dim, keys.bits, values.bits, None, cfg) > limit:
            cfg["ring"] = 0
    return cfg


def _shared_limit(device: torch.device) -> int:
    """The dynamic shared memory a block of `device` may opt into (0: unknown to this torch), cached: plan_for runs
    at every decode call."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SHARED_LIMIT:
        props = torch.cuda.get_device_properties(idx)
        _SHARED_LIMIT[idx] = getattr(props, "shared_memory_per_block_optin", 0)
    return _SHARED_LIMIT[idx]


def _tables_equal(keys, values) -> bool:
    """The key and value sides' word tables (``_word_table``) are equal, decided on the host: codebook sides of one
    width whose value-side code slots are in the key side's (natural) order (VALUE_SLOTS: 4 bits) and one codebook,
    the same levels tensor (the caches' TurboQuant codebooks are one tensor: ``codebooks.codebook``) or equal levels,
    compared once per pair of tensors (a device sync) and cached on both (``derived``: a stale entry of one whose
    partner died is never the only one asked; ``keep_constants`` compares them outside any graph)."""
    if not (isinstance(keys, CodebookPacked) and isinstance(values, CodebookPacked)) or keys.bits != values.bits:
        return False
    if not _natural_slots(keys.bits):
        return False
    a, b = keys.levels, values.levels
    if a is b:
        return True
    if a.shape != b.shape or a.device != b.device:
        return False

    def equal():
        return bool(torch.equal(a.float(), b.float()))

    return derived(a, ("equal_levels", id(b)), equal) and derived(b, ("equal_levels", id(a)), equal)


def _ring_fits(keys, values) -> bool:
    """A tile's key and value rows and its 16 scales of each side start on 16 bytes in every batch-head (the staging
    ring's cp.async chunks)."""
    for t in (keys.codes, values.codes, keys.scale, values.scale):
        nbytes = t.element_size()
        if t.data_ptr() % 16 or any(t.stride(i) * nbytes % 16 for i in (0, 1)) or TILE * t.stride(2) * nbytes % 16:
            return False
    return True


def _natural_slots(bits: int) -> bool:
    """The value side's table entry has its code slots in the key side's order (VALUE_SLOTS; 4 bits only)."""
    return tuple(VALUE_SLOTS[bits]) == tuple(range(8 // bits))


def _shared_table(kb: int, vb: int, groups, cfg: dict) -> int:
    """The compiled SHARED_TABLE: cfg["shared_table"] where one table can serve both decoders (the codebook kernel,
    one width, the code slots in one order: ``_natural_slots``), else 0 (the two-sided table): never for the affine
    kernel (its key table holds fp16 integers, its value table the model dtype), nor for 2- and 1-bit values (their
    slots reordered). ``plan_for`` also checks the levels (``_tables_equal``)."""
    return int(bool(cfg["shared_table"]) and groups is None and kb == vb and _natural_slots(kb))


def shared_bytes(d: int, kb: int, vb: int, groups, cfg: dict) -> int:
    """Dynamic shared memory of a block: the table (TABLE_BYTES, or SHARED_TABLE_BYTES with the shared table), and
    for the codebook kernel with a staging ring, cfg["warps"] rings of cfg["ring"] stages after it (a tile's key and
    value rows and 16 + 16 fp16 scales, ``cuda_source`` RING)."""
    table = SHARED_TABLE_BYTES if _shared_table(kb, vb, groups, cfg) else TABLE_BYTES
    if groups is not None or not cfg["ring"]:
        return table
    stage = TILE * (d * kb // 8 + d * vb // 8) + 4 * TILE
    return table + cfg["warps"] * cfg["ring"] * stage


def _source(d: int, kb: int, vb: int, bf16: bool, groups: tuple[int, int] | None = None, cfg: dict | None = None):
    """(CUDA source, kernel name) for head_dim `d`, key / value bits, the model dtype; `groups` =
    (tokens a key group, channels a value group) gives the affine kernel, None the codebook kernel; the placeholders
    filled from `cfg` (default CUDA_PLAN). Apart from ``_build`` so that the source can be checked without a GPU."""
    cfg = CUDA_PLAN if cfg is None else cfg
    src, name = (CODEBOOK_SPLIT_SOURCE, "codebook_split") if groups is None else (AFFINE_SPLIT_SOURCE, "affine_split")
    fill = {"__D__": d, "__KB__": kb, "__VB__": vb, "__NWARPS__": cfg["warps"], "__BF16__": int(bf16),
            "__CHAINS__": int(cfg["two_chains"]), "__LAZY__": int(cfg["lazy_rescale"]), "__DEPTH__": cfg["depth"],
            "__RING__": cfg["ring"], "__MINB__": cfg["min_blocks"], "__SHARED__": _shared_table(kb, vb, groups, cfg)}
    if groups is not None:
        fill.update({"__KG__": groups[0], "__VG__": groups[1]})
    for placeholder, value in fill.items():
        src = src.replace(placeholder, str(value))
    return src, name


def _build(d: int, kb: int, vb: int, bf16: bool, groups: tuple[int, int] | None = None, cfg: dict | None = None):
    """The compiled kernel of ``_source(...)``, its shared memory (the byte tables) set; cached by the arguments and
    the plan keys the source is built from (a sweep of `waves` or `min_tokens` reuses the build)."""
    cfg = CUDA_PLAN if cfg is None else cfg
    key = (d, kb, vb, bf16, groups, *(cfg[k] for k in COMPILED_PLAN_KEYS))
    if key in _KERNELS:
        return _KERNELS[key]
    kernel = torch.cuda._compile_kernel(*_source(d, kb, vb, bf16, groups, cfg))
    kernel.set_shared_memory_config(shared_bytes(d, kb, vb, groups, cfg))
    _KERNELS[key] = kernel
    return kernel


def _per_token_scale(view) -> bool:
    return view.scale.dim() == 3 or view.scale.shape[-1] == 1


def _groups(keys, values) -> tuple[int, int] | None:
    """(key group tokens, value group channels) of an affine pair, None for a codebook pair."""
    return None if isinstance(keys, CodebookPacked) else (keys.group_size, values.group_size)


def _contiguous_tokens(t: torch.Tensor) -> bool:
    """Token n + 1 of `t` ([B, H, N, ...] or [B, H, N/G, G, ...]) starts where token n ends: the axes after the first
    two are row-major (the kernels step through tokens with compile-time strides)."""
    expected = 1
    for axis in range(t.dim() - 1, 1, -1):
        if t.shape[axis] != 1 and t.stride(axis) != expected:
            return False
        expected *= t.shape[axis]
    return True


def _pair_fits(d: int, keys, values) -> bool:
    """The format pair and its grouping fit a kernel: codebook keys and values with a per-token scale, or affine
    keys whose groups are whole tiles and values whose groups hold a lane's D/8 coordinates; codes and per-token
    metadata with their token rows back to back (how the caches store them)."""
    if isinstance(keys, CodebookPacked) and isinstance(values, CodebookPacked):
        return (_per_token_scale(keys) and _per_token_scale(values) and _contiguous_tokens(keys.codes)
                and _contiguous_tokens(values.codes) and _contiguous_tokens(keys.scale)
                and _contiguous_tokens(values.scale))
    if isinstance(keys, ChannelAffinePacked) and isinstance(values, TokenAffinePacked):
        return (keys.group_size % TILE == 0 and values.group_size % (d // 8) == 0
                and values.scale.stride(-1) == 1 and keys.scale.stride(-1) == 1
                and _contiguous_tokens(keys.codes) and _contiguous_tokens(values.codes)
                and _contiguous_tokens(values.scale) and values.zero.stride() == values.scale.stride())
    return False


def _formats_fit(keys, values, dtype: torch.dtype) -> bool:
    """The formats, widths, head dim and model dtype fit a kernel of this module (what ``supported`` asks before the
    launch-time conditions: group size, token count, alignment, a build)."""
    d = keys.head_dim
    return (dtype in HALF_DTYPES and d in HEAD_DIMS and values.head_dim == d and _pair_fits(d, keys, values)
            and keys.bits in BITS and values.bits in BITS)


def supported(q, keys, values, min_tokens: int | None = None) -> bool:
    """Whether a kernel of this module covers the pair (and compiles here): codebook keys and values with a
    per-token scale, or KIVI's affine keys and values (``_pair_fits``), of 1, 2 or 4 bits, one head_dim of 64 / 128 /
    256 for both (keys and values of different head dims go to the Triton split kernel),
    at most 8 query heads per KV head, a 16-bit model, and at least `min_tokens` (default: the pair's entry of
    MIN_TOKENS) packed tokens (views' num_tokens: the capacity under device lengths)."""
    d = q.shape[-1]
    if not _formats_fit(keys, values, q.dtype):
        return False
    if q.shape[1] // keys.codes.shape[1] > MAX_GROUP or not hasattr(torch.cuda, "_compile_kernel"):
        return False
    groups = _groups(keys, values)
    if keys.num_tokens < (MIN_TOKENS[type(keys)] if min_tokens is None else min_tokens):
        return False
    for view, lane_bytes in ((keys, d * keys.bits // 32), (values, d * values.bits // 64)):  # vector-load alignment
        align = min(lane_bytes, VECTOR_BYTES)
        token_stride = view.codes.stride(-2)
        if token_stride % align or view.codes.stride(2) % align or view.codes.stride(-1) != 1:
            return False
        if view.codes.data_ptr() % VECTOR_BYTES:
            return False
    # the key scales' loads (4-byte pairs since 2026-12-03; the earlier 8-byte bound is kept)
    if groups is not None and (keys.scale.stride(2) % 4 or keys.scale.data_ptr() % 8):
        return False
    key = (d, keys.bits, values.bits, q.dtype, groups)
    if key in _FAILED:
        return False
    try:
        _build(d, keys.bits, values.bits, q.dtype == torch.bfloat16, groups, plan_for(keys, values))
    except Exception as exc:  # noqa: BLE001 - no NVRTC, or it cannot build here: the Triton kernel runs instead
        _FAILED[key] = repr(exc)
        return False
    return True


def _word_table(view, dtype, side: str) -> torch.Tensor:
    """The byte table of one side ("k" or "v") as 32-bit words [256, 4/b] (pairs of 16-bit values), cached: its
    codebook's levels in `dtype`, or the integers 0 .. 2^b - 1 for an affine view (fp16 on the key side, whose mma
    runs in fp16: ``cuda_affine_source``); the code slots in the order the side's decoder reads them (VALUE_SLOTS)."""
    from .. import packing
    from .triton_split import integer_levels

    affine = not isinstance(view, CodebookPacked)
    levels = integer_levels(view.bits, view.codes.device) if affine else view.levels
    dtype = torch.float16 if affine and side == "k" else dtype
    slots = list(VALUE_SLOTS[view.bits] if side == "v" else range(8 // view.bits))
    def build():
        return packing.byte_table(levels.float(), view.bits, dtype)[:, slots].contiguous().view(torch.int32)

    return derived(levels, ("words", view.bits, dtype, side), build)


def keep_constants(keys, values, dtype) -> None:
    """Compute and keep both sides' word tables (``triton_split.keep_constants``, for this kernel), where its
    kernels take the pair."""
    if not _formats_fit(keys, values, dtype):
        return
    _word_table(keys, dtype, "k")
    _word_table(values, dtype, "v")
    _tables_equal(keys, values)  # plan_for's shared-table test: its one comparison, outside any graph


def _launch(kernel, grid, block, shared, args):
    """cuLaunchKernel with pointer (tensor or None), int and float arguments, on the current stream."""
    from torch.cuda._utils import _check_cuda, _get_gpu_runtime_library

    holders = []
    for a in args:
        if a is None:
            holders.append(ctypes.c_void_p(0))
        elif isinstance(a, torch.Tensor):
            holders.append(ctypes.c_void_p(a.data_ptr()))
        elif isinstance(a, float):
            holders.append(ctypes.c_float(a))
        else:
            holders.append(ctypes.c_int(int(a)))
    arr = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.byref(x), ctypes.c_void_p) for x in holders])
    stream = torch.cuda.current_stream()
    _check_cuda(_get_gpu_runtime_library().cuLaunchKernel(kernel.func, grid[0], grid[1], grid[2], block[0], 1, 1,
                                                           shared, stream._as_parameter_, arr, None))


def resident_blocks(kernel, shared: int, warps: int) -> int:
    """Blocks of `kernel` (of `warps` warps) one SM holds at once (registers and shared memory), from the driver;
    cached."""
    key = (id(kernel), shared, warps)
    if key not in _RESIDENT:
        from torch.cuda._utils import _get_gpu_runtime_library

        n = ctypes.c_int(0)
        _get_gpu_runtime_library().cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(n), kernel.func, ctypes.c_int(warps * 32), ctypes.c_size_t(shared))
        _RESIDENT[key] = max(1, n.value)
    return _RESIDENT[key]


def plan(bh: int, n_tokens: int, resident: int, cfg: dict | None = None) -> tuple[int, int]:
    """(splits, tokens per split, a multiple of TILE): whole blocks of cfg["warps"] splits, as many as cfg["waves"]
    full waves of resident blocks hold (a partial last wave measured up to 10% slower), but no split shorter than
    cfg["min_tokens"]; `cfg` defaults to CUDA_PLAN."""
    cfg = CUDA_PLAN if cfg is None else cfg
    warps = cfg["warps"]
    by_tokens = cdiv(max(n_tokens, 1), cfg["min_tokens"] * warps)
    blocks = max(1, min(cfg["waves"] * resident // bh, by_tokens))
    per = cdiv(cdiv(max(n_tokens, 1), TILE), blocks * warps) * TILE
    return cdiv(max(n_tokens, 1), per), per


def split_partials(q, keys, values, key_mask, scale_log2: float, lengths=None, bound: int | None = None):
    """``triton_split.split_partials`` on this module's kernels: q [B, Hq, D] in the keys' domain (16-bit model
    dtype); the pair must be ``supported``."""
    b, hq, d = q.shape
    hkv = keys.codes.shape[1]
    g = hq // hkv
    n_q = keys.num_tokens if bound is None else bound
    groups = _groups(keys, values)
    cfg = plan_for(keys, values)
    kernel = _build(d, keys.bits, values.bits, q.dtype == torch.bfloat16, groups, cfg)
    shared = shared_bytes(d, keys.bits, values.bits, groups, cfg)
    splits, per = plan(b * hkv, n_q, resident_blocks(kernel, shared, cfg["warps"]) * sm_count(q.device), cfg)
    m, l_, acc = partials(b * hkv, splits, g, d, q.device)
    tk = _word_table(keys, q.dtype, "k")
    tv = tk if _shared_table(keys.bits, values.bits, groups, cfg) else _word_table(values, q.dtype, "v")  # not read
    kc, ks, vc, vs = keys.codes, keys.scale, values.codes, values.scale
    mask = None if key_mask is None else (key_mask if key_mask.dtype == torch.uint8 else key_mask.view(torch.uint8))
    # token strides are compile-time (``_pair_fits``): the batch and head strides, and the affine keys' group stride
    if groups is None:
        from .triton_split import key_mean

        pointers = [q.view(torch.int16), key_mean(keys, d), kc, ks, vc, vs, tk, tv, mask, lengths, m, l_, acc]
        key_strides = [kc.stride(0), kc.stride(1), ks.stride(0), ks.stride(1)]
    else:
        pointers = [q.view(torch.int16), kc, ks, keys.zero, vc, vs, values.zero, tk, tv, mask, lengths, m, l_, acc]
        key_strides = [kc.stride(0), kc.stride(1), ks.stride(0), ks.stride(1), ks.stride(2)]
    warps = cfg["warps"]
    _launch(kernel, (cdiv(splits, warps), b * hkv, 1), (warps * 32,), shared, pointers + [
        n_q, per, splits, hkv, g, *key_strides, vc.stride(0), vc.stride(1), vs.stride(0), vs.stride(1),
        0 if mask is None else mask.stride(0), 0 if mask is None else mask.stride(1), float(scale_log2),
    ])
    return m, l_, acc
