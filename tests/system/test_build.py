"""The build: CUDA sources are compiled whenever torch has CUDA and nvcc is present."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import soslora_ext as sl

OPS = ["lowrank_forward", "lowrank_grad_hidden", "lowrank_grad_A", "lowrank_grad_x",
       "dropout_mask", "ortho_penalty", "ortho_penalty_grad_", "merge_into_"]
NVCC = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cpu_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"soslora::{op}", "CPU")


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cuda_kernel_in_every_build(op):
    """Without the CUDA kernels (no nvcc at build time) CUDA tensors get the ATen paths."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"soslora::{op}", "CUDA")


@pytest.mark.skipif(not (torch.version.cuda and NVCC.exists()),
                    reason="needs a CUDA build of torch and nvcc")
def test_cuda_kernels_compiled_when_nvcc_is_present():
    assert sl.built_with_cuda


def test_import_needs_no_gpu():
    assert isinstance(sl.built_with_cuda, bool) and sl.__version__


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="reads the ELF dynamic section")
def test_module_links_the_shared_cxx_runtime():
    """A private (static) libstdc++ copy makes every error raised by an op crash the process."""
    module = sl._C.__file__
    dynamic = subprocess.run(["readelf", "-d", module], capture_output=True, text=True).stdout
    assert "libstdc++.so" in dynamic, f"{module} does not link the shared libstdc++"
    static = subprocess.run(["nm", "-D", "--defined-only", module], capture_output=True,
                            text=True).stdout
    assert "__cxa_throw" not in static and "__gxx_personality_v0" not in static


def test_op_error_raises_in_a_fresh_process():
    """The whole path of an error: thrown in C++, through the module's frames, to Python."""
    code = ("import torch, soslora_ext\n"
            "try:\n"
            "    torch.ops.soslora.ortho_penalty(torch.randn(5, 4), 2)\n"
            "except RuntimeError as e:\n"
            "    print('raised:', e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "raised:" in result.stdout and "divisible by num_experts" in result.stdout
