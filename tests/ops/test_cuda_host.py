"""The CUDA kernels (csrc/cuda/*.cu, unchanged) compiled with g++ against a host emulation of the
CUDA execution model and checked launcher by launcher against a long double reference, in an
optimised build and under ASan/UBSan (tests/ops/cuda_host/README.md). Needs no GPU and no nvcc."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent / "cuda_host"
CUDA_INC = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
OUT = ROOT / "build" / "cuda_host"

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or shutil.which("make") is None
    or not (CUDA_INC / "cuda_fp16.h").exists(),
    reason="needs g++, make and CUDA's headers (cuda_fp16.h)")


def build(variant: str) -> Path:
    out = OUT / variant
    r = subprocess.run(["make", "-s", "-f", str(HERE / "Makefile"), f"VARIANT={variant}",
                        f"OUT={out}", f"CUDA_INC={CUDA_INC}", f"PYTHON={sys.executable}", "-j2"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def run(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    output = r.stdout + r.stderr
    assert r.returncode == 0, output[-6000:]
    assert "all passed" in r.stdout, output[-6000:]
    for report in ("runtime error", "ERROR: AddressSanitizer", "EMULATOR ERROR"):
        assert report not in output, output[-6000:]
    return r.stdout


@pytest.mark.parametrize("variant", ["opt", "asan"])
def test_kernels_on_host_emulator(variant):
    out = build(variant)
    # Every case in order and again with shuffled block and thread orders (bitwise equal where
    # the summation order is fixed); the optimised build adds a grid of more than 65536 blocks.
    extra = ["--big"] if variant == "opt" else []
    run(str(out / "driver"), "--shuffle", "12345", *extra)
    # The kernels as compiled for sm_60: 16-bit tiles on the FMA path instead of tensor cores.
    run(str(out / "driver_sm60"), "--only", "product,penalty,fused,cluster",
        "--dtypes", "fp16,bf16")


def test_bad_index_map_stops_the_kernel():
    """A cluster launch whose column map points past x: the kernel traps (no read outside x)."""
    r = subprocess.run([str(build("opt") / "driver"), "--trap"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "__trap() called" in r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("plant", ["missing barrier after the pipeline wait",
                                   "misaligned leading dimension",
                                   "split-K partial sums stored without atomics"])
def test_emulator_catches_planted_bug(plant, tmp_path):
    """Three of plant_bugs.py's bugs, planted in a copy of the sources, fail the driver (the
    last one only through the check for races between blocks)."""
    sys.path.insert(0, str(HERE))
    try:
        import plant_bugs
    finally:
        sys.path.remove(str(HERE))
    built = build("opt")
    out = tmp_path / "opt"
    out.mkdir()
    for obj in plant_bugs.DRIVER_OBJECTS:  # reuse the driver; only the kernels are rebuilt
        shutil.copy2(built / obj, out / obj)
    csrc = tmp_path / "csrc"
    pristine = plant_bugs.copy_sources(csrc)
    (match,) = [p for p in plant_bugs.PLANTS if p[0].startswith(plant)]
    assert plant_bugs.apply(csrc, pristine, match), "the plant no longer applies to the sources"
    caught, why = plant_bugs.check(csrc, out, "opt")
    assert caught, why
