"""Compile the CUDA split kernels offline (no GPU) and count the SASS instructions of their tile loop.

What docs/RESULTS.md's eleventh pass used to cut the instructions a tile before any GPU time: NVRTC turns
``cuda_split._source(...)`` into PTX for sm_90, ptxas reports registers and spills, cuobjdump + nvdisasm give the
SASS, and the largest backward branch of the kernel is its tile loop (with the register prefetch two tiles a pass,
with the staging ring one). Static counts: conditional blocks (a new KIVI key group, a padded batch's mask) are
counted whether or not they run.

The tools come from NVIDIA's pip wheels, unpacked anywhere (``--tools``)::

    pip download --no-deps -d /tmp/cudatools nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12 \
        nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
    cd /tmp/cudatools && for w in *.whl; do unzip -qo "$w" -d x; done

Usage::

    python scripts/inspect_cuda_sass.py --tools /tmp/cudatools/x --case 128,4,4,bf16 --plan warps=8,ring=3
    python scripts/inspect_cuda_sass.py --tools /tmp/cudatools/x --case 128,2,2,bf16,32,32 --listing
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import glob
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def find(tools: str, pattern: str) -> str:
    hits = sorted(glob.glob(os.path.join(tools, "**", pattern), recursive=True))
    if not hits:
        raise SystemExit(f"--tools {tools!r}: no {pattern} under it (see this script's docstring for the wheels)")
    return hits[-1]


def nvrtc_ptx(lib: ctypes.CDLL, src: str, name: str) -> str:
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), f"{name}.cu".encode(), 0, None, None):
        raise SystemExit("nvrtcCreateProgram failed")
    opts = [b"--gpu-architecture=compute_90", b"-default-device"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc:
        raise SystemExit(f"NVRTC failed:\n{log.value.decode()[:4000]}")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value.decode()


def tile_loop(listing: list[tuple[int, str]]) -> list[str]:
    """The instructions of the largest backward branch's body."""
    best = None
    for addr, text in listing:
        m = re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr and (best is None or addr - int(m.group(1), 16) > best[1] - best[0]):
            best = (int(m.group(1), 16), addr)
    if best is None:
        raise SystemExit("no loop found in the SASS")
    return [t for a, t in listing if best[0] <= a <= best[1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tools", required=True, help="folder holding the unpacked NVIDIA wheels")
    ap.add_argument("--case", default="128,4,4,bf16",
                    help="head_dim,key bits,value bits,bf16|fp16[,key group tokens,value group channels] (the two "
                         "groups select the affine kernel)")
    ap.add_argument("--plan", default="", help="CUDA_PLAN overrides, e.g. warps=8,lazy_rescale=1,ring=3")
    ap.add_argument("--listing", action="store_true", help="also print the loop's SASS")
    args = ap.parse_args()
    from tq_transformers.kernels import cuda_split

    parts = args.case.split(",")
    if len(parts) not in (4, 6) or parts[3] not in ("bf16", "fp16"):
        ap.error(f"--case: head_dim,kb,vb,bf16|fp16[,kg,vg], got {args.case!r}")
    d, kb, vb = (int(p) for p in parts[:3])
    groups = (int(parts[4]), int(parts[5])) if len(parts) == 6 else None
    cfg = dict(cuda_split.CUDA_PLAN)
    for item in filter(None, args.plan.split(",")):
        key, value = item.split("=")
        if key not in cfg:
            ap.error(f"--plan: {key!r} is not a CUDA_PLAN key ({sorted(cfg)})")
        cfg[key] = int(value)
    src, name = cuda_split._source(d, kb, vb, parts[3] == "bf16", groups, cfg)
    ptx = nvrtc_ptx(ctypes.CDLL(find(args.tools, "libnvrtc.so.*[0-9]")), src, name)
    env = dict(os.environ, PATH=os.path.dirname(find(args.tools, "nvdisasm")) + os.pathsep + os.environ["PATH"])
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        info = subprocess.run([find(args.tools, "ptxas"), "-arch=sm_90", "-v", ptx_path, "-o", cubin],
                              capture_output=True, text=True, check=True)
        sass = subprocess.run([find(args.tools, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              env=env, check=True).stdout
    for line in (info.stdout + info.stderr).splitlines():
        if "Used" in line or "spill" in line:
            print(line.split("info    : ")[-1].strip())
    listing = [(int(m.group(1), 16), m.group(2).strip()) for m in
               (re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines()) if m]
    body = tile_loop(listing)
    counts = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)
    print(f"{name} {args.case} {cfg}: {len(body)} instructions in the tile loop")
    for op, n in counts.most_common():
        print(f"  {op:28s}{n}")
    if args.listing:
        print("\n".join(body))


if __name__ == "__main__":
    main()
