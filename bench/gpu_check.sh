#!/usr/bin/env bash
# On a GPU machine whose python3 already has torch, pytest, transformers and peft (no network):
# build the extension, run the CUDA tests, then the layer bench (JSON, PNG, markdown) and the
# model bench. Logs, JSON and the plot go to $OUT (default bench/results). Under 10 minutes on
# an H100/H200. FULL_TESTS=1 also runs the rest of the suite.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export SOSLORA_CUDA_ARCH=${SOSLORA_CUDA_ARCH:-9.0}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
stage() { echo "== $1 ($(date +%T), ${SECONDS}s)"; }

stage build
python3 -m pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
tail -1 "$OUT/build.log"

stage tests
tests=("$PWD/tests/test_cuda.py")
[ "${FULL_TESTS:-0}" = 1 ] && tests=("$PWD/tests")
(cd /tmp && python3 -m pytest -q -p no:cacheprovider --timeout 300 "${tests[@]}") 2>&1 \
  | tee "$OUT/tests.log" | tail -30
tests_rc=${PIPESTATUS[0]}

stage "layer bench"
python3 bench/bench_layer.py --json "$OUT/bench_layer.json" --png "$OUT/bench_layer.png" "$@" \
  2>&1 | tee "$OUT/bench_layer.log" | grep -v "^done "
layer_rc=${PIPESTATUS[0]}

stage "model bench"
python3 bench/bench_model.py --json "$OUT/bench_model.json" 2>&1 | tee "$OUT/bench_model.log" | tail -12
model_rc=${PIPESTATUS[0]}

stage end
echo "tests rc=$tests_rc layer bench rc=$layer_rc model bench rc=$model_rc"
exit $(( tests_rc || layer_rc || model_rc ))
