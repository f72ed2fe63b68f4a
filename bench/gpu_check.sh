#!/usr/bin/env bash
# On a GPU machine whose python3 already has torch, pytest and transformers (no network):
# build the extension, run the whole test suite (the CUDA tests included) and the layer bench.
# Logs and JSON go to $OUT (default bench/results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export SOSLORA_CUDA_ARCH=${SOSLORA_CUDA_ARCH:-9.0}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== build"
python3 -m pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
tail -1 "$OUT/build.log"

echo "== tests"
(cd /tmp && python3 -m pytest -q -p no:cacheprovider "$OLDPWD/tests") 2>&1 | tee "$OUT/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

echo "== bench"
python3 bench/bench_layer.py --json "$OUT/bench_layer.json" "$@" 2>&1 | tee "$OUT/bench.log" | tail -30
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
