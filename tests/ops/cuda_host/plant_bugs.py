#!/usr/bin/env python3
"""Plants bugs in a copy of the kernel sources, one at a time, and reports which the emulator
driver catches. The repository's files are never modified.

  plant_bugs.py [--both] [--keep] [NAME_SUBSTRING ...]

Each plant is rebuilt and run in the optimised variant; if that misses it, in the ASan/UBSan
variant (--both: always in both). A plant counts as caught when a driver exits non-zero (wrong
values, an emulator error, a sanitizer report, a crash or a hang).
"""
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
TP, LK, KC = "cuda/tile_product.cuh", "cuda/lowrank_kernels.cu", "cuda/kernels.cu"

# (name, file, old text, new text): `old` must occur exactly once in the file.
PLANTS = [
    ("missing barrier after the tile loads (wmma path)", TP,
     "      __syncthreads();\n      for (int kk = 0; kk < kTileK; kk += 16) {",
     "      for (int kk = 0; kk < kTileK; kk += 16) {"),
    ("missing barrier at the end of a k step (wmma path)", TP,
     "      __syncthreads();\n    }\n    for (int f = 0; f < 2; ++f)",
     "    }\n    for (int f = 0; f < 2; ++f)"),
    ("missing barrier before the epilogue (wmma path)", TP,
     "    __syncthreads();\n    finish_tile(epilogue, [&](auto&& f) {\n      for (int idx",
     "    finish_tile(epilogue, [&](auto&& f) {\n      for (int idx"),
    ("missing barrier at the end of a k step (FMA path)", TP,
     "      __syncthreads();\n    }\n    finish_tile(epilogue, [&](auto&& f) {\n      for (int i",
     "    }\n    finish_tile(epilogue, [&](auto&& f) {\n      for (int i"),
    ("barrier in divergent code (before the wmma epilogue)", TP,
     "    __syncthreads();\n    finish_tile(epilogue, [&](auto&& f) {\n      for (int idx",
     "    if (threadIdx.x < 128) __syncthreads();\n"
     "    finish_tile(epilogue, [&](auto&& f) {\n      for (int idx"),
    ("barriers at different call sites (FMA path, divergent)", TP,
     "      __syncthreads();\n    }\n    finish_tile(epilogue, [&](auto&& f) {\n      for (int i",
     "      if (threadIdx.x < 128) __syncthreads();\n      else __syncthreads();\n    }\n"
     "    finish_tile(epilogue, [&](auto&& f) {\n      for (int i"),
    ("off-by-one tile row bound (gr <= rows_end)", TP, "gr < rows_end", "gr <= rows_end"),
    ("out-of-bounds read one column past the tile (gc <= cols_end)", TP,
     "gc < cols_end", "gc <= cols_end"),
    ("misaligned leading dimension (kLdL = kTileK + 4)", TP,
     "kLdL = kTileK + 8", "kLdL = kTileK + 4"),
    ("short grid (grid_m without the round-up)", TP,
     "grid_m = (M + kTileM - 1) / kTileM", "grid_m = M / kTileM"),
    ("unrounded split-K chunk", TP,
     "  k_chunk = ((k_chunk + kTileK - 1) / kTileK) * kTileK;\n", ""),
    ("tile loader skips the tile's last element (unwritten shared memory)", TP,
     "idx < kRows * kCols;", "idx < kRows * kCols - 1;"),
    ("wmma tile chosen by thread instead of warp (divergent warp)", TP,
     "warp_m = (warp % 4) * 16", "warp_m = (threadIdx.x % 4) * 16"),
    ("epilogue column bound off by one (n0 + c <= N)", TP,
     "n0 + c < N)", "n0 + c <= N)"),
    ("dropout mask indexed by the column alone", LK,
     "!dropout.kept(i, j)) return Acc(0);", "!dropout.kept(0, j)) return Acc(0);"),
    ("split-K partial sums stored without atomics", LK,
     "atomicAdd(data + m * stride0 + n, v);", "data[m * stride0 + n] += v;"),
    ("penalty without the cross-expert mask", LK,
     "if (i / rows_per_expert != j / rows_per_expert) {", "if (i != j) {"),
    ("merge tile written without its range check", TP,
     "    if (mine != 0) atomicAdd(refused_s, mine);", "    (void)mine;"),
    ("merge takes the update back from a refused tile too", KC,
     "    if (refused[blockIdx.x * gridDim.y + blockIdx.y]) return;\n", ""),
    ("fingerprint without the pairs' column weights", KC,
     "(pairs ? W(2) * W(j >> 1) + 1 : W(2) * W(j) + 1)", "(W(2) * W(j) + 1)"),
    ("stats reduction reads before every thread wrote (missing barrier)", KC,
     "    reduce_s[t] = mine;\n    __syncthreads();", "    reduce_s[t] = mine;"),
    ("grid-stride loop stepping by one block (dropout_apply)", KC,
     "       i += int64_t(gridDim.x) * blockDim.x) {\n    const bool keep",
     "       i += blockDim.x) {\n    const bool keep"),
]

DRIVER_OBJECTS = ["driver.test.o", "merge.test.o", "product.test.o", "penalty.test.o", "emu.o",
                  "warp.o"]


def make(out: Path, csrc: Path, variant: str) -> subprocess.CompletedProcess:
    built = (out / "emu.o").exists()
    keep = [a for obj in DRIVER_OBJECTS for a in ("-o", str(out / obj))] if built else []
    return subprocess.run(["make", "-s", "-f", str(HERE / "Makefile"), f"VARIANT={variant}",
                           f"OUT={out}", f"CSRC={csrc}", "-j2", *keep],
                          capture_output=True, text=True)


def run_drivers(out: Path, timeout: float) -> tuple[bool, str]:
    """(caught, first line saying why)."""
    for cmd in ([str(out / "driver")],
                [str(out / "driver_sm60"), "--only", "product,penalty", "--dtypes", "fp16,bf16"]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return True, f"{Path(cmd[0]).name}: hang (>{timeout:.0f} s)"
        if r.returncode != 0:
            lines = (r.stderr + r.stdout).splitlines()
            keys = ("EMULATOR ERROR", "ERROR: AddressSanitizer", "runtime error", "FAIL")
            why = next((l for k in keys for l in lines if k in l), f"exit status {r.returncode}")
            return True, f"{Path(cmd[0]).name}: {why.strip()[:230]}"
    return False, "all cases passed"


def copy_sources(csrc: Path) -> dict:
    """Copies csrc/cuda/* and csrc/philox.h to `csrc`; returns the pristine texts."""
    (csrc / "cuda").mkdir(parents=True, exist_ok=True)
    pristine = {}
    for path in sorted((REPO / "csrc" / "cuda").iterdir()) + [REPO / "csrc" / "philox.h"]:
        rel = path.relative_to(REPO / "csrc").as_posix()
        pristine[rel] = path.read_text()
        (csrc / rel).write_text(pristine[rel])
    return pristine


def apply(csrc: Path, pristine: dict, plant) -> bool:
    """Restores the pristine copies, then plants one bug; False when its text is not found once."""
    for rel, text in pristine.items():
        if (csrc / rel).read_text() != text:
            (csrc / rel).write_text(text)
    _, rel, old, new = plant
    if pristine[rel].count(old) != 1:
        return False
    (csrc / rel).write_text(pristine[rel].replace(old, new))
    return True


def check(csrc: Path, out: Path, variant: str) -> tuple[bool, str]:
    """Builds the copy into `out` and runs the drivers: (caught, why)."""
    r = make(out, csrc, variant)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines() or ["?"]
        return True, "does not compile: " + lines[-1][:200]
    return run_drivers(out, 120 if variant == "opt" else 400)


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    both, keep = "--both" in sys.argv, "--keep" in sys.argv
    plants = [p for p in PLANTS if not args or any(a in p[0] for a in args)]
    work = Path(tempfile.mkdtemp(prefix="plant_bugs_"))
    csrc = work / "csrc"
    pristine = copy_sources(csrc)
    variants = ["opt", "asan"]
    print(f"baseline builds in {work} ...", flush=True)
    for v in variants:  # the unmodified sources must build and pass
        caught, why = check(csrc, work / v, v)
        if caught:
            print(f"baseline {v} fails: {why}")
            return 2
    results = []
    for plant in plants:
        name = plant[0]
        if not apply(csrc, pristine, plant):
            results.append((name, None))
            print(f"SKIP {name}: its text is not found once in {plant[1]}", flush=True)
            continue
        caught_by = []
        for v in variants:
            t0 = time.time()
            caught, why = check(csrc, work / v, v)
            print(f"  [{v} {time.time() - t0:5.1f} s] {name}: {why}", flush=True)
            if caught:
                caught_by.append(v)
                if not both:
                    break
        results.append((name, caught_by))
    print("\nplanted bug".ljust(72) + "caught by")
    for name, caught_by in results:
        status = "NOT APPLIED" if caught_by is None else (", ".join(caught_by) or "MISSED")
        print(f"  {name:70s}{status}")
    applied = [r for r in results if r[1] is not None]
    print(f"caught {sum(1 for r in applied if r[1])} of {len(applied)} planted bugs")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
