#!/usr/bin/env bash
# The GPU check (DESIGN.md, "On a GPU machine"): one short run, no network, only the packages such a
# machine already has (torch, Triton, pytest, pytest-benchmark, onnxruntime CPU). It installs sgengine
# in place, runs the GPU test subset, then the benchmark table, and ends with the device name.
#
#   bash bench/gpu_check.sh [OUTDIR]      # default OUTDIR: bench/results/<date>-<gpu>
#
# Everything it prints is also written to OUTDIR/gpu_check.log; the raw benchmark JSON goes beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo no-gpu)
out=${1:-bench/results/$(date -u +%Y-%m-%d)-$gpu}
mkdir -p "$out"
log="$out/gpu_check.log"
exec > >(tee "$log") 2>&1

echo "== sgengine GPU check, $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

echo "== install (editable, no network)"
t0=$SECONDS
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v -i "warning" | tail -5
echo "install took $((SECONDS - t0)) s"

echo "== GPU tests (interpreter suites excluded: CI runs them on the CPU with Triton 3.9)"
t0=$SECONDS
timeout 150 python3 -m pytest -q -p no:cacheprovider \
  tests/test_gem_kernels.py tests/test_rerank_triton.py tests/test_search.py \
  -k "(cuda or gpu) and not interpreter_suite" 2>&1 | tail -25
echo "GPU tests took $((SECONDS - t0)) s"

# One pytest run per suite, each with its own JSON and time limit: a suite that runs long loses
# only its own table (the 2026-11-27 run lost everything to one limit). Head first: it is the
# number still missing.
bench() {  # name, time limit (s), suite, pytest -k expression
  local t0=$SECONDS
  echo "== benchmark: $1"
  timeout "$2" python3 bench/report.py "$3" -k "$4" --json "$out/$1.json" \
    --benchmark-min-rounds=3 --benchmark-max-time=0.2 --benchmark-warmup=on 2>&1 | grep -v "^\.*$" | tail -40
  echo "$1 took $((SECONDS - t0)) s"
}
bench head_gpu 90 bench/bench_head.py "cuda"
bench rerank_gpu 150 bench/bench_rerank_gpu.py "cuda and not M1600"
bench rerank_gpu_m1600 90 bench/bench_rerank_gpu.py "cuda and M1600 and not chain"

echo "== device: $(python3 -c 'import torch; print(torch.cuda.get_device_name())')"
