#!/usr/bin/env bash
# The GPU checks in one command, for a machine with a CUDA GPU (one H200 in docs/RESULTS.md): correctness first, then
# the speed figures the README quotes, each step under its own time limit so one slow step cannot eat the others.
#
#     bash scripts/gpu_checks.sh results/gpu            # writes tests.log, bench/, step/, prefill/ under that folder
#
# Steps (each under a limit, 920 s in all at most; the benchmarks on the Llama-3.1-8B shape with random bf16 weights):
#   1. the GPU tier except the kernel file (graphs, fast path, fusion, compile): pytest -m "gpu and not real_model";
#   2. the grouped GEMM's tests (tests/test_projections.py), then the kernel file's CUDA / plan / layout cases;
#   3. scripts/benchmark_speed.py at 32K, batches 1 and 8: DynamicCache, TurboQuant-4 with cuBLAS projections (the
#      grouped GEMM's comparison), the three caches and the first-budget preset
#      (sinks, a fractional value rate) under CUDA graphs with fuse=True (per-token decode, prefill, peak memory, the
#      physical floor);
#   4. scripts/profile_decode_step.py: where a fused graph step's GPU time goes (top kernels), 1 x 32K and 8 x 32K;
#   5. scripts/profile_prefill.py: a 1 x 32K prefill's GPU time against its wall time.
# Environment: TESTS_S / KERNELS_S / BENCH_S / STEP_S / PREFILL_S (the limits), BENCH_CACHES / STEP_CACHES (cache
# names of scripts/benchmark_speed.py), WORKERS (pytest-xdist workers; 0: none).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/gpu}"
mkdir -p "$out"
workers="${WORKERS:-8}"
bench_default=dynamic,turboquant4_graph_fused_cublas,turboquant4_graph_fused,kivi2_graph_fused,bonsai1_graph_fused,tq_k4v2.875_s4_f64_graph_fused
xdist=()
if [ "$workers" != 0 ] && python3 -c "import xdist" 2>/dev/null; then xdist=(-n "$workers"); fi
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run under a limit, log to $out/NAME.log, print the tail and the time
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$out/$name.log"
  echo "== $name: rc=$rc, $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  >> "$out/gpu.txt" 2>&1
git log --oneline -1 >> "$out/gpu.txt" 2>/dev/null
cat "$out/gpu.txt"

step tests "${TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider "${xdist[@]}" -m "gpu and not real_model" \
  --ignore=tests/test_kernels.py tests
step gemv 60 python3 -m pytest -q -p no:cacheprovider tests/test_projections.py
step kernels "${KERNELS_S:-180}" python3 -m pytest -q -p no:cacheprovider "${xdist[@]}" tests/test_kernels.py \
  -k "plan_variants or overrides or decode_layout or (cuda and (decode_matches or device_lengths))"
step bench "${BENCH_S:-200}" python3 scripts/benchmark_speed.py --out "$out/bench" --contexts 32768 --skip-kernels \
  --no-hf --rounds 2 --decode-steps 16 \
  --caches "${BENCH_CACHES:-$bench_default}"
step step "${STEP_S:-150}" python3 scripts/profile_decode_step.py --out "$out/step" --points 1x32768,8x32768 \
  --caches "${STEP_CACHES:-dynamic,turboquant4_graph_fused,bonsai1_graph_fused}" --no-layer-call --steps 8
step prefill "${PREFILL_S:-90}" python3 scripts/profile_prefill.py --out "$out/prefill" \
  --caches dynamic,turboquant4_graph
