#!/usr/bin/env bash
# The GPU check, in stages that can be run one call at a time (GPU time comes in short slots):
#
#   bench/gpu_check.sh                      # every stage: build tests grads layer model products summary
#   bench/gpu_check.sh build tests          # only these, in this order
#
#   build    pip-installs the extension for the detected GPU's architecture only
#   tests    tests/ops/test_cuda.py, test_cuda_cluster.py and tests/system/test_build.py (the
#            build itself: registrations, the C++ runtime it links, an op error raising in a
#            fresh process); FULL_TESTS=1: every test
#   grads    bench/bench_output_grads.py: the one-pass output-gradient kernel against its two
#            cuBLAS products, N=8192, out 4096 and 11008, r=64, bf16 (about a minute)
#   layer    bench/bench_layer.py (LAYER_ARGS adds arguments, e.g. "--n 8192 --iters 10")
#   model    bench/bench_model.py
#   products bench/bench_products.py: each product kernel and the cluster op against its cuBLAS
#            composition (4096x4096, 4096<->11008, N = 8192, r = 64, bf16; PRODUCTS_ARGS adds)
#   summary  bench/gpu_summary.py: one JSON + markdown naming the machine, each stage's time and
#            status, and each performance target met or not
#
# Results accumulate in RESULTS (default bench/results) across calls; each stage prints its time
# and, when OUT is set, copies what it wrote there. GPU_CHECK_DRY=1 runs the same logic on the CPU
# with tiny sizes and without a build (CI does this, so a typo cannot waste GPU time).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-bench/results}
DRY=${GPU_CHECK_DRY:-0}
PY=${PYTHON:-python3}
[[ "$PY" == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # the tests stage runs from /tmp
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd)
export PYTHONUNBUFFERED=1

stage_build() {
  if [ "$DRY" = 1 ]; then echo "dry run: no build"; return 0; fi
  local arch
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)
  export SOSLORA_CUDA_ARCH=${SOSLORA_CUDA_ARCH:-$arch}
  echo "building for sm ${SOSLORA_CUDA_ARCH}"
  # The lent image's Python and torch (3.12, 2.11 when last seen) are outside the matrix that
  # `make compat` tests here: this run is the check for them, so their claim is not enforced.
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  MAX_JOBS=$(nproc) CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PY" -m pip install --no-build-isolation --no-deps --ignore-requires-python . \
    > "$RESULTS/build.log" 2>&1
  local rc=$?
  tail -25 "$RESULTS/build.log"
  "$PY" -c "import soslora_ext as s; assert s.built_with_cuda, 'built without CUDA'" || rc=1
  return $rc
}

stage_tests() {
  local tests=("$PWD/tests/ops/test_cuda.py" "$PWD/tests/ops/test_cuda_cluster.py"
               "$PWD/tests/system/test_build.py")
  [ "${FULL_TESTS:-0}" = 1 ] && tests=("$PWD/tests")
  (cd /tmp && "$PY" -m pytest -q -rfE -p no:cacheprovider --junitxml="$RESULTS/tests.xml" \
    "${tests[@]}") 2>&1 | tee "$RESULTS/tests.log" | tail -60
  return "${PIPESTATUS[0]}"
}

stage_grads() {
  local args=()
  [ "$DRY" = 1 ] && args=(--device cpu --n 64 --outs 40 --ranks 8 --warmup 1 --iters 2)
  "$PY" bench/bench_output_grads.py "${args[@]}" --json "$RESULTS/bench_output_grads.json" 2>&1 \
    | tee "$RESULTS/bench_output_grads.log" | tail -12
  return "${PIPESTATUS[0]}"
}

stage_layer() {
  local args=()
  [ "$DRY" = 1 ] && args=(--device cpu --n 64 --shapes 48x40 --ranks 8 --dropout 0.1
                          --warmup 1 --iters 1)
  # shellcheck disable=SC2206
  "$PY" bench/bench_layer.py "${args[@]}" ${LAYER_ARGS:-} --json "$RESULTS/bench_layer.json" \
    --png "$RESULTS/bench_layer.png" 2>&1 | tee "$RESULTS/bench_layer.log" | grep -v "^done "
  return "${PIPESTATUS[0]}"
}

stage_model() {
  local args=()
  [ "$DRY" = 1 ] && args=(--device cpu --tiny --warmup 1 --iters 1)
  "$PY" bench/bench_model.py "${args[@]}" --json "$RESULTS/bench_model.json" 2>&1 \
    | tee "$RESULTS/bench_model.log" | tail -12
  return "${PIPESTATUS[0]}"
}

stage_products() {
  local args=()
  [ "$DRY" = 1 ] && args=(--device cpu --n 64 --shapes 48x40 --r 8 --warmup 1 --iters 1)
  # shellcheck disable=SC2206
  "$PY" bench/bench_products.py "${args[@]}" ${PRODUCTS_ARGS:-} \
    --json "$RESULTS/bench_products.json" 2>&1 | tee "$RESULTS/bench_products.log" | grep -v "^done "
  return "${PIPESTATUS[0]}"
}

stage_summary() {
  "$PY" bench/gpu_summary.py "$RESULTS"
}

stages=("$@")
[ ${#stages[@]} = 0 ] && stages=(build tests grads layer model products summary)
for s in "${stages[@]}"; do
  declare -F "stage_$s" > /dev/null || { echo "unknown stage '$s' (build tests grads layer model products summary)"; exit 2; }
done
if [ "$DRY" != 1 ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
    | tee "$RESULTS/gpu.txt"
fi

status=0
for s in "${stages[@]}"; do
  echo "== $s ($(date +%T))"
  start=$SECONDS
  "stage_$s"
  rc=$?
  echo "== $s: rc=$rc, $((SECONDS - start)) s"
  printf '%s\t%s\t%s\n' "$s" "$rc" "$((SECONDS - start))" >> "$RESULTS/stages.tsv"
  [ "$rc" = 0 ] || status=1
done
if [ -n "${OUT:-}" ]; then  # what the caller takes back (at most a few files)
  for f in stages.tsv tests.log build.log bench_output_grads.json bench_layer.json \
           bench_layer.png bench_model.json bench_products.json summary.json summary.md; do
    [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/"
  done
fi
exit $status
