#!/usr/bin/env bash
# How the installed module links the C++ runtime on this machine, and whether an op error raises:
# for the GPU image where every op error used to crash the process (docs/building.md, "How the
# module links the C++ runtime"). Run it after bench/gpu_check.sh's build stage (or any install):
#
#   bench/gpu_link_probe.sh                 # PYTHON (default python3) must import soslora_ext
#
# It writes RESULTS/link_probe.txt (default bench/results) and, when OUT is set, copies it there:
#   - the machine: GPU (nvidia-smi, when present), the compiler (c++ -v, the head of gcc's specs
#     and its libgcc/libstdc++ lines), the flags in the environment, what the build log says it
#     removed (RESULTS/build.log, written by gpu_check.sh's build stage)
#   - the module: its NEEDED entries, the C++ runtime it resolves to (ldd), the runtime symbols it
#     defines (should be none) and cmake/CheckCxxRuntime.cmake's verdict (when cmake is found)
#   - the probe's symbol bindings (LD_DEBUG=bindings: __cxa_throw, __gxx_personality_v0,
#     _Unwind_RaiseException, _Unwind_Resume) and the probe itself, plus three other op errors
# Exit status: 0 when the module keeps the rule and every op error raises a RuntimeError whose
# message keeps its numbers; 1 otherwise. Nothing here needs a GPU: on a CPU machine it runs the
# same (tests/system/test_build.py runs it there).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RESULTS=${RESULTS:-bench/results}
PY=${PYTHON:-python3}
[[ "$PY" == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # runs from /tmp
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd)
REPORT=$RESULTS/link_probe.txt
: > "$REPORT"
status=0

section() { printf '\n== %s\n' "$*" | tee -a "$REPORT"; }
record() { tee -a "$REPORT"; }   # stdin to the report and the terminal

section "machine"
{
  date -u +%FT%TZ
  uname -srm
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader
  else
    echo "no nvidia-smi (CPU machine)"
  fi
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__)"
  for v in CC CXX CFLAGS CXXFLAGS LDFLAGS CUDAFLAGS CMAKE_ARGS; do echo "$v=${!v-}"; done
} 2>&1 | record

section "compiler: c++ -v"
CXX_BIN=$(command -v "${CXX:-c++}" || command -v g++ || true)
if [ -n "$CXX_BIN" ]; then
  "$CXX_BIN" -v 2>&1 | record
  section "compiler: specs (head, then the runtime lines)"
  specs=$("$CXX_BIN" -dumpspecs 2>&1)
  { echo "$specs" | head -25
    echo "..."
    echo "$specs" | grep -n -A1 -E '^\*(libgcc|link_libgcc|lib|startfile|link_gcc_c_sequence):'
  } | record
else
  echo "no C++ compiler on PATH" | record
fi
if [ -f "$RESULTS/build.log" ]; then
  section "build log: flags the build removed, the check's verdict"
  grep -E "removed \`|soslora_ext: .*(links libstdc|refusing)|C\+\+ runtime" "$RESULTS/build.log" \
    | record
fi

section "module"
MODULE=$(cd /tmp && "$PY" -c "import soslora_ext._C as c; print(c.__file__)" 2>&1 | tail -1)
if [ ! -f "$MODULE" ]; then
  echo "soslora_ext does not import: $MODULE" | record
  [ -n "${OUT:-}" ] && cp "$REPORT" "$OUT/"
  exit 1
fi
{
  echo "$MODULE"
  echo "-- NEEDED"
  readelf -d -W "$MODULE" | grep NEEDED
  echo "-- ldd (the C++ runtime and unwinder it resolves to)"
  ldd "$MODULE" | grep -E 'libstdc\+\+|libgcc_s'
  echo "-- C++ runtime symbols it defines (should be none)"
  nm -D --defined-only "$MODULE" | grep -E ' (__cxa_|__gxx_personality_|_Unwind_)' | head -20
  echo "-- C++ runtime symbols it imports"
  nm -D --undefined-only "$MODULE" \
    | grep -E ' (__cxa_throw|__gxx_personality_v0|_Unwind_Resume|_Unwind_RaiseException)' || true
} 2>&1 | record
CMAKE_BIN=$(command -v "$(dirname "$PY")/cmake" || command -v cmake || true)
if [ -n "$CMAKE_BIN" ]; then
  cp "$MODULE" "$RESULTS/module-copy.so"  # the check deletes a module that breaks the rule
  "$CMAKE_BIN" -DMODULE="$RESULTS/module-copy.so" -P "$ROOT/cmake/CheckCxxRuntime.cmake" 2>&1 \
    | record
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  rm -f "$RESULTS/module-copy.so"
else
  echo "no cmake: the rule is not checked (the lines above show it)" | record
fi

PROBE='import torch, soslora_ext; torch.ops.soslora.ortho_penalty(torch.randn(5, 4), 2)'
section "symbol bindings of the probe (LD_DEBUG=bindings)"
bindings=$(cd /tmp && LD_DEBUG=bindings "$PY" -c "$PROBE" 2>&1 \
  | grep -E "\`(__cxa_throw|__gxx_personality_v0|_Unwind_RaiseException|_Unwind_Resume)'" \
  | sed -E 's/^ *[0-9]+: *//; s#/[^ ]*/##g')
{ echo "-- the module's own ($(basename "$MODULE"))"
  echo "$bindings" | grep -F "binding file $(basename "$MODULE")"
  echo "-- who provides each symbol, for how many libraries"
  echo "$bindings" | sed -E "s/.* to ([^ ]+) .*symbol \`([^']+)'.*/\2 from \1/" | sort | uniq -c
} | record

section "probe: python -c \"$PROBE\""
out=$(cd /tmp && "$PY" -c "$PROBE" 2>&1)
rc=$?
{ echo "$out" | tail -3; echo "rc=$rc"; } | record
if [ "$rc" = 1 ] && echo "$out" | grep -q "A.size(0) = 5 must be divisible by num_experts = 2"; then
  echo "probe: a clean RuntimeError that keeps its numbers" | record
else
  echo "probe: FAILED (rc=$rc; a crash is rc 134 or 139, a message without numbers a" \
       "split C++ runtime)" | record
  status=1
fi

section "other op errors"
read -r -d '' OTHERS <<'EOF'
import torch

import soslora_ext  # noqa: F401

ops = torch.ops.soslora
calls = {
    "dropout_mask": (lambda: ops.dropout_mask(torch.zeros(2, dtype=torch.long), [3, 4], 1.5,
                                              torch.float32), "got 1.5"),
    "ortho_penalty 3-D": (lambda: ops.ortho_penalty(torch.randn(3, 4, 2), 1), "[3, 4, 2]"),
    "lowrank_forward": (lambda: ops.lowrank_forward(torch.randn(6, 4), torch.randn(2, 5),
                                                    torch.randn(3, 2), torch.ones(1), None, None,
                                                    0.0, False), "x.size(1) = 4"),
}
bad = 0
for name, (call, expected) in calls.items():
    try:
        call()
        print(f"{name}: no error")
        bad += 1
    except RuntimeError as e:
        message = str(e).splitlines()[0]
        bad += expected not in message
        print(f"{name}: {'ok' if expected in message else 'MESSAGE LOST ITS NUMBERS'}: {message}")
raise SystemExit(bad)
EOF
out=$(cd /tmp && "$PY" -c "$OTHERS" 2>&1)
rc=$?
{ echo "$out" | tail -4; echo "rc=$rc"; } | record
[ "$rc" = 0 ] || status=1

section "result: $([ $status = 0 ] && echo ok || echo FAILED)"
[ -n "${OUT:-}" ] && cp "$REPORT" "$OUT/"
exit $status
