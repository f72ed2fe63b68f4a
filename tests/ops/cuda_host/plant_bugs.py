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
FK = "cuda/fused_kernels.cu"
TL, MA, CK = "cuda/tile_load.cuh", "cuda/matrix_access.cuh", "cuda/cluster_kernels.cu"
DR = "cuda/dropout.cuh"

# (name, file, old text, new text): `old` must occur exactly once in the file.
PLANTS = [
    # The pipeline and its barriers.
    ("missing barrier after the pipeline wait (copies not visible, stage refilled early)", TP,
     "        __syncthreads();\n        issue(step + kStages - 1);",
     "        issue(step + kStages - 1);"),
    ("pipeline waits for one group too few (a stage read before its copies land)", TP,
     "__pipeline_wait_prior(kStages - 2);", "__pipeline_wait_prior(kStages - 1);"),
    ("one-stage pipeline without its wait (fp64)", TP,
     "        issue(step);\n        __pipeline_wait_prior(0);\n", "        issue(step);\n"),
    ("missing barrier at the end of a k step (one-stage pipeline)", TP,
     "        math(stages);\n        __syncthreads();\n", "        math(stages);\n"),
    ("missing barrier before the wmma result reuses the stage buffers", TP,
     "    __syncthreads();  // every warp is done with the stage buffers the result reuses\n", ""),
    ("missing barrier before the epilogue (wmma path)", TP,
     "    __syncthreads();\n    if constexpr (requires { epilogue.row(",
     "    if constexpr (requires { epilogue.row("),
    ("barrier in divergent code (before the wmma epilogue)", TP,
     "    __syncthreads();\n    if constexpr (requires { epilogue.row(",
     "    if (threadIdx.x < 128) __syncthreads();\n    if constexpr (requires { epilogue.row("),
    ("barriers at different call sites (pipeline, divergent)", TP,
     "        __syncthreads();\n        issue(step + kStages - 1);",
     "        if (threadIdx.x < 128) __syncthreads();\n        else __syncthreads();\n"
     "        issue(step + kStages - 1);"),
    # Tile loads.
    ("off-by-one tile bound in element loads (go <= outer_end)", TL,
     "if (go < outer_end && gi < inner_end)", "if (go <= outer_end && gi < inner_end)"),
    ("out-of-bounds read one past the tile (gi <= inner_end)", TL,
     "go < outer_end && gi < inner_end", "go < outer_end && gi <= inner_end"),
    ("16-byte copies past the edge (no zero fill)", TL,
     "clamp64(inner_end - gi, 0, T::kVec)", "T::kVec"),
    ("16-byte copies of a misaligned leading dimension", TL,
     " && ld % T::kVec == 0) return p;", ") return p;"),
    ("copies into the stage without its row padding", TL,
     "__pipeline_memcpy_async(smem + o * T::kLd + i,",
     "__pipeline_memcpy_async(smem + o * T::kInner + i,"),
    ("dropout not applied to copied tiles", TL,
     "if (load.exact() || raw(ld) == nullptr) return;", "return;"),
    ("dropout applied to copies before they land", TP,
     "        __pipeline_wait_prior(kStages - 2);  // this thread's copies of `step` have landed\n"
     "        finish(step);\n",
     "        finish(step);\n        __pipeline_wait_prior(kStages - 2);\n"),
    ("misaligned leading dimension (kLd = kInner + kVec / 2)", TL,
     "kLd = kInner + kVec;", "kLd = kInner + kVec / 2;"),
    ("tile loader skips the tile's last element (unwritten shared memory)", TL,
     "idx < T::kOuter * T::kInner;", "idx < T::kOuter * T::kInner - 1;"),
    ("k-major left tile read with a column-major fragment", TP,
     "std::conditional_t<kLeftK, nvcuda::wmma::row_major, nvcuda::wmma::col_major>",
     "std::conditional_t<kLeftK, nvcuda::wmma::col_major, nvcuda::wmma::row_major>"),
    ("wmma tile chosen by thread instead of warp (divergent warp)", TP,
     "warp_m(int(threadIdx.x) / 32 % 4 * 16)", "warp_m(int(threadIdx.x) % 4 * 16)"),
    ("epilogue column bound off by one (wmma path, n0 + c <= N)", TP,
     "n0 + c < N) epilogue(", "n0 + c <= N) epilogue("),
    ("epilogue row bound off by one (FMA path, m <= M)", TP,
     "if (m < M && n < N) epilogue(m, n, math.acc[i][j]);",
     "if (m <= M && n < N) epilogue(m, n, math.acc[i][j]);"),
    # The grid and the batch.
    ("short grid (m tiles without the round-up)", TP,
     "tiles += ((p.M + kTileM - 1) / kTileM)", "tiles += (p.M / kTileM)"),
    ("unrounded split-K chunk", TP,
     "        chunk = (chunk + kTileK - 1) / kTileK * kTileK;\n", ""),
    ("problem lookup off by one (a tile runs the next problem)", TP,
     "batch.first_tile[q + 1] <= blockIdx.x", "batch.first_tile[q + 1] < blockIdx.x"),
    ("batches overrun: the window ignores the batch capacity", TP,
     "const int64_t window = count - begin < kCap ? count - begin : kCap;",
     "const int64_t window = count - begin;"),
    # Matrices, maps, dropout, atomics.
    ("dropout mask indexed by the column alone", MA,
     "if (dropout.active() && !dropout.kept(r, c)) return Acc(0);",
     "if (dropout.active() && !dropout.kept(0, c)) return Acc(0);"),
    ("dropout through a column map indexed by the logical column count", DR,
     "d.cols = m.col_map != nullptr && m.col_extent ? m.col_extent : m.cols;", "d.cols = m.cols;"),
    ("epilogue writes the unmapped column", MA,
     "const int64_t r = place.row(m), c = place.col(n);",
     "const int64_t r = place.row(m), c = n;"),
    ("16-byte epilogue without the output dropout", MA,
     "Acc w = value(m, n + part + e, Acc(v[part + e]), scale);",
     "Acc w = Acc(v[part + e]) * scale;"),
    ("16-byte epilogue on a strided output", MA,
     "!place.mapped() && place.stride1 == 1 &&", "!place.mapped() &&"),
    ("addend read at the logical position, not through the maps", MA,
     "addend[r * addend_stride0 + c * addend_stride1]",
     "addend[m * addend_stride0 + n * addend_stride1]"),
    ("index map bound off by one (an entry equal to the extent passes)", MA,
     "if (v < 0 || v >= extent) __trap();", "if (v < 0 || v > extent) __trap();"),
    ("split-K partial sums stored without atomics", MA,
     "atomicAdd(data + m * stride0 + n, alpha != nullptr ? v * *alpha : v);",
     "data[m * stride0 + n] += alpha != nullptr ? v * *alpha : v;"),
    ("penalty without the cross-expert mask", LK,
     "if (i / rows_per_expert != j / rows_per_expert) {", "if (i != j) {"),
    # The cluster form.
    ("cluster's x columns from the first cluster's offset", CK,
     "columns(x, p.col_index + k.col0, k.cols)", "columns(x, p.col_index, k.cols)"),
    ("transpose keeps the maps on their old dimensions", CK,
     "  t.row_map = m.col_map;\n  t.col_map = m.row_map;\n", ""),
    ("grad_B without the cluster's scale", CK,
     "AtomicAddEpilogue<Acc>{gB + k.row0 * r_max, r_max, scale + c}",
     "AtomicAddEpilogue<Acc>{gB + k.row0 * r_max, r_max, nullptr}"),
    ("grad_A placed at the cluster's row offset instead of its column offset", CK,
     "AtomicAddEpilogue<Acc>{gA + k.col0, in, nullptr}",
     "AtomicAddEpilogue<Acc>{gA + k.row0, in, nullptr}"),
    ("merge tile written without its range check", TP,
     "    if (mine != 0) atomicAdd(refused_s, mine);", "    (void)mine;"),
    ("merge takes the update back from a refused tile too", KC,
     "    if (refused[blockIdx.x]) return;\n", ""),
    ("fingerprint without the pairs' column weights", KC,
     "(pairs ? W(2) * W(j >> 1) + 1 : W(2) * W(j) + 1)", "(W(2) * W(j) + 1)"),
    ("stats reduction reads before every thread wrote (missing barrier)", KC,
     "    reduce_s[t] = mine;\n    __syncthreads();", "    reduce_s[t] = mine;"),
    ("grid-stride loop stepping by one block (dropout_apply)", KC,
     "       i += int64_t(gridDim.x) * blockDim.x) {\n    const bool keep",
     "       i += blockDim.x) {\n    const bool keep"),
    ("missing barrier after a step's tile stores (fused, wmma path)", FK,
     "    __syncthreads();\n    if (o0 + S::kCols < p.out) {  // the next step's tiles",
     "    if (o0 + S::kCols < p.out) {  // the next step's tiles"),
    ("missing barrier at the end of a step (fused, FMA path)", FK,
     "    __syncthreads();  // the tiles are overwritten next step\n  }\n  if (!want_h) return;\n"
     "#pragma unroll\n  for (int i = 0; i < kHI; ++i)",
     "  }\n  if (!want_h) return;\n#pragma unroll\n  for (int i = 0; i < kHI; ++i)"),
    ("band boundary off by one (each band's last row dropped)", FK,
     "n_end = (band + 1) * p.N / p.bands;", "n_end = (band + 1) * p.N / p.bands - 1;"),
    ("bands taller than the 64-row tile (their count without the round-up)", FK,
     "std::max((N + kRows - 1) / kRows,", "std::max(N / kRows,"),
    ("deterministic grad_B sums added atomically (schedule-dependent order)", FK,
     "const bool per_split = deterministic && split.bands > 0;", "const bool per_split = false;"),
    ("deterministic reduction skips the last split's slice", FK,
     "for (int64_t k = 1; k < slices; ++k)", "for (int64_t k = 1; k < slices - 1; ++k)"),
    ("grad_h dropout mask indexed transposed", FK,
     "p.grad_h_dropout.apply(n, j, v)", "p.grad_h_dropout.apply(j, n, v)"),
    ("scale read per rank instead of per group of ranks", FK,
     "j / scale.group * scale.group_stride", "j * scale.group_stride"),
    ("128-bit loads on rows that are not 16-byte aligned", FK,
     "m.stride1 == 1 && m.stride0 % kVec == 0 &&", "m.stride1 == 1 &&"),
    ("grad_B part fragment chosen per thread, not per warp (divergent warp)", FK,
     "p_col = warp % 2,", "p_col = threadIdx.x % 2,"),
    ("grad_h row bound off by one (n <= the band's end)", FK,
     "if (n >= n_end || j >= p.r) return;", "if (n > n_end || j >= p.r) return;"),
]

DRIVER_OBJECTS = ["driver.test.o", "merge.test.o", "product.test.o", "penalty.test.o",
                  "fused.test.o", "cluster.test.o", "emu.o", "warp.o", "pipeline.o", "races.o"]


def make(out: Path, csrc: Path, variant: str) -> subprocess.CompletedProcess:
    built = (out / "emu.o").exists()
    keep = [a for obj in DRIVER_OBJECTS for a in ("-o", str(out / obj))] if built else []
    return subprocess.run(["make", "-s", "-f", str(HERE / "Makefile"), f"VARIANT={variant}",
                           f"OUT={out}", f"CSRC={csrc}", "-j2", *keep],
                          capture_output=True, text=True)


def run_drivers(out: Path, timeout: float) -> tuple[bool, str]:
    """(caught, first line saying why)."""
    for cmd in ([str(out / "driver")],
                [str(out / "driver_sm60"), "--only", "product,penalty,fused,cluster", "--dtypes",
                 "fp16,bf16"],
                [str(out / "driver"), "--trap"]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return True, f"{Path(cmd[0]).name}: hang (>{timeout:.0f} s)"
        if cmd[-1] == "--trap":  # must stop at the trap, nothing else
            if r.returncode != 2 or "__trap() called" not in r.stderr:
                return True, "driver --trap: the bad index map was not trapped"
            continue
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
