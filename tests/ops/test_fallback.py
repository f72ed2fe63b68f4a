"""The paths CUDA tensors take when the hand-written kernels do not serve their device (a build
without nvcc, or no kernel image for the GPU), forced onto CPU tensors: every result must equal
the normal CPU path bit for bit, the dropout mask drawn in ATen integer ops included."""
import pytest
import torch

import soslora_ext as sl
from soslora_ext import _C

from conftest import make_layer

_ops = torch.ops.soslora
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def both_paths(fn):
    """fn() on the CPU paths, then on the fallback paths."""
    normal = fn()
    _C.set_cpu_takes_cuda_fallback(True)
    try:
        return normal, fn()
    finally:
        _C.set_cpu_takes_cuda_fallback(False)


# Seeds with all 64 bits in use (the key's and the offset's high words enter the rounds).
SEEDS = [[0, 0], [-0x1234_5678_9ABC_DEF0, 0x7FFF_FFFF_FFFF_FFFF], [987654321, 5],
         [0x7FFF_0000_FFFF_0001, 0x1_0000_0003]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.000488043878, 0.1, 0.5, 0.97])
def test_aten_dropout_mask_equals_cpu_loop_bitwise(dtype, seed, p):
    seed_t = torch.tensor(seed)
    normal, fallback = both_paths(lambda: _ops.dropout_mask(seed_t, [3, 1031], p, dtype))
    assert fallback.dtype == dtype and torch.equal(fallback, normal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("on_input", [False, True])
def test_layer_step_on_fallback_paths_equals_cpu_bitwise(dtype, on_input):
    """Forward and every gradient, dropout applied in one pass (input or hidden side)."""
    torch.manual_seed(0)
    layer = make_layer(37, 23, dtype=dtype, adapter_dtype=dtype, num_experts=4, rank=8,
                       dropout=0.3, dropout_position="pre" if on_input else "post")
    layer.ortho_lambda.fill_(0.1)
    x = torch.randn(2, 9, 37, dtype=dtype)
    grad_out = torch.randn(2, 9, 23, dtype=dtype)

    def step():
        torch.manual_seed(7)  # the same dropout seed on both paths
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        return [y, *torch.autograd.grad(y, [xi, layer.lora_A, layer.lora_B], grad_out)]

    normal, fallback = both_paths(step)
    for a, b in zip(normal, fallback):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_cps_layer_on_fallback_paths_equals_cpu_bitwise():
    base = torch.nn.Linear(40, 36)
    layer = sl.CPSLinear(base, num_clusters=3, rank=4, init_partition="random", dropout=0.2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(17, 40)

    def step():
        torch.manual_seed(3)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        return [y, *torch.autograd.grad(y.square().sum(), [xi, layer.lora_A, layer.lora_B])]

    normal, fallback = both_paths(step)
    for a, b in zip(normal, fallback):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_and_weight_stats_on_fallback_paths_equal_the_cpu_loop_bitwise(dtype, monkeypatch):
    """The ATen merge forms the update with at::mm in the CPU loop's bands: equal to its scalar
    form bit for bit (the SIMD forms sum with their own kernel), the stats too."""
    monkeypatch.setenv("SOSLORA_CPU_ISA", "scalar")
    g = torch.Generator().manual_seed(8)
    factor = torch.float64 if dtype == torch.float64 else torch.float32
    A = torch.randn(5, 301, generator=g, dtype=factor)
    B = torch.randn(77, 5, generator=g, dtype=factor)
    scale = torch.rand(77, 5, generator=g, dtype=factor)
    weights = [torch.randn(77, 301, generator=g).to(dtype),
               torch.randn(301, 77, generator=g).to(dtype).t(),
               torch.randn(154, 602, generator=g).to(dtype)[::2, ::2]]
    if dtype.itemsize == 2:  # every finite 16-bit value, subnormals included
        every = torch.arange(-2**15, 2**15, dtype=torch.int16).view(dtype)
        every = every.where(every.isfinite(), 0)
        weights.append(every[torch.randperm(every.numel(), generator=g)[:77 * 301]].view(77, 301))
    for w0 in weights:
        def merge():
            w = w0.clone()
            return _ops.merge_into_(w, A, B, scale, 0.7), w, _ops.weight_stats(w0)
        normal, fallback = both_paths(merge)
        for a, b in zip(normal, fallback):
            assert torch.equal(a, b)
    # A sum beyond the range: the fallback checks them all first and writes nothing.
    w0[3, 4] = 0.75 * torch.finfo(dtype).max
    A[:, 4], B[3], B[:, 0] = 0, 0, 0  # the update at (3, 4) alone is of the dtype's range
    A[0, 4], B[3, 0], scale[3, 0] = 0.5 * torch.finfo(dtype).max, 1, 1
    normal, fallback = both_paths(lambda: (lambda w: (_ops.merge_into_(w, A, B, scale, 1.0), w))(
        w0.clone()))
    assert normal[0].tolist() == fallback[0].tolist() == [0, 0, 0, 1]
    assert torch.equal(fallback[1], w0) and torch.isfinite(normal[1]).all()
