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

echo "== GPU tests"
t0=$SECONDS
timeout 150 python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_gem_kernels.py tests/test_rerank_triton.py tests/test_rerank.py \
  -k "cuda or gpu or triton or interp" 2>&1 | tail -25
echo "GPU tests took $((SECONDS - t0)) s"

echo "== benchmarks"
t0=$SECONDS
timeout 230 python3 bench/report.py bench/bench_head.py bench/bench_rerank_gpu.py \
  -k "cuda" --json "$out/bench.json" --benchmark-min-rounds=5 --benchmark-max-time=0.5 2>&1 | tail -60
echo "benchmarks took $((SECONDS - t0)) s"

echo "== device: $(python3 -c 'import torch; print(torch.cuda.get_device_name())')"
