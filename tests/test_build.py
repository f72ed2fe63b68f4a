"""The build: CUDA sources are compiled whenever torch has CUDA and nvcc is present."""
import os
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


@pytest.mark.skipif(not (torch.version.cuda and NVCC.exists()),
                    reason="needs a CUDA build of torch and nvcc")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_compiled_and_registered(op):
    assert sl.built_with_cuda
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"soslora::{op}", "CUDA")


def test_import_needs_no_gpu():
    assert isinstance(sl.built_with_cuda, bool) and sl.__version__
